"""Attention attribution: Layer Integrated Gradients on each layer's softmax map, exactly.

The original T-GEM runs captum's ``LayerIntegratedGradients`` on the module that returns a
layer's softmax attention ``A`` (batch, heads, genes, genes), with an input baseline of 0 and
the true class as target. The hooked layer output is interpolated between its value at the
baseline input, ``A0 = A(x=0)``, and at the sample, ``Ax = A(x)``; everything else (the value
path ``v``, the residual, the earlier layers) stays at ``x``. The attribution of entry
``(i, j)`` of head ``h`` is::

    attr_hij = (Ax_hij - A0_hij) * sum_s w_s dF/dA_hij (A0 + alpha_s (Ax - A0))

and because the map enters the model only through ``out_i = sum_{j != i} A_ij v_j``, the
gradient is ``dF/dA_ij = g_i v_j`` (0 on the diagonal) with ``g = dF/dout``. So
``attr_hij = (Ax_hij - A0_hij) * gbar_hi * v_hj`` with ``gbar = sum_s w_s g(alpha_s)``: the
integration only needs per-query vectors, and the interpolated layer output is itself the
interpolation of two O(genes) attention outputs, ``out(alpha) = out0 + alpha (outx - out0)``.
The gene x gene matrix is formed once per layer, summed over samples and heads block by block.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from tgem._kernels import row_max

LOG2E = 1.4426950408889634

#: Gene-pair elements held at once while forming an attribution matrix (64 MiB of float32).
PAIR_BLOCK_ELEMENTS = 1 << 24
#: Rows x heads x genes elements of one integration pass (steps x samples rows).
PASS_ELEMENTS = 1 << 23
#: Rows x heads x genes x genes of one pass: a backend's backward may hold scratch that grows
#: with genes^2 per row (the native kernel keeps one partial sum per 64 key genes), so passes
#: shrink at large gene counts (21 rows at 12,625 genes, 5 heads).
PASS_PAIR_ELEMENTS = 1 << 34
#: Largest share of the memory this process may still allocate (:func:`available_memory`)
#: that one result array may take: the computation around it needs memory too.
MEMORY_FRACTION = 0.5

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


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


def integration_points(n_steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """``alphas`` and ``weights`` of the path integral, as captum's approximation methods."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    if n_steps < 1 or (method == "riemann_trapezoid" and n_steps < 2):
        raise ValueError(f"n_steps={n_steps} is too small for method={method!r}; use >= 2.")
    n = n_steps
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return 0.5 * (x + 1.0), 0.5 * w
    if method == "riemann_trapezoid":
        # captum's weights: 1/n with the end points halved (they sum to (n - 1) / n)
        w = np.full(n, 1.0 / n)
        w[[0, -1]] *= 0.5
        return np.linspace(0.0, 1.0, n), w
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return (np.arange(n) + offset) / n, np.full(n, 1.0 / n)


def rows_per_pass_for(heads: int, genes: int) -> int:
    """Rows (steps x samples) integrated in one forward/backward pass."""
    return max(
        1, min(PASS_ELEMENTS // (heads * genes), PASS_PAIR_ELEMENTS // (heads * genes * genes))
    )


def _downstream(module, index: int, h_in: torch.Tensor, heads_out: torch.Tensor, backend):
    """Log-probabilities when layer ``index`` outputs ``heads_out`` for input ``h_in``."""
    h = module.block(index, h_in, heads_out)
    for j in range(index + 1, len(module.layers)):
        h = module.residual(j, h, module.layers[j](h, backend))
    return module.head(h)


def _attribute_batch(
    module,
    x: torch.Tensor,
    target: int,
    layers,
    alphas,
    weights,
    sums: dict,
    deltas: list,
    rows_per_pass: int,
) -> None:
    """Add one batch's attributions (summed over samples and heads) into ``sums[layer]``."""
    backend = module.backend(x)
    b, g = x.shape
    with torch.no_grad():
        lp_x, states = module(x, return_layers=True)
        _, states0 = module(torch.zeros(1, g, dtype=x.dtype, device=x.device), return_layers=True)
    f_x = lp_x[:, target]
    delta = torch.zeros(b, len(layers), dtype=torch.float64)
    a_t = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
    w_t = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    steps_per_pass = max(1, rows_per_pass // b)
    for li, index in enumerate(layers):
        layer = module.layers[index]
        h_in = states[index]
        with torch.no_grad():
            q, k, v = layer.qkv(h_in)
            q0, k0, _ = layer.qkv(states0[index])
            out_x = backend.fn(q, k, v)
            out_0 = backend.fn(q0.expand_as(q).contiguous(), k0.expand_as(k).contiguous(), v)
            diff = out_x - out_0
            f_0 = _downstream(module, index, h_in, out_0, backend)[:, target]
        gbar = torch.zeros_like(out_x)
        for s0 in range(0, len(alphas), steps_per_pass):
            a = a_t[s0 : s0 + steps_per_pass]
            n_s = a.shape[0]
            heads = out_0.unsqueeze(0) + a.view(-1, 1, 1, 1) * diff.unsqueeze(0)
            heads = heads.reshape(n_s * b, *out_x.shape[1:]).requires_grad_(True)
            with torch.enable_grad():
                lp = _downstream(module, index, h_in.repeat(n_s, 1), heads, backend)
                (grad,) = torch.autograd.grad(lp[:, target].sum(), heads)
            w = w_t[s0 : s0 + steps_per_pass].view(-1, 1, 1, 1)
            gbar += (grad.view(n_s, *out_x.shape) * w).sum(0)
        # completeness: sum_ij attr_ij = sum_i gbar_i (outx_i - out0_i)
        attr_sum = (gbar.double() * diff.double()).sum((1, 2))
        delta[:, li] = (attr_sum - (f_x.double() - f_0.double())).cpu()
        _accumulate(sums[index], q, k, v, q0[0], k0[0], gbar)
    deltas.append(delta)


@torch.no_grad()
def _accumulate(out: torch.Tensor, q, k, v, q0, k0, gbar) -> None:
    """``out += sum_{b,h} (Ax_bh - A0_h) * (gbar_bh outer v_bh)`` (diagonal left to caller).

    ``q, k, v, gbar`` are (batch, heads, genes); ``q0, k0`` (heads, genes). Block by block over
    query rows: the sample term never holds more than ``PAIR_BLOCK_ELEMENTS`` values.
    """
    b, h, g = q.shape
    n = b * h
    q2 = (q * LOG2E).reshape(n, g)
    kf = k.reshape(n, g)
    vf = v.reshape(n, g)
    gb = gbar.reshape(n, g)
    m2 = row_max(q2, kf)
    q02 = q0 * LOG2E
    m02 = row_max(q02, k0)
    v_h = v.permute(1, 0, 2)  # (H, B, G)
    g_h = gbar.permute(1, 2, 0)  # (H, G, B)
    step = max(1, min(g, PAIR_BLOCK_ELEMENTS // max(1, n * g)))
    for i0 in range(0, g, step):
        i1 = min(g, i0 + step)
        # sample maps, rows i0:i1, laid out (rows, samples*heads, genes)
        e = torch.addcmul(
            -m2[:, i0:i1].T.unsqueeze(-1), q2[:, i0:i1].T.unsqueeze(-1), kf.unsqueeze(0)
        )
        e.exp2_()
        coef = gb[:, i0:i1].T / e.sum(-1)  # gbar_i / Z_i, (rows, n)
        e.mul_(vf.unsqueeze(0))
        block = torch.bmm(coef.unsqueeze(1), e).squeeze(1)
        del e
        # baseline maps (one per head): A0_h * (sum_b gbar_bhi v_bhj)
        e0 = torch.addcmul(
            -m02[:, i0:i1].unsqueeze(-1), q02[:, i0:i1].unsqueeze(-1), k0.unsqueeze(1)
        ).exp2_()
        e0.div_(e0.sum(-1, keepdim=True))
        e0.mul_(torch.bmm(g_h[:, i0:i1], v_h))
        block.sub_(e0.sum(0))
        out[i0:i1] += block


def attribute_module(
    module, batches, target: int, layers, n_steps: int, method: str, n_samples: int
):
    """Mean over samples of the head-summed attributions, per layer; and the deltas.

    ``batches`` yields (batch, genes) float tensors on the module's device. Returns
    ``(scores, delta)`` with ``scores`` a float32 tensor (len(layers), genes, genes) whose
    diagonals are zero and ``delta`` (n_samples, len(layers)) float64.
    """
    alphas, weights = integration_points(n_steps, method)
    param = next(module.parameters())
    g = module.n_genes
    heads = module.layers[0].WQ.shape[0]
    scores = torch.zeros(len(layers), g, g, dtype=param.dtype, device=param.device)
    sums = {index: scores[li] for li, index in enumerate(layers)}
    rows_per_pass = rows_per_pass_for(heads, g)
    deltas: list = []
    was_training = module.training
    module.eval()
    try:
        for x in batches:
            _attribute_batch(
                module, x, target, layers, alphas, weights, sums, deltas, rows_per_pass
            )
    finally:
        module.train(was_training)
    scores /= n_samples
    scores.diagonal(dim1=-2, dim2=-1).zero_()
    delta = torch.cat(deltas) if deltas else torch.zeros(0, len(layers), dtype=torch.float64)
    return scores, delta
