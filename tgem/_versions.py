"""``show_versions``: what tgem runs on, and which attention backend is active and why."""

from __future__ import annotations

import platform
import sys

import torch

from tgem._kernels import backend_details, backend_status, resolve_backend
from tgem._version import __version__

#: Gene counts for which :func:`versions` reports ``auto``'s choice (the benchmarks' sizes).
AUTO_GENES = (765, 1708, 5000, 22283)


def versions() -> dict:
    """Versions of tgem, its dependencies and the state of every attention backend.

    Returns
    -------
    dict
        ``{"python": ..., "tgem": ..., "torch": ..., ..., "backends": {device: {...}}}``.
        For each device, ``auto`` names the backend ``attention_backend="auto"`` uses
        (its dense choice), ``auto by genes`` what it uses for a few gene counts (where it
        may choose per call, ``"<dense>+<other>"``; see
        :func:`tgem._kernels.resolve_backend`), and each backend maps to ``"available"``
        or the reason it is not.

    Examples
    --------
    >>> info = versions()
    >>> info["backends"]["cpu"]["exact"]
    'available'
    """
    import captum
    import numpy
    import sklearn

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "tgem": __version__,
        "torch": torch.__version__,
        "captum": captum.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": numpy.__version__,
        "cuda available": torch.cuda.is_available(),
        "torch threads": torch.get_num_threads(),
        "backends": {},
    }
    cpu_status = backend_status("cpu")
    info["native kernel"] = backend_details().get(
        "native", cpu_status.get("tgem._kernels._native", "not registered")
    )
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        status = {name: reason or "available" for name, reason in backend_status(dev).items()}
        status["auto"] = resolve_backend("auto", dev).name
        status["auto by genes"] = ", ".join(
            f"{genes}: {resolve_backend('auto', dev, genes=genes).name}" for genes in AUTO_GENES
        )
        info["backends"][dev] = status
    return info


def show_versions() -> None:
    """Print :func:`versions` in a readable form (for bug reports).

    Examples
    --------
    >>> show_versions()  # doctest: +ELLIPSIS
    tgem ...
    """
    info = versions()
    lines = [f"tgem {info['tgem']}"]
    for key, value in info.items():
        if key not in ("tgem", "backends"):
            lines.append(f"  {key}: {value}")
    for dev, status in info["backends"].items():
        lines.append(f"attention backends on {dev} (auto -> {status['auto']}):")
        lines.append(f"  auto by genes: {status['auto by genes']}")
        for name, reason in status.items():
            if name not in ("auto", "auto by genes"):
                lines.append(f"  {name}: {reason}")
    sys.stdout.write("\n".join(lines) + "\n")
