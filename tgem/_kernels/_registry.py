"""The attention backend registry: the seam between the model and the kernels.

A backend is a :class:`Backend` record; its module calls :func:`register_backend` when it is
imported. This module names no implementation: the package ``tgem._kernels`` imports the
backend modules (the always-available ones at once, the optional ones on the first question
asked here, through the loader it installs with :func:`set_loader`). A backend module that
fails to import is reported by :func:`backend_status` and never breaks tgem.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def check_once_differentiable(name: str) -> None:
    """Raise the exact backends' error when a backward pass is itself being differentiated."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"The {name} T-GEM attention is differentiable once; double backward "
            "(create_graph=True) is not implemented. Use attention_backend='reference' "
            "for higher-order gradients."
        )


@dataclass(frozen=True)
class Backend:
    """An attention implementation registered with :func:`register_backend`.

    ``fn(q, k, v)`` takes and returns ``(batch, heads, genes)`` tensors and is differentiable.
    ``unavailable(device, dtype)`` returns ``None`` when the backend can run on that device and
    dtype, otherwise the reason it cannot (shown by :func:`tgem.show_versions`). ``auto``
    picks, among the available ``exact`` backends, the one with the highest ``priority``.
    ``layer_fn(x, WQ, WK, WV, W_0)``, when given, computes a whole layer's mixed attention
    output ``(batch, genes)`` from its input ``(batch, genes)`` and weights (``(heads, genes,
    1)`` and ``(heads,)``) in one differentiable call; it must equal ``fn`` applied to
    ``x WQ, x WK, x WV`` mixed by ``W_0`` (to rounding). The model uses it when present.
    ``describe()``, when given, says in one line how the backend is built (its library, its
    instruction set); :func:`tgem.show_versions` shows it.
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    unavailable: Callable[[torch.device, torch.dtype], str | None]
    priority: int = 0
    exact: bool = True
    layer_fn: Callable[..., torch.Tensor] | None = None
    describe: Callable[[], str] | None = None


_BACKENDS: dict[str, Backend] = {}
_plugin_errors: dict[str, str] = {}
_loader: Callable[[], None] | None = None
_plugins_loaded = False


def register_backend(backend: Backend) -> None:
    """Add (or replace) an attention backend under ``backend.name``."""
    _BACKENDS[backend.name] = backend


def always_available(device: torch.device, dtype: torch.dtype) -> str | None:
    """The ``unavailable`` rule of a backend that runs on every device and dtype."""
    return None


def set_loader(loader: Callable[[], None]) -> None:
    """Install the function that imports the optional backend modules (called once, lazily).

    The kernels package installs it, so that importing tgem does not pay for the optional
    backends (torch.compile's import alone takes over a second); they are imported on the
    first call to :func:`backend_names`, :func:`backend_status` or :func:`resolve_backend`.
    """
    global _loader, _plugins_loaded
    _loader = loader
    _plugins_loaded = False


def import_failed(module: str, exc: BaseException) -> None:
    """Record that the backend module ``module`` could not be imported (shown by status)."""
    _plugin_errors[module] = f"{type(exc).__name__}: {exc}"
    logger.debug("attention backend module %s not loaded: %s", module, exc)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded or _loader is None:
        return
    _plugins_loaded = True  # first: a backend module that asks the registry does not recurse
    _loader()


def backend_names() -> list[str]:
    """Names accepted by ``attention_backend`` (besides ``"auto"``)."""
    _load_plugins()
    return sorted(_BACKENDS)


def backend_status(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, str | None]:
    """For each registered backend, ``None`` if usable on ``device``/``dtype``, else why not."""
    _load_plugins()
    device = torch.device(device)
    status = {name: b.unavailable(device, dtype) for name, b in sorted(_BACKENDS.items())}
    for mod, err in _plugin_errors.items():
        status[mod] = f"failed to import: {err}"
    return status


def backend_details() -> dict[str, str]:
    """``describe()`` of each registered backend that has one, by name.

    A backend whose ``describe`` raises is shown with the error: a report never fails.
    """
    _load_plugins()
    details = {}
    for name, backend in sorted(_BACKENDS.items()):
        if backend.describe is not None:
            try:
                details[name] = backend.describe()
            except Exception as exc:  # noqa: BLE001 - show_versions must not fail
                details[name] = f"failed: {type(exc).__name__}: {exc}"
    return details


def resolve_backend(
    name: str, device: str | torch.device, dtype: torch.dtype = torch.float32
) -> Backend:
    """The backend that ``attention_backend=name`` means on ``device`` and ``dtype``.

    ``"auto"`` returns the available exact backend with the highest priority. A named
    backend that cannot run there raises ``ValueError`` with the reason.
    """
    _load_plugins()
    device = torch.device(device)
    if name == "auto":
        usable = [b for b in _BACKENDS.values() if b.exact and b.unavailable(device, dtype) is None]
        return max(usable, key=lambda b: b.priority)
    if name not in _BACKENDS:
        raise ValueError(
            f"Unknown attention_backend={name!r}; choose 'auto' or one of {backend_names()}."
        )
    backend = _BACKENDS[name]
    reason = backend.unavailable(device, dtype)
    if reason is not None:
        raise ValueError(
            f"attention_backend={name!r} cannot run on {device} with {dtype}: {reason}. "
            "Use attention_backend='auto' to pick an available one."
        )
    return backend
