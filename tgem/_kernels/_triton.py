"""The exact T-GEM attention as fused Triton kernels (the default on CUDA float32 tensors).

Same algorithm as :func:`tgem._kernels._exact.exact_attention` (its two-term base-2 query
scaling, closed-form row maxima and centred gradient sums), with every gene x gene quantity
kept in registers:

- the forward kernel (one program per batch-head row and block of ``BLOCK_M`` queries)
  accumulates, over key blocks, ``Z_i`` and ``sum_j e_ij v_j`` with
  ``e_ij = 2 ** (q_i log2(e) k_j - m2_i)``, the gene's own term ``j = i`` left out of the
  sums (added back to ``Z_i`` only); when gradients are needed, also the query-gradient sums
  ``sum_j e_ij (v_j - b_c)(k_j - a_c)`` and ``sum_j e_ij (k_j - a_c)`` for the three
  candidate shifts ``(a_c, b_c)`` of :func:`tgem._kernels._exact.exact_forward`, keeping per query
  the one whose subtracted term is smallest;
- the backward kernel (one program per row and block of ``BLOCK_M`` keys) recomputes
  ``e_ij`` and accumulates the column sums ``dv_j = sum_{i != j} A_ij g_i`` and
  ``dk_j = sum_{i != j} A_ij g_i q_i (v_j - out_i)`` term by term (on a GPU the difference
  per pair is free next to the exponential, so nothing cancels and no shift is needed).

Accumulation is float32 in ``(BLOCK_M, BLOCK_N)`` register tiles reduced once at the end, so
only ``O(batch x heads x genes)`` values ever reach memory. The kernels compile for CUDA
tensors; on CPU tensors they run under Triton's interpreter when ``TRITON_INTERPRET=1`` is
set (slow: for tests). The module never fails to import: without Triton the backend reports
itself unavailable and ``"auto"`` falls back to the pure-PyTorch exact path.
"""

import logging
import types

import torch
from torch.autograd.function import once_differentiable

from tgem._kernels._exact import scaled_queries, scaled_row_max
from tgem._kernels._registry import Backend, register_backend

logger = logging.getLogger(__name__)

try:  # optional dependency: the `gpu` extra
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    _TRITON_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install
    triton = tl = InterpretedFunction = JITFunction = None
    _TRITON_ERROR = (
        f"triton is not importable ({type(exc).__name__}: {exc}); "
        'install it with `pip install "tgem[gpu]"`'
    )

#: Per kernel: tile shape and warps, the fastest of ``benchmarks/bench_gpu.py``'s sweep
#: (results and the machine in benchmarks/README.md).
CONFIG = {
    "forward": {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4},
    "forward_nograd": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 2},
    "backward": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 2},
}
#: Small tiles for the interpreter, whose cost grows with the tile area it simulates.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 8, "num_warps": 1}


# ------------------------------------------------------------------------------ kernels
def _define_kernels() -> dict:
    """The two kernels as plain functions (compiled on first use by :func:`_kernel`).

    Defined inside a function so that this module imports without triton (the annotations
    need ``tl``), and kept undecorated so that each can be built both for the GPU and for the
    interpreter whatever ``TRITON_INTERPRET`` was at import.
    """

    def _forward_kernel(
        hi_ptr,
        lo_ptr,
        k_ptr,
        v_ptr,
        m2_ptr,
        cand_ptr,
        out_ptr,
        inv_z_ptr,
        t_ptr,
        G,
        NEED_GRAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0)
        i0 = tl.program_id(1) * BLOCK_M
        base = row.to(tl.int64) * G
        offs_i = i0 + tl.arange(0, BLOCK_M)
        in_i = offs_i < G
        hi = tl.load(hi_ptr + base + offs_i, mask=in_i, other=0.0)
        lo = tl.load(lo_ptr + base + offs_i, mask=in_i, other=0.0)
        m2 = tl.load(m2_ptr + base + offs_i, mask=in_i, other=0.0)
        k_i = tl.load(k_ptr + base + offs_i, mask=in_i, other=0.0)
        hi_2d = hi[:, None]
        lo_2d = lo[:, None]
        m2_2d = m2[:, None]
        # candidate shifts of keys (a) and values (b) for the query-gradient sums
        a0 = tl.load(cand_ptr + row * 6 + 0)
        a1 = tl.load(cand_ptr + row * 6 + 1)
        a2 = tl.load(cand_ptr + row * 6 + 2)
        b0 = tl.load(cand_ptr + row * 6 + 3)
        b1 = tl.load(cand_ptr + row * 6 + 4)
        b2 = tl.load(cand_ptr + row * 6 + 5)
        z_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        n_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        p0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        p1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        p2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for j0 in range(0, G, BLOCK_N):
            offs_j = j0 + tl.arange(0, BLOCK_N)
            in_j = offs_j < G
            k_j = tl.load(k_ptr + base + offs_j, mask=in_j, other=0.0)
            v_j = tl.load(v_ptr + base + offs_j, mask=in_j, other=0.0)
            kj_2d = k_j[None, :]
            x = hi_2d * kj_2d + (lo_2d * kj_2d - m2_2d)  # base-2 score minus row max
            e = tl.exp2(x)
            # only blocks holding the diagonal or the ragged end need the (costly) mask
            if (j0 + BLOCK_N > G) | ((j0 < i0 + BLOCK_M) & (j0 + BLOCK_N > i0)):
                keep = (offs_i[:, None] != offs_j[None, :]) & in_j[None, :]
                e = tl.where(keep, e, 0.0)
            z_acc += e
            n_acc += e * v_j[None, :]
            if NEED_GRAD:
                ka0 = k_j - a0
                ka1 = k_j - a1
                ka2 = k_j - a2
                p0 += e * ((v_j - b0) * ka0)[None, :]
                p1 += e * ((v_j - b1) * ka1)[None, :]
                p2 += e * ((v_j - b2) * ka2)[None, :]
                s0 += e * ka0[None, :]
                s1 += e * ka1[None, :]
                s2 += e * ka2[None, :]
        e_diag = tl.exp2(hi * k_i + (lo * k_i - m2))
        z = tl.sum(z_acc, axis=1) + e_diag
        inv_z = 1.0 / z
        out = tl.sum(n_acc, axis=1) * inv_z
        tl.store(out_ptr + base + offs_i, out, mask=in_i)
        tl.store(inv_z_ptr + base + offs_i, inv_z, mask=in_i)
        if NEED_GRAD:
            # per query, keep the shift whose subtracted term is smallest (first on ties)
            sub0 = (out - b0) * tl.sum(s0, axis=1)
            sub1 = (out - b1) * tl.sum(s1, axis=1)
            sub2 = (out - b2) * tl.sum(s2, axis=1)
            pick = tl.sum(p0, axis=1) - sub0
            a_pick = tl.zeros([BLOCK_M], dtype=tl.float32) + a0
            best = tl.abs(sub0)
            better = tl.abs(sub1) < best
            pick = tl.where(better, tl.sum(p1, axis=1) - sub1, pick)
            a_pick = tl.where(better, a1, a_pick)
            best = tl.where(better, tl.abs(sub1), best)
            better = tl.abs(sub2) < best
            pick = tl.where(better, tl.sum(p2, axis=1) - sub2, pick)
            a_pick = tl.where(better, a2, a_pick)
            t = (pick - e_diag * out * (k_i - a_pick)) * inv_z
            tl.store(t_ptr + base + offs_i, t, mask=in_i)

    def _backward_kernel(
        hi_ptr,
        lo_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        m2_ptr,
        out_ptr,
        inv_z_ptr,
        t_ptr,
        g_ptr,
        dq_ptr,
        dk_ptr,
        dv_ptr,
        G,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0)
        r0 = tl.program_id(1) * BLOCK_M  # this program's keys r (rows of the tile)
        base = row.to(tl.int64) * G
        offs_r = r0 + tl.arange(0, BLOCK_M)
        in_r = offs_r < G
        k_r = tl.load(k_ptr + base + offs_r, mask=in_r, other=0.0)
        v_r = tl.load(v_ptr + base + offs_r, mask=in_r, other=0.0)
        k_2d = k_r[:, None]
        v_2d = v_r[:, None]
        acc_v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_k = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, G, BLOCK_N):  # queries i (columns of the tile)
            offs_c = c0 + tl.arange(0, BLOCK_N)
            in_c = offs_c < G
            hi_c = tl.load(hi_ptr + base + offs_c, mask=in_c, other=0.0)
            lo_c = tl.load(lo_ptr + base + offs_c, mask=in_c, other=0.0)
            m2_c = tl.load(m2_ptr + base + offs_c, mask=in_c, other=0.0)
            q_c = tl.load(q_ptr + base + offs_c, mask=in_c, other=0.0)
            g_c = tl.load(g_ptr + base + offs_c, mask=in_c, other=0.0)
            iz_c = tl.load(inv_z_ptr + base + offs_c, mask=in_c, other=0.0)
            o_c = tl.load(out_ptr + base + offs_c, mask=in_c, other=0.0)
            w1 = g_c * iz_c
            w2 = w1 * q_c
            x = hi_c[None, :] * k_2d + (lo_c[None, :] * k_2d - m2_c[None, :])
            e = tl.exp2(x)
            if (c0 + BLOCK_N > G) | ((c0 < r0 + BLOCK_M) & (c0 + BLOCK_N > r0)):
                keep = (offs_r[:, None] != offs_c[None, :]) & in_c[None, :]
                e = tl.where(keep, e, 0.0)
            acc_v += e * w1[None, :]
            # dk term by term: A_ij g_i q_i (v_j - out_i), nothing to cancel
            acc_k += (e * w2[None, :]) * (v_2d - o_c[None, :])
        hi_r = tl.load(hi_ptr + base + offs_r, mask=in_r, other=0.0)
        lo_r = tl.load(lo_ptr + base + offs_r, mask=in_r, other=0.0)
        m2_r = tl.load(m2_ptr + base + offs_r, mask=in_r, other=0.0)
        q_r = tl.load(q_ptr + base + offs_r, mask=in_r, other=0.0)
        g_r = tl.load(g_ptr + base + offs_r, mask=in_r, other=0.0)
        iz_r = tl.load(inv_z_ptr + base + offs_r, mask=in_r, other=0.0)
        o_r = tl.load(out_ptr + base + offs_r, mask=in_r, other=0.0)
        t_r = tl.load(t_ptr + base + offs_r, mask=in_r, other=0.0)
        e_diag = tl.exp2(hi_r * k_r + (lo_r * k_r - m2_r))
        dk = tl.sum(acc_k, axis=1) - e_diag * (g_r * iz_r * q_r) * o_r
        tl.store(dv_ptr + base + offs_r, tl.sum(acc_v, axis=1), mask=in_r)
        tl.store(dk_ptr + base + offs_r, dk, mask=in_r)
        tl.store(dq_ptr + base + offs_r, g_r * t_r, mask=in_r)

    return {"forward": _forward_kernel, "backward": _backward_kernel}


_RAW: dict = {}
_KERNELS: dict = {}
#: Allocates the kernels' outputs; tests swap in a NaN-filled allocation to prove that every
#: element is written.
_empty = torch.empty_like


def _interpreter_mode() -> bool:
    """Whether triton was imported with ``TRITON_INTERPRET=1`` (its library is interpreted).

    Triton decides this once, when it is first imported: its own library functions
    (``tl.zeros``, ``tl.sum``) are then either compiled or interpreted for the whole process.
    """
    return _TRITON_ERROR is None and isinstance(tl.zeros, InterpretedFunction)


def _kernel(name: str, interpret: bool):
    """Kernel ``name`` compiled for the GPU (``JITFunction``) or wrapped for the interpreter.

    The interpreted copy gets its own globals dict, since the interpreter adds its names to
    the globals of the function it runs.
    """
    key = (name, interpret)
    if key not in _KERNELS:
        if not _RAW:
            _RAW.update(_define_kernels())
        fn = _RAW[name]
        if interpret:
            copy = types.FunctionType(
                fn.__code__, dict(fn.__globals__), fn.__name__, fn.__defaults__, fn.__closure__
            )
            copy.__module__, copy.__qualname__ = fn.__module__, fn.__qualname__
            copy.__annotations__ = dict(fn.__annotations__)
            _KERNELS[key] = InterpretedFunction(copy)
        else:
            _KERNELS[key] = JITFunction(fn)
    return _KERNELS[key]


# ------------------------------------------------------------------------- launching
def _shift_candidates(q, k, v):
    """Candidate (key, value) shifts per row for the query-gradient sums, each (N, 3).

    The values at the largest key and at the smallest key (where sharp rows peak for
    ``q >= 0`` and ``q < 0``) and the means (flat rows). Shifting ``k`` by ``a`` and ``v``
    by ``b`` leaves ``sum_j A_ij ([j != i] v_j - out_i) k_j`` unchanged, since the weights
    ``A_ij ([j != i] v_j - out_i)`` sum to zero over j; the shift closest to the row's peak
    keeps the two sums it is computed from small, so they do not cancel.
    """
    jmax = k.argmax(-1, keepdim=True)
    jmin = k.argmin(-1, keepdim=True)
    a = torch.cat([k.gather(-1, jmax), k.gather(-1, jmin), k.mean(-1, keepdim=True)], -1)
    b = torch.cat([v.gather(-1, jmax), v.gather(-1, jmin), v.mean(-1, keepdim=True)], -1)
    return a, b


def _check_inputs(q, k, v, interpret: bool | None) -> bool:
    """Validate the tensors; return whether to run the interpreter."""
    if _TRITON_ERROR is not None:
        raise ImportError(f"The Triton attention needs triton: {_TRITON_ERROR}.")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must have the same shape (batch, heads, genes); got {tuple(q.shape)}, "
            f"{tuple(k.shape)} and {tuple(v.shape)}."
        )
    if q.dim() < 1:
        raise ValueError("q, k and v need at least one dimension (genes); got scalars.")
    dtypes = {q.dtype, k.dtype, v.dtype}
    if dtypes != {torch.float32}:
        raise TypeError(
            f"The Triton attention computes in float32; got {sorted(map(str, dtypes))}. "
            "Convert the inputs with .float() or use attention_backend='exact'."
        )
    devices = {q.device, k.device, v.device}
    if len(devices) != 1:
        raise ValueError(f"q, k and v must be on one device; got {sorted(map(str, devices))}.")
    interpreting = _interpreter_mode()
    if interpret is None:
        interpret = interpreting
    if interpret and not interpreting:
        raise RuntimeError(
            "Triton's interpreter was asked for, but triton was imported without "
            "TRITON_INTERPRET=1 (triton reads it once, at its first import). Run in a fresh "
            "process started with TRITON_INTERPRET=1."
        )
    if not interpret and interpreting:
        raise RuntimeError(
            "triton was imported with TRITON_INTERPRET=1, so no kernel can be compiled in "
            "this process. Unset TRITON_INTERPRET (fresh process) or pass interpret=True."
        )
    if not interpret and q.device.type != "cuda":
        raise ValueError(
            f"The Triton attention runs on CUDA tensors; got tensors on {q.device}. Move them "
            "to a GPU, use attention_backend='exact', or run Triton's (slow) interpreter by "
            "starting Python with TRITON_INTERPRET=1."
        )
    return interpret


def _config(name: str, interpret: bool) -> tuple[dict, dict]:
    """(constexpr arguments, launch options) of kernel configuration ``name``."""
    cfg = dict(INTERPRETER_CONFIG if interpret else CONFIG[name])
    warps = cfg.pop("num_warps")
    return cfg, ({} if interpret else {"num_warps": warps})


def _gene_count(g: int, interpret: bool):
    """The kernels' ``G`` argument: an int, or for the interpreter a ``tl.constexpr``.

    The interpreter of triton 3.6 and older wraps an int argument in a one-element array and
    turns it back with ``int()`` where it bounds a loop, which NumPy 2.4 and newer refuse
    ("only 0-dimensional arrays can be converted to Python scalars"; fixed in triton 3.7).
    A constexpr reaches the kernel unwrapped. The compiled kernels keep ``G`` a runtime
    argument, so they are not specialised per gene count.
    """
    return tl.constexpr(g) if interpret else g


def _launch_forward(q, k, v, need_grad: bool, interpret: bool):
    """Run the forward kernel on (N, G) tensors.

    Returns ``out, inv_z, t`` and the per-query tensors the backward needs (``hi, lo, m2``:
    the two-term base-2 scaled queries and row maxima, as :func:`exact_forward` uses them).
    """
    n, g = q.shape
    q2 = scaled_queries(q)  # (N, G, 2): q * log2(e) as hi + lo
    hi, lo = q2[..., 0].contiguous(), q2[..., 1].contiguous()
    m2 = scaled_row_max(q2, k).contiguous()
    out = _empty(q)
    inv_z = _empty(q)
    t = _empty(q) if need_grad else out  # placeholder pointer, never written
    if need_grad:
        a, b = _shift_candidates(q, k, v)
        cand = torch.cat([a, b], dim=-1).contiguous()  # (N, 6)
    else:
        cand = m2  # placeholder pointer, never read
    cfg, launch = _config("forward" if need_grad else "forward_nograd", interpret)
    if n and g:
        grid = (n, triton.cdiv(g, cfg["BLOCK_M"]))
        _kernel("forward", interpret)[grid](
            hi,
            lo,
            k,
            v,
            m2,
            cand,
            out,
            inv_z,
            t,
            _gene_count(g, interpret),
            NEED_GRAD=need_grad,
            **cfg,
            **launch,
        )
    return out, inv_z, (t if need_grad else None), (hi, lo, m2)


def _launch_backward(q, k, v, scaled, out, inv_z, t, grad, interpret: bool):
    n, g = q.shape
    hi, lo, m2 = scaled
    dq, dk, dv = _empty(q), _empty(q), _empty(q)
    cfg, launch = _config("backward", interpret)
    if n and g:
        grid = (n, triton.cdiv(g, cfg["BLOCK_M"]))
        _kernel("backward", interpret)[grid](
            hi,
            lo,
            q,
            k,
            v,
            m2,
            out,
            inv_z,
            t,
            grad,
            dq,
            dk,
            dv,
            _gene_count(g, interpret),
            **cfg,
            **launch,
        )
    return dq, dk, dv


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, interpret):
        shape = q.shape
        g = shape[-1]
        q2, k2, v2 = (x.reshape(-1, g).contiguous() for x in (q, k, v))
        need = any(ctx.needs_input_grad[:3])
        out, inv_z, t, scaled = _launch_forward(q2, k2, v2, need, interpret)
        if need:
            ctx.save_for_backward(q2, k2, v2, *scaled, out, inv_z, t)
        ctx.shape, ctx.interpret = shape, interpret
        return out.reshape(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, hi, lo, m2, out, inv_z, t = ctx.saved_tensors
        g = grad.reshape(q.shape).contiguous()
        dq, dk, dv = _launch_backward(q, k, v, (hi, lo, m2), out, inv_z, t, g, ctx.interpret)
        s = ctx.shape
        return dq.reshape(s), dk.reshape(s), dv.reshape(s), None


def triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, interpret: bool | None = None
) -> torch.Tensor:
    """Exact T-GEM attention through the fused Triton kernels (float32).

    Parameters
    ----------
    q, k, v : torch.Tensor of shape (batch, heads, genes), float32
        Per-gene scalar queries, keys and values, all on one device.
    interpret : bool, optional
        Run the kernels in Triton's interpreter (any device; slow, for tests). Triton allows
        it only when the process imported triton with ``TRITON_INTERPRET=1`` set, and then
        nothing else: by default (``None``) the interpreter is used exactly in that case.
        Without it, only CUDA tensors are accepted.

    Returns
    -------
    torch.Tensor of shape (batch, heads, genes)
        ``out_i = sum_{j != i} softmax_j(q_i k_j) v_j``; differentiable once.

    Raises
    ------
    ImportError
        If triton is not installed.
    TypeError
        If the inputs are not float32.
    ValueError
        If shapes or devices do not match, or CPU tensors come without the interpreter.
    RuntimeError
        If ``interpret`` contradicts the mode triton was imported in.

    Examples
    --------
    >>> import torch
    >>> from tgem._kernels import reference_attention
    >>> q, k, v = torch.randn(3, 2, 1, 5).unbind(0)
    >>> dev = "cpu" if _interpreter_mode() else "cuda"  # a GPU, or TRITON_INTERPRET=1
    >>> if dev == "cuda" and not torch.cuda.is_available():
    ...     dev = None  # neither: nothing to run here
    >>> ok = dev is None or torch.allclose(
    ...     triton_attention(q.to(dev), k.to(dev), v.to(dev)).cpu(),
    ...     reference_attention(q, k, v), atol=1e-6)
    >>> ok
    True
    """
    interpret = _check_inputs(q, k, v, interpret)
    return _TritonAttention.apply(q, k, v, interpret)


def triton_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when the Triton backend runs on ``device``/``dtype``, else the reason.

    The backend claims CUDA float32 tensors only; the interpreter is never chosen
    automatically.

    Examples
    --------
    >>> import torch
    >>> triton_unavailable(torch.device("cpu"), torch.float32) is not None
    True
    """
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    if _interpreter_mode():
        return "triton was imported with TRITON_INTERPRET=1 (interpreter only)"
    device = torch.device(device)
    if device.type != "cuda":
        return f"the Triton kernels run on CUDA devices, not {device.type}"
    if dtype != torch.float32:
        return f"the Triton kernels compute in float32, not {dtype}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 7:
        return f"the GPU has compute capability {major}.x; Triton needs 7.0 or newer"
    return None


def _backend_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return triton_attention(q, k, v, interpret=False)


register_backend(Backend("triton", _backend_fn, triton_unavailable, priority=20))
