"""What this process may still allocate, and a check that an array fits in it.

Reads ``/proc/meminfo``, the memory cgroups (v1 and v2) and the ``ulimit`` of this process;
used before large results (attention maps, attention attribution) are allocated, so that
they fail with a message naming the size and the limit instead of being killed.

The bottom layer of the package: it imports nothing from tgem (see docs/architecture.rst).
"""

from __future__ import annotations

import math
import os

#: Largest share of the memory this process may still allocate (:func:`available_memory`)
#: that one result array may take: the computation around it needs memory too.
MEMORY_FRACTION = 0.5

# Where :func:`memory_limits` reads the limits (module constants, so tests can point them at
# files of their own).
MEMINFO = "/proc/meminfo"
PROC_STATUS = "/proc/self/status"
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
#: cgroup v1 writes "no limit" as a huge number (9223372036854771712 on 4 KiB pages).
_CGROUP_V1_UNLIMITED = 1 << 60


def _read_int(path: str) -> int | None:
    """The integer in file ``path``, None if it is missing, unreadable or not a number."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _kib_field(path: str, field: str) -> int | None:
    """``field`` of a ``/proc`` file of "Name:  123 kB" lines, in bytes (None if absent)."""
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == field:
                    return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_dirs() -> list[tuple[str, str]]:
    """``(directory, version)`` of this process's memory cgroup and its ancestors."""
    try:
        with open(PROC_CGROUP) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    dirs = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and line.startswith("0::"):
            base, version = CGROUP_ROOT, "v2"
        elif "memory" in controllers.split(","):
            base, version = os.path.join(CGROUP_ROOT, "memory"), "v1"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # the cgroup, then each ancestor
            d = os.path.join(base, *parts[:depth])
            if os.path.isdir(d) and (d, version) not in dirs:
                dirs.append((d, version))
    return dirs


def _cgroup_headroom() -> int | None:
    """Smallest ``limit - usage`` of the memory cgroups that hold this process."""
    free = []
    for d, version in _cgroup_dirs():
        if version == "v2":
            limit = _read_int(os.path.join(d, "memory.max"))  # "max" (no limit) gives None
            used = _read_int(os.path.join(d, "memory.current"))
        else:
            limit = _read_int(os.path.join(d, "memory.limit_in_bytes"))
            used = _read_int(os.path.join(d, "memory.usage_in_bytes"))
            limit = None if limit is not None and limit >= _CGROUP_V1_UNLIMITED else limit
        if limit is not None and used is not None:
            free.append(max(0, limit - used))
    return min(free) if free else None


def _rlimit_headroom(name: str, used_field: str) -> int | None:
    """``resource`` limit ``name`` minus this process's use (``used_field`` of its status)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    try:
        soft, _ = resource.getrlimit(getattr(resource, name))
    except (AttributeError, ValueError, OSError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    used = _kib_field(PROC_STATUS, used_field)
    return max(0, soft - (used or 0))


def memory_limits() -> dict[str, int]:
    """What this process may still allocate, in bytes, by each limit that applies.

    Keys (only those known here): ``"available memory"`` (``MemAvailable`` of
    ``/proc/meminfo``), ``"cgroup memory limit"`` (v2 ``memory.max - memory.current`` or v1
    ``memory.limit_in_bytes - memory.usage_in_bytes``, of this process's cgroup and its
    ancestors), ``"RLIMIT_AS"`` and ``"RLIMIT_DATA"`` (the ``ulimit``: the limit minus the
    process's ``VmSize`` or ``VmData``), and ``"physical memory"`` when none of the others
    is known (e.g. off Linux).

    Examples
    --------
    >>> limits = memory_limits()
    >>> all(isinstance(v, int) and v >= 0 for v in limits.values())
    True
    """
    limits = {
        "available memory": _kib_field(MEMINFO, "MemAvailable"),
        "cgroup memory limit": _cgroup_headroom(),
        "RLIMIT_AS": _rlimit_headroom("RLIMIT_AS", "VmSize"),
        "RLIMIT_DATA": _rlimit_headroom("RLIMIT_DATA", "VmData"),
    }
    limits = {k: v for k, v in limits.items() if v is not None}
    if not limits:
        try:
            limits["physical memory"] = int(os.sysconf("SC_PAGE_SIZE")) * int(
                os.sysconf("SC_PHYS_PAGES")
            )
        except (AttributeError, ValueError, OSError):
            pass
    return limits


def available_memory() -> tuple[int, str] | None:
    """``(bytes, which limit)``: the least this process may still allocate, None if unknown.

    The smallest of :func:`memory_limits`.
    """
    limits = memory_limits()
    if not limits:
        return None
    name = min(limits, key=limits.get)
    return limits[name], name


def check_fits(shape: tuple[int, ...], itemsize: int, what: str, fix: str) -> None:
    """Raise ``MemoryError`` naming the size when an array of ``shape`` would not fit.

    "Fit" means at most ``MEMORY_FRACTION`` of what this process may still allocate
    (:func:`available_memory`: free memory, its cgroup's limit and its ``ulimit``).
    """
    need = itemsize * math.prod(shape)
    available = available_memory()
    if available is not None and need > MEMORY_FRACTION * available[0]:
        free, limit = available
        raise MemoryError(
            f"{what} would be an array of shape {shape} needing {need / 2**30:.2f} GiB, more "
            f"than {MEMORY_FRACTION:.0%} of the {free / 2**30:.2f} GiB this process may still "
            f"allocate (bounded by the {limit}). {fix}"
        )
