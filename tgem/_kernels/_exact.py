"""The exact O(genes) T-GEM attention in pure PyTorch: the backend ``"exact"``.

Same result as :func:`tgem._kernels._reference.reference_attention` (to rounding) without
storing more than one block of the gene x gene matrix: the scores are rank one, so the row
maximum has a closed form (``m_i = q_i * max_j k_j`` if ``q_i >= 0`` else
``q_i * min_j k_j``), the query gradient is a row sum accumulated in the forward pass and the
key/value gradients are column sums computed in a backward pass that recomputes the
exponentials. See ``docs/user_guide/attention.rst``.

The helpers shared by every implementation of the exact algorithm live here too
(:func:`scaled_queries`, :func:`scaled_row_max`, :func:`exact_function`, ...): the native,
compiled and Triton backends import them. ``"exact"`` is always available and is what
``"auto"`` falls back to.
"""

from __future__ import annotations

import torch

from tgem._kernels._registry import (
    Backend,
    always_available,
    check_once_differentiable,
    register_backend,
)

#: Largest number of gene-pair elements (batch x heads x rows x genes) held at once by the
#: blocked pure-PyTorch path. 2**22 float32 elements are 16 MiB per temporary.
BLOCK_ELEMENTS = 1 << 22


def _block_rows(batch_heads: int, genes: int, block_elements: int | None = None) -> int:
    budget = BLOCK_ELEMENTS if block_elements is None else block_elements
    return max(1, min(genes, budget // max(1, batch_heads * genes)))


MIN_BLOCK_ROWS = 32


def _row_chunks(batch_heads: int, genes: int, block_elements: int | None = None) -> list[slice]:
    """Even chunks of the batch x heads rows, each leaving blocks of >= MIN_BLOCK_ROWS genes.

    With many rows (Integrated Gradients runs 50 interpolation steps per sample) one block
    of the budget would hold only a gene or two per row, and the batched products would run
    as thousands of tiny (slow) matrices.
    """
    budget = BLOCK_ELEMENTS if block_elements is None else block_elements
    most = max(1, budget // (max(1, min(genes, MIN_BLOCK_ROWS)) * max(1, genes)))
    count = max(1, -(-batch_heads // most))  # one (empty) chunk for zero rows
    base, extra = divmod(batch_heads, count)
    bounds = [0]
    for i in range(count):
        bounds.append(bounds[-1] + base + (i < extra))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _by_row_chunks(fn, tensors, **kwargs):
    """``fn`` on each chunk of rows of the (N, G) ``tensors``, outputs concatenated."""
    chunks = _row_chunks(*tensors[0].shape, kwargs.get("block_elements"))
    if len(chunks) == 1:
        return None
    parts = [fn(*(t[c] for t in tensors), **kwargs) for c in chunks]
    return tuple(torch.cat(outs) for outs in zip(*parts))


#: log2(e): queries are scaled once so that every exponential is a base-2 one.
LOG2E = 1.4426950408889634


def scaled_queries(q: torch.Tensor) -> torch.Tensor:
    """``q * log2(e)`` as (N, G, K) terms whose sum is the scaled query.

    In float32 it is the pair (hi, lo) with ``hi = fl(q log2 e)`` and ``lo`` the rounding
    error: a single float32 ``log2 e`` would bias every exponent the same way, and those
    errors add up coherently in the sums (seen as twice the plain formulation's error in
    the key gradients). In float64 the single term is exact enough.
    """
    hi = q * LOG2E
    if q.dtype == torch.float64:
        return hi.unsqueeze(-1)
    lo = (q.double() * LOG2E - hi.double()).to(q.dtype)
    return torch.stack([hi, lo], dim=-1)


def scaled_row_max(q2: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Row maxima of the base-2 scores ``sum_K q2[..., K] * k_j`` in closed form."""
    kmax = k.amax(dim=-1, keepdim=True).unsqueeze(-1)
    kmin = k.amin(dim=-1, keepdim=True).unsqueeze(-1)
    return torch.where(q2[..., 0] >= 0, (q2 * kmax).sum(-1), (q2 * kmin).sum(-1))


#: Smallest base-2 exponent the PyTorch paths pass to ``exp2``, per dtype: ``2 ** floor`` is
#: the smallest normal float. Below it the exponential would be subnormal, and every operation
#: that produces or reads a subnormal float takes a microcode assist on x86 (about 100 cycles),
#: which slows a sharp attention's training step many times over (``bench_subnormal.py``).
#: ATen's threads never see a flush-to-zero setting (the native kernel sets
#: one in its own threads), so these paths keep the exponentials normal instead. Each raised
#: term was below ``2 ** floor`` of a row whose largest term is 1, so the sums move by at
#: most ``genes * 2 ** floor`` relative: far below rounding.
EXP2_FLOOR = {torch.float32: -126.0, torch.float64: -1022.0}

#: The same bound for the natural exponential ``exp`` (``log(2) * EXP2_FLOOR``, rounded up so
#: that the result stays normal).
EXP_FLOOR = {torch.float32: -87.33, torch.float64: -708.39}


def exp2_normal_(x: torch.Tensor) -> torch.Tensor:
    """``2 ** x`` in place, exponents below :data:`EXP2_FLOOR` raised to it (no subnormal).

    ``clamp_`` propagates NaN, so a non-finite score still shows in the result.
    """
    floor = EXP2_FLOOR.get(x.dtype)
    if floor is not None:
        x.clamp_(min=floor)
    return x.exp2_()


def _exp2_block(
    rows: torch.Tensor, cols: torch.Tensor, offset: int, out: torch.Tensor
) -> torch.Tensor:
    """2 ** (rows @ cols) for one block, own entries zeroed.

    ``rows`` is (N, r, K) and ``cols`` (N, K, G): the scaled score terms and the row-maximum
    shift, one product per term (the shift rides along as a term against a row or column of
    ones, so that no (N, r, G) shift is copied in per block). The entry (r, offset + r) is the
    diagonal of the full matrix. The result is written into ``out`` (a contiguous (N, r, G)
    view of a work buffer reused across blocks, so the loop does not page-fault a fresh
    allocation per block). Base 2 because ``exp2`` is several times faster than ``exp`` on
    CPUs; the queries come pre-scaled by log2(e) as :func:`scaled_queries` terms. Exponents
    below the normal range are raised to it (:func:`exp2_normal_`).
    """
    torch.bmm(rows, cols, out=out)
    exp2_normal_(out)
    out.diagonal(offset=offset, dim1=-2, dim2=-1).zero_()
    return out


#: Device types on which float32 attention has its gene sums (the products with the blocks of
#: exponentials) computed in float64. Blocked float32 sums (cuBLAS accumulates a long float32
#: dot product in one sequence; on CPU it depends on the BLAS) broke the float32 error rule
#: against the plain formulation on some machines. float64 sums make this eager path (the
#: no-compiler fallback; native and compiled do not use it) slower: the price of meeting the
#: rule on every machine.
FLOAT64_SUM_DEVICES = frozenset({"cpu", "cuda"})


def _sum_dtype(t: torch.Tensor) -> torch.dtype:
    if t.dtype == torch.float32 and t.device.type in FLOAT64_SUM_DEVICES:
        return torch.float64
    return t.dtype


def _buffer_view(buf: torch.Tensor, n: int, r: int, g: int) -> torch.Tensor:
    return buf[: n * r * g].view(n, r, g)


def exact_forward(q, k, v, block_elements: int | None = None):
    """Blocked row sums of the exact algorithm on (N, G) tensors.

    Returns ``out, m2, inv_z, e_diag``: the output, the base-2 row maxima, 1/Z and the
    diagonal exponentials (all (N, G)). The diagonal is excluded inside the sums (not
    subtracted afterwards), so a softmax that peaks on the gene itself loses no precision.
    """
    chunked = _by_row_chunks(exact_forward, (q, k, v), block_elements=block_elements)
    if chunked is not None:
        return chunked
    n, g = q.shape
    q2 = scaled_queries(q)  # (N, G, K)
    m2 = scaled_row_max(q2, k)
    # exponent of entry (i, j): sum_K q2[i, K] k_j - m2_i, as one (K + 1)-term product
    rows = torch.cat([q2, (-m2).unsqueeze(-1)], dim=-1)  # (N, G, K + 1)
    cols = torch.cat(
        [k.unsqueeze(1).expand(n, q2.shape[-1], g), torch.ones_like(k).unsqueeze(1)], dim=1
    )  # (N, K + 1, G)
    sum_dtype = _sum_dtype(q)
    # (N, 2, G); BLAS likes the .mT view
    rhs_t = torch.stack([torch.ones_like(v), v], dim=1).to(sum_dtype)
    sums = torch.empty(n, g, 2, dtype=sum_dtype, device=q.device)
    step = _block_rows(n, g, block_elements)
    buf = torch.empty(n * step * g, dtype=q.dtype, device=q.device)
    for i0 in range(0, g, step):
        i1 = min(g, i0 + step)
        e = _exp2_block(rows[:, i0:i1], cols, i0, _buffer_view(buf, n, i1 - i0, g))
        sums[:, i0:i1] = torch.bmm(e.to(sum_dtype), rhs_t.mT)
    e_diag = diagonal_exp2(q2, k, m2)
    inv_z = (sums[..., 0] + e_diag).reciprocal()
    return (sums[..., 1] * inv_z).to(q.dtype), m2, inv_z.to(q.dtype), e_diag


def diagonal_exp2(q2: torch.Tensor, k: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """The diagonal exponentials ``2 ** (q2_i k_i - m2_i)``, kept normal (:func:`exp2_normal_`)."""
    return exp2_normal_((q2 * k.unsqueeze(-1)).sum(-1) - m2)


def exact_backward(q, k, v, m2, inv_z, e_diag, out, grad, block_elements: int | None = None):
    """Blocked gradient sums of the exact algorithm; returns ``dq, dk, dv`` on (N, G) tensors.

    With ``D_ij = e_ij (v_j - out_i)`` for ``j != i`` (``e`` recomputed block by block):
    ``dv_j = sum_{i != j} e_ij g_i / Z_i``,
    ``dk_j = sum_i D_ij g_i q_i / Z_i - e_jj g_j q_j out_j / Z_j`` and
    ``dq_i = g_i / Z_i (sum_j D_ij k_j - e_ii out_i k_i)``. The difference ``v_j - out_i`` is
    taken element by element, as the plain formulation's softmax backward does: the
    gradients are covariances under the attention distribution and, summed as differences
    of plain sums, they would cancel catastrophically for sharp softmaxes.
    """
    chunked = _by_row_chunks(
        exact_backward, (q, k, v, m2, inv_z, e_diag, out, grad), block_elements=block_elements
    )
    if chunked is not None:
        return chunked
    n, g = q.shape
    q2 = scaled_queries(q).transpose(1, 2)  # (N, K, G)
    # transposed blocks: entry (j, i) has exponent sum_K k_j q2[K, i] - m2_i
    rows = torch.cat(
        [k.unsqueeze(-1).expand(n, g, q2.shape[1]), torch.ones_like(k).unsqueeze(-1)], dim=-1
    )  # (N, G, K + 1)
    cols = torch.cat([q2, (-m2).unsqueeze(1)], dim=1)  # (N, K + 1, G)
    w1 = grad * inv_z
    w2 = w1 * q
    dv = torch.empty_like(q)
    dk = torch.empty_like(q)
    # matrix-vector products as (N, 1, G) rows seen through .mT: BLAS then takes the fast
    # GEMV path (the (N, G, 1) column layout runs ~7x slower on CPU)
    sum_dtype = _sum_dtype(q)
    w1_col = w1.unsqueeze(1).mT.to(sum_dtype)
    w2_col = w2.unsqueeze(1).mT.to(sum_dtype)
    k_sum = k.to(sum_dtype)
    # dq's row sums arrive one key block at a time; they are differences of large terms
    # (covariances under the attention), so the running total is kept in float64 (N x G
    # values: free next to the G^2 work), which keeps dq within the plain formulation's error
    acc_dtype = torch.float64 if q.dtype == torch.float32 else q.dtype
    dq_sum = torch.zeros(n, 1, g, dtype=acc_dtype, device=q.device)
    dq_block = torch.empty(n, 1, g, dtype=sum_dtype, device=q.device)
    step = _block_rows(n, g, block_elements)
    buf = torch.empty(n * step * g, dtype=q.dtype, device=q.device)
    diff_buf = torch.empty_like(buf)
    out_row = out[:, None, :]
    for j0 in range(0, g, step):
        j1 = min(g, j0 + step)
        # rows are keys j, columns are queries i: entry 2 ** (k_j q2_i - m2_i), own entry 0
        e = _exp2_block(rows[:, j0:j1], cols, j0, _buffer_view(buf, n, j1 - j0, g))
        d = e.to(sum_dtype)
        dv[:, j0:j1] = torch.bmm(d, w1_col).squeeze(-1)
        diff = torch.sub(v[:, j0:j1, None], out_row, out=_buffer_view(diff_buf, n, j1 - j0, g))
        # D, transposed: rows j, columns i; in the sum dtype (float64 on CPU and CUDA), where
        # an exponential near the bottom of float32's range times a difference stays normal
        d.mul_(diff)
        dk[:, j0:j1] = torch.bmm(d, w2_col).squeeze(-1)
        dq_sum += torch.bmm(k_sum[:, None, j0:j1], d, out=dq_block)
    diag = e_diag * out
    dq = w1 * (dq_sum.squeeze(1).to(q.dtype) - diag * k)
    dk -= diag * w2
    return dq, dk, dv


def exact_function(name: str, forward_sums, backward_sums) -> type[torch.autograd.Function]:
    """An autograd function for an implementation of the exact algorithm.

    ``forward_sums(q, k, v)`` takes contiguous (N, G) tensors and returns
    ``out, m2, inv_z, e_diag`` (see :func:`exact_forward`); ``backward_sums(q, k, v, m2,
    inv_z, e_diag, out, grad)`` returns ``dq, dk, dv`` (see :func:`exact_backward`). Every
    backend of the exact algorithm shares this wrapper: the reshaping, what is saved for
    the backward pass, and the clear error on double backward.
    """

    def forward(ctx, q, k, v):
        shape = q.shape
        g = shape[-1]
        q2, k2, v2 = (x.reshape(-1, g).contiguous() for x in (q, k, v))
        out, m2, inv_z, e_diag = forward_sums(q2, k2, v2)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(q2, k2, v2, m2, inv_z, e_diag, out)
        ctx.shape = shape
        return out.reshape(shape)

    def backward(ctx, grad):
        check_once_differentiable(name)
        q, k, v, m2, inv_z, e_diag, out = ctx.saved_tensors
        g = grad.reshape(q.shape).contiguous()
        dq, dk, dv = backward_sums(q, k, v, m2, inv_z, e_diag, out, g)
        s = ctx.shape
        return dq.reshape(s), dk.reshape(s), dv.reshape(s)

    cls_name = f"_{name.capitalize()}Attention"
    return type(
        cls_name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


_ExactAttention = exact_function("exact", exact_forward, exact_backward)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact T-GEM attention in O(batch x heads x genes) memory, in pure PyTorch.

    Same result as :func:`reference_attention` (to rounding), never holding more than
    ``BLOCK_ELEMENTS`` gene-pair values at once. Differentiable once (double backward raises).

    Parameters
    ----------
    q, k, v : torch.Tensor of shape (batch, heads, genes)

    Returns
    -------
    torch.Tensor of shape (batch, heads, genes)

    Examples
    --------
    >>> import torch
    >>> from tgem._kernels import reference_attention
    >>> q, k, v = torch.randn(3, 2, 1, 5, dtype=torch.float64).unbind(0)
    >>> torch.allclose(exact_attention(q, k, v), reference_attention(q, k, v))
    True
    """
    return _ExactAttention.apply(q, k, v)


register_backend(Backend("exact", exact_attention, always_available, priority=0))
