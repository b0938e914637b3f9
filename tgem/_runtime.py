"""Devices, threads, seeds and batches: the runtime helpers every layer of tgem may use.

The bottom layer of the package: it imports nothing from tgem (see docs/architecture.rst).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils import check_random_state

logger = logging.getLogger(__name__)

#: Seeds drawn from a ``random_state`` lie in ``[0, MAX_SEED)`` (a non-negative int32).
MAX_SEED = 2**31 - 1


def draw_seed(random_state) -> int:
    """One seed in ``[0, MAX_SEED)`` drawn from ``random_state`` (None, an int or a RandomState).

    Examples
    --------
    >>> draw_seed(0) == draw_seed(0)
    True
    """
    return int(check_random_state(random_state).randint(0, MAX_SEED))


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; explicit CUDA devices are checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but no CUDA GPU is available to torch "
                f"(torch {torch.__version__}). Use device='auto' or 'cpu'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) "
                "exist. Use a valid index or device='cuda'."
            )
    return dev


#: Where the cgroup CPU quota is read (v2's ``cpu.max``, v1's ``cfs_quota_us``/``cfs_period_us``).
CGROUP_ROOT = "/sys/fs/cgroup"


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(256).strip()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_quota(root: str) -> float | None:
    """CPUs allowed by the cgroup CPU quota under ``root`` (None: no quota, or unreadable)."""
    quotas = []
    v2 = _read_text(os.path.join(root, "cpu.max"))  # "max 100000" or "150000 100000"
    if v2 is not None:
        fields = v2.split()
        if len(fields) == 2 and fields[0] != "max":
            quotas.append((fields[0], fields[1]))
    for folder in ("cpu", "cpu,cpuacct"):
        quota = _read_text(os.path.join(root, folder, "cpu.cfs_quota_us"))
        period = _read_text(os.path.join(root, folder, "cpu.cfs_period_us"))
        if quota is not None and period is not None:
            quotas.append((quota, period))
    allowed = []
    for quota, period in quotas:
        try:
            q, p = int(quota), int(period)
        except ValueError:
            continue
        if q > 0 and p > 0:  # v1 writes -1 for "no quota"
            allowed.append(q / p)
    return min(allowed) if allowed else None


def available_cpus(cgroup_root: str | None = None) -> int:
    """The number of CPUs this process may use: its affinity and its cgroup CPU quota.

    The quota (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``) is
    rounded up; without either limit this is ``os.cpu_count()``.

    Parameters
    ----------
    cgroup_root : str, optional
        The cgroup file system (default :data:`CGROUP_ROOT`).

    Returns
    -------
    int
        At least 1.

    Examples
    --------
    >>> available_cpus() >= 1
    True
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(CGROUP_ROOT if cgroup_root is None else cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def capped_threads(n_threads: int, *, stacklevel: int = 2) -> int:
    """``n_threads``, capped at :func:`available_cpus` with a warning when above it.

    Far more threads than CPUs only slow the work down, and OpenMP cannot start hundreds of
    thousands of threads (the process crashes); a thread count read from a model file
    therefore never goes beyond this cap either.
    """
    cap = available_cpus()
    if n_threads <= cap:
        return n_threads
    warnings.warn(
        f"n_threads={n_threads} is more than the {cap} CPU(s) this process may use (its CPU "
        f"affinity and cgroup quota); using {cap} threads. Pass n_threads={cap} or less "
        "(or None to keep torch's setting).",
        UserWarning,
        stacklevel=stacklevel + 1,
    )
    return cap


@contextlib.contextmanager
def torch_threads(n_threads: int | None):
    """Set torch's intra-op thread count for the duration of the block, then restore it.

    The count is capped at the CPUs this process may use (see :func:`capped_threads`).
    """
    if n_threads is None:
        yield
        return
    n_threads = capped_threads(int(n_threads), stacklevel=4)
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: What torch raises when a device runs out of memory (``torch.OutOfMemoryError`` since 2.5).
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


def release_cuda_memory(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_safe_batches(
    n: int,
    batch_size: int,
    run: Callable[[slice], None],
    *,
    device: torch.device,
    n_genes: int,
    what: str,
) -> None:
    """Call ``run(rows)`` on consecutive slices covering ``range(n)``, halving on OOM.

    When the device runs out of memory the failing slice is halved and retried (later slices
    keep the smaller size), down to one row; then a ``MemoryError`` gives the sizes involved.
    ``run`` must have no effect when it fails.
    """
    start, size = 0, batch_size
    while start < n:
        rows = slice(start, min(n, start + size))
        try:
            run(rows)
        except OOM_ERRORS as exc:
            if rows.stop - rows.start == 1:
                raise MemoryError(
                    f"{device} ran out of memory {what} a single sample of {n_genes} genes "
                    f"(batches of {batch_size} were halved down to 1). Free device memory, use "
                    "fewer heads or genes, or device='cpu'."
                ) from exc
            size = (rows.stop - rows.start) // 2
            logger.warning(
                "%s ran out of memory %s %d samples; retrying with batches of %d.",
                device,
                what,
                rows.stop - rows.start,
                size,
            )
            release_cuda_memory(device)
            continue
        start = rows.stop


def dense_batch(X, idx, device: torch.device) -> torch.Tensor:
    """Rows ``idx`` of ``X`` (dense array or scipy sparse) as a float32 tensor on ``device``.

    Sparse rows are densified here, one batch at a time; ``X`` itself is never densified
    or copied whole to the device.
    """
    rows = X[idx]
    if sp.issparse(rows):
        rows = rows.toarray()
    # C order always: a Fortran-ordered batch (CSC rows densify that way) would make torch's
    # elementwise ops keep that layout and its sums over genes add in another order, so the
    # same values would not give bitwise the same fit (1e-7 apart from the dense array's).
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if not rows.flags.writeable:  # e.g. np.memmap(mode="r"): torch needs memory of its own
        rows = rows.copy()
    return torch.as_tensor(rows, device=device)


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)``."""
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))
