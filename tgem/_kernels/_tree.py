"""T-GEM attention in O(G log G) by a tree code on the rank-1 scores (pure PyTorch).

Per head the scores are rank one, ``s_ij = q_i k_j``. With the closed-form row maximum
(``m_i = q_i max k`` if ``q_i >= 0`` else ``q_i min k``) every softmax weight is

    e_ij = exp(q_i k_j - m_i) = exp(-t_i d_j),   t_i = |q_i| >= 0,
    d_j = max k - k_j (queries with q_i >= 0)  or  k_j - min k (q_i < 0),  d_j >= 0,

so every sum of the forward and backward passes is a one-dimensional exponential sum
``S(t) = sum_j w_j exp(-t d_j)`` evaluated at many points ``t`` (see
``shared/design/rank1-tree.md``):

* forward (row sums over the keys, per query, one tree per sign of ``q``): ``w`` in
  ``{1, v}``, plus ``{v k, k}`` for the query gradient when a backward pass will follow;
  ``out_i = (N_i - e_ii v_i) / Z_i`` (softmax over all keys, then the own entry set to 0
  without renormalising, as the model defines it);
* backward (column sums over the queries, per key; the kernel ``exp(-t d)`` is symmetric, so
  these are trees over the queries of each sign evaluated at the keys' ``d``): weights
  ``g/Z``, ``g q/Z`` and ``g q out/Z`` give ``dv`` and ``dk``; ``dq`` comes from the row sums;
* attention entropy (of the softmax before the diagonal is zeroed):
  ``H_i = log Z_i + t_i S_d(t_i) / Z_i`` with ``w = d``.

The tree code
-------------
The source points are sorted and cut into a count-balanced binary tree whose levels are
contiguous slices of the sorted order (padded with zero-weight copies of the largest point).
Each node keeps its centre ``c``, radius ``r`` and the Taylor moments
``M_n = sum_j w_j ((d_j - c) / r)^n / n!`` (``n < P``), normalised by the radius so that no
term exceeds ``|w_j|`` whatever the scale of the points: computed at the leaves, then
translated up the tree. A target ``t`` walks down from the root, all targets of all rows at
once, level by level:

* **skip** a node when ``t * dmin > CUT``: each skipped term is below ``exp(-CUT) |w_j|``;
* **expand** when ``t * r <= RHO``: ``sum_j w_j exp(-t d_j) = exp(-t c) sum_n (-t r)^n M_n``;
* **sum directly** at the leaves otherwise, and **descend** to the two children otherwise.

A row whose largest ``t`` times its points' radius is at most ``RHO`` (the usual case with
weights as initialised) needs no sort and no tree: one expansion about the centre.

Error bound and its metric
--------------------------
An expansion's remainder is at most ``exp(2 RHO) RHO^P / P!`` times ``sum_j |w_j| exp(-t d_j)``
(the same form as rounding error: relative to the sum of the absolute terms), and all skipped
terms together at most ``G exp(-CUT) max_j |w_j|``. ``tol`` sets both: ``P`` is the smallest
order with ``exp(2 RHO) RHO^P / P! <= tol`` and ``CUT = log(G / tol)``. For the output this
gives an error of at most about ``2 tol max_j |v_j|``; the gradients likewise relative to the
scale of their terms.

The metric the tests and the docs use: the maximum absolute error of the output and of each
gradient against the float64 reference, divided by the larger of the reference's largest entry
and the scale of the terms the result sums (``max|v|`` for the output, ``max|g| max|v| max|k|``
for ``dq``, ``max|g| max|v| max|q|`` for ``dk``, ``max|g|`` for ``dv``: the scales of the
float32 rule). It is at most ``tol`` for every ``tol`` in :data:`TOL_RANGE` (1e-13 to 0.1)
in every test (measured 0.1 to 0.5 ``tol``: the remainder bound is pessimistic); the lower end
is where float64's rounding (below) takes over. The scale matters for the gradients only: where
attention is sharp, ``dk`` is a small difference of large terms, and its error is then small
against its terms but not against its own largest entry; the output's error stays below
``tol`` of the reference's largest entry. Defaults (:data:`DEFAULT_TOL`): ``1e-9`` for
float32 (``P = 28`` at ``RHO = 4``; 60x below float32's unit roundoff, so the float32 rule of
the exact paths holds with room to spare) and ``1e-13`` for float64 (``P = 33``). Rows
expanded once about their centre use the smallest order that meets ``tol`` at their own largest
``t * r`` (6 to 9 terms with weights as initialised).

All sums are computed in float64, float32 inputs included, and the results are rounded once to
the input dtype, subnormal results flushed to zero. An expansion's alternating Taylor sum
loses up to ``exp(2 RHO)`` (about 3,000) ulps of float64 to rounding, relative to the same
sum of absolute terms: at most 7e-13 (measured below 2e-14 in the metric above), far below
float32's rounding, and the floor of the float64 error whatever ``tol`` asks for: hence the
smallest accepted ``tol``, 1e-13. Half
precision is refused, as by the other fast paths. The work is ``O(G log G)`` per row for the
sorts and the tree builds and about ``P`` to a few hundred terms per query for the traversal,
nearly independent of ``G``.

Two implementations, one algorithm
----------------------------------
This module holds the algorithm and its pure-PyTorch sums (backend ``"tree"``: any device
with float64, CUDA included; what a machine without a C compiler runs). The same algorithm in
C (``tgem/_csrc/tree.c``, backend ``"tree_native"``, :mod:`tgem._kernels._tree_native`) does
the whole forward and backward pass of each row in one C call, with the formulas of
:func:`tree_forward` and :func:`tree_backward`; its entropy plugs its C row sums in through
:func:`entropy_rows` (a subclass of :class:`_Sides` that overrides ``row_sums`` and
``column_sums``; :func:`tree_function` takes such a subclass too). The parameters
(:func:`tree_parameters`, ``EXP_FLOOR``, ``EXP_MARGIN``) are shared. The C code walks the tree
depth first per target and uses, at each expansion, the fewest terms that meet ``tol`` there
(this module uses ``P`` inside the tree), and computes its own exponentials, so the two agree
within ``tol``, not bitwise. Which runs when: ``"tree"`` is always this module;
``"tree_native"`` always the C code, and is unavailable (saying why) off CPU, without the
built extension or under ``TGEM_DISABLE_NATIVE=1``. ``"auto"`` never picks ``"tree"``; it
runs ``"tree_native"`` instead of the dense native kernel where that is faster
(:func:`tgem._kernels._tree_native.auto_reach`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tgem._kernels._registry import (
    TOL_RANGE,
    Backend,
    check_once_differentiable,
    check_tolerance,
    register_backend,
)

#: Expansion radius: a node is expanded for target ``t`` when ``t * radius <= RHO``. Larger
#: radii need more terms but fewer nodes; 4 was the fastest of 1, 2, 3, 4 and 6 on sharp
#: attention at 1,708 genes (2 CPU threads).
RHO = 4.0
#: Largest leaf size; leaves hold between LEAF // 2 and LEAF points.
LEAF = 32
#: Default tolerance per dtype (see the module docstring for the bound and its metric).
DEFAULT_TOL = {torch.float32: 1e-9, torch.float64: 1e-13}
#: Accepted tolerance range (the registry's, for every backend that takes a tolerance).
MIN_TOL, MAX_TOL = TOL_RANGE
#: Largest number of (row, target) pairs one tree traversal handles at once; rows are
#: processed in chunks below it, which bounds the traversal's index arrays. Larger chunks
#: mean fewer (and larger) tensor operations: the tree build runs P operations per level.
TARGET_BUDGET = 1 << 19
#: Largest number of expansions (or leaf sums) gathered at once: (GATHER_BATCH, P, C) moments.
GATHER_BATCH = 1 << 16
#: Exponents below ``-(CUT + EXP_MARGIN)`` are clamped there: such terms are negligible
#: against the tolerance, and clamping keeps every exponential a normal float (subnormal
#: arithmetic is many times slower on x86).
EXP_MARGIN = 60.0
#: Largest exponent magnitude of a diagonal term: exp(-700) is still a normal float64.
EXP_FLOOR = 700.0
WORK = torch.float64


@dataclass(frozen=True)
class TreeParameters:
    """Expansion order and thresholds chosen from a tolerance.

    Attributes
    ----------
    tol : float
        Bound on the relative error of each sum (see the module docstring).
    order : int
        Number of Taylor moments ``P``.
    rho : float
        Expansion radius ``RHO``.
    cut : float
        Skip threshold ``CUT = log(genes / tol)``.
    """

    tol: float
    order: int
    rho: float
    cut: float


def expansion_bound(order: int, rho: float | None = None) -> float:
    """The Taylor remainder bound ``exp(2 rho) rho^order / order!`` of one expansion."""
    rho = RHO if rho is None else rho
    if rho <= 0:
        return 0.0
    return math.exp(2 * rho + order * math.log(rho) - math.lgamma(order + 1))


def check_tol(tol) -> float:
    """``tol`` as a float, or ``ValueError`` naming the accepted range and the defaults."""
    try:
        return check_tolerance(tol)
    except ValueError as exc:
        raise ValueError(
            f"{exc} None takes the dtype's default ({DEFAULT_TOL[torch.float32]:g} for "
            f"float32, {DEFAULT_TOL[torch.float64]:g} for float64)."
        ) from None


def expansion_order(tol: float, rho: float) -> int:
    """The smallest order ``P >= 1`` with ``expansion_bound(P, rho) <= tol``."""
    order = 1
    while expansion_bound(order, rho) > tol:
        order += 1
    return order


def tree_parameters(dtype: torch.dtype, genes: int, tol: float | None = None) -> TreeParameters:
    """Order ``P`` and thresholds for ``dtype``, ``genes`` points and tolerance ``tol``.

    Examples
    --------
    >>> import torch
    >>> tree_parameters(torch.float32, 1708).order
    28
    >>> tree_parameters(torch.float64, 1708).order
    33
    """
    tol = DEFAULT_TOL.get(dtype, DEFAULT_TOL[torch.float32]) if tol is None else check_tol(tol)
    return TreeParameters(tol, expansion_order(tol, RHO), RHO, math.log(max(genes, 1) / tol))


# --------------------------------------------------------------- moments and expansions
def _moments(u: torch.Tensor, w: torch.Tensor, order: int) -> torch.Tensor:
    """Taylor moments ``sum_s w[..., s, :] u[..., s]^n / n!`` as (order, ..., C).

    ``u`` is (..., S), ``w`` (..., S, C).
    """
    powers = torch.empty((*u.shape[:-1], order, u.shape[-1]), dtype=u.dtype, device=u.device)
    powers[..., 0, :] = 1.0
    for n in range(1, order):
        torch.mul(powers[..., n - 1, :], u / n, out=powers[..., n, :])
    return torch.matmul(powers, w).movedim(-2, 0)


def _normalised(offsets: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """``offsets / radius`` in [-1, 1], 0 where the radius is 0 (all points at the centre)."""
    r = radius.unsqueeze(-1)
    return torch.where(r > 0, offsets / torch.where(r > 0, r, 1.0), 0.0)


def _translate(moments: torch.Tensor, ratio: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Normalised moments about ``c`` with radius ``r`` (order, ..., C) re-expressed about
    ``c - delta * R`` with radius ``R``, where ``ratio = r / R`` and ``delta`` is in units of R.

    ``M'_n = sum_{m <= n} M_m ratio^m delta^(n - m) / (n - m)!``; with ``ratio <= 1`` and
    ``|delta| <= 1`` no factor exceeds 1, whatever the scale of the points.
    """
    order = moments.shape[0]
    scale = torch.ones_like(ratio).unsqueeze(-1)
    moments = moments.clone()
    for m in range(1, order):
        scale = scale * ratio.unsqueeze(-1)
        moments[m] *= scale
    out = moments.clone()
    step = delta.unsqueeze(-1)
    factor = torch.ones_like(step)
    for shift in range(1, order):
        factor = factor * step / shift
        out[shift:] += moments[: order - shift] * factor
    return out


def _exp_neg(x: torch.Tensor, cut: float) -> torch.Tensor:
    """``exp(-x)`` for ``x >= 0``, exponents clamped at ``-(cut + EXP_MARGIN)``."""
    return torch.exp(-x.clamp(max=cut + EXP_MARGIN))


def _neg_powers(t: torch.Tensor, order: int) -> torch.Tensor:
    """``(-t)^n`` for ``n < order``, shape ``(*t.shape, order)``."""
    powers = torch.empty((*t.shape, order), dtype=t.dtype, device=t.device)
    powers[..., 0] = 1.0
    if order > 1:
        torch.cumprod((-t).unsqueeze(-1).expand(*t.shape, order - 1), -1, out=powers[..., 1:])
    return powers


def _expand(moments, t, centre, radius, cut: float) -> torch.Tensor:
    """``exp(-t c) sum_n (-t r)^n M_n`` for normalised moments ``M_n`` (E, P, C) of nodes of
    centre ``c`` and radius ``r``; ``t``, ``centre`` and ``radius`` (E,)."""
    powers = _neg_powers(t * radius, moments.shape[1]).unsqueeze(1)  # (E, 1, P)
    acc = torch.bmm(powers, moments).squeeze(1)
    return acc * _exp_neg(t * centre, cut).unsqueeze(-1)


# ------------------------------------------------------------------------ the evaluator
def exp_sums(
    points: torch.Tensor,
    weights: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    params: TreeParameters,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[r, m, :] += sum_s weights[r, s, :] exp(-targets[r, m] points[r, s])``.

    Parameters
    ----------
    points : (R, S) tensor, >= 0
        Source points of each independent problem (row).
    weights : (R, S, C) tensor
        Weight columns; all columns share one traversal.
    targets : (R, M) tensor, >= 0
        Evaluation points.
    valid : (R, M) bool tensor
        Targets to evaluate; the others get 0.
    params : TreeParameters
    out : (R, M, C) tensor, optional
        Accumulator (float64) the sums are added to; a zero one is made when not given.

    Returns
    -------
    (R, M, C) tensor, float64 (the working dtype of all inputs): ``out``.
    """
    n_rows, n_targets = targets.shape
    if out is None:
        out = torch.zeros(n_rows, n_targets, weights.shape[-1], dtype=WORK, device=points.device)
    if n_rows == 0 or n_targets == 0 or points.shape[1] == 0:
        return out
    t_max = torch.where(valid, targets, 0.0).amax(1)
    p_min, p_max = points.amin(1), points.amax(1)
    active = valid.any(1)
    cheap = active & (t_max * (0.5 * (p_max - p_min)) <= params.rho)
    tree = active & ~cheap
    # one host sync to split the rows; everything after is batched over the rows of each kind
    n_cheap, n_tree = (int(x) for x in torch.stack([cheap.sum(), tree.sum()]).tolist())
    if n_cheap == n_rows:  # the usual case with weights as initialised: no copies
        return out.add_(_root_expansion(points, weights, targets, valid, params))
    if n_cheap:
        rows = cheap.nonzero().squeeze(1)
        part = _root_expansion(points[rows], weights[rows], targets[rows], valid[rows], params)
        out.index_add_(0, rows, part)
    if n_tree:
        per_chunk = max(1, TARGET_BUDGET // (n_targets + points.shape[1]))
        for rows in tree.nonzero().squeeze(1).split(per_chunk):
            part = _tree_sums(points[rows], weights[rows], targets[rows], valid[rows], params)
            out.index_add_(0, rows, part)
    return out


def _root_expansion(points, weights, targets, valid, params: TreeParameters) -> torch.Tensor:
    """One expansion about the centre of each row's points (rows with small ``t * r``).

    The order is the smallest that meets the tolerance at these rows' largest ``t * r``
    (6 to 9 terms with weights as initialised, instead of the tree's ``P``).
    """
    p_min, p_max = points.amin(1), points.amax(1)
    centre, radius = 0.5 * (p_min + p_max), 0.5 * (p_max - p_min)
    live_t = torch.where(valid, targets, 0.0)  # powers of the others could overflow
    reach = float((live_t.amax(1) * radius).max())
    order = min(params.order, expansion_order(params.tol, reach))
    moments = _moments(_normalised(points - centre[:, None], radius), weights, order)  # (P, R, C)
    acc = torch.bmm(_neg_powers(live_t * radius[:, None], order), moments.movedim(0, 1))
    scale = _exp_neg(targets * centre[:, None], params.cut)
    return acc.mul_(torch.where(valid, scale, 0.0)[..., None])


@dataclass
class _Level:
    dmin: torch.Tensor  # (R * nodes,)
    radius: torch.Tensor
    centre: torch.Tensor
    moments: torch.Tensor  # (R * nodes, P, C)


def _build(points, weights, order: int, reach: torch.Tensor | None = None, rho: float = RHO):
    """Sorted, padded points and the levels of the count-balanced tree over them.

    With ``reach`` (each row's largest target), the tree stops at the first level where every
    node satisfies ``reach * radius <= rho``: no target descends below it, so its moments are
    computed there from the points and the levels below are never built.

    Returns the levels (root first), the last level's points (nodes, size) and weights
    (nodes, size, C), and the index of the last level.
    """
    n_rows, size = points.shape
    depth = max(0, math.ceil(math.log2(size / LEAF))) if size > LEAF else 0
    leaf = -(-size // (1 << depth))
    padded = leaf << depth
    d, order_idx = torch.sort(points, dim=1)
    w = torch.gather(weights, 1, order_idx[..., None].expand_as(weights))
    if padded > size:
        d = torch.cat([d, d[:, -1:].expand(n_rows, padded - size)], 1)
        w = torch.cat([w, w.new_zeros(n_rows, padded - size, w.shape[-1])], 1)
    if reach is not None and depth > 0:
        wide = []
        for lev in range(depth):
            nodes = d.view(n_rows, 1 << lev, -1)
            radius = 0.5 * (nodes[..., -1] - nodes[..., 0])
            wide.append((reach[:, None] * radius > rho).any())
        enough = [i for i, w_ in enumerate(torch.stack(wide).tolist()) if not w_]
        depth = enough[0] if enough else depth
    nodes_d = d.view(n_rows, 1 << depth, -1)
    dmin, dmax = nodes_d[..., 0], nodes_d[..., -1]
    centre = 0.5 * (dmin + dmax)
    moments = _moments(
        _normalised(nodes_d - centre[..., None], 0.5 * (dmax - dmin)),
        w.view(n_rows, 1 << depth, nodes_d.shape[-1], -1),
        order,
    )  # (P, R, nodes, C), normalised by each node's radius
    levels = [None] * (depth + 1)
    for lev in range(depth, -1, -1):
        levels[lev] = _Level(
            dmin.reshape(-1), (0.5 * (dmax - dmin)).reshape(-1), centre.reshape(-1),
            moments.movedim(0, 2).reshape(-1, order, moments.shape[-1]),
        )  # fmt: skip
        if lev == 0:
            break
        p_min, p_max = dmin[:, 0::2], dmax[:, 1::2]
        p_centre, p_radius = 0.5 * (p_min + p_max), 0.5 * (p_max - p_min)
        up = p_radius.repeat_interleave(2, dim=1)
        positive = up > 0
        safe = torch.where(positive, up, 1.0)
        ratio = torch.where(positive, 0.5 * (dmax - dmin) / safe, 0.0)
        delta = torch.where(positive, (centre - p_centre.repeat_interleave(2, dim=1)) / safe, 0.0)
        moved = _translate(moments, ratio, delta)
        moments = moved.reshape(order, n_rows, -1, 2, moved.shape[-1]).sum(3)
        dmin, dmax, centre = p_min, p_max, p_centre
    size_last = nodes_d.shape[-1]
    return levels, d.view(-1, size_last), w.view(-1, size_last, w.shape[-1]), depth


def _tree_sums(points, weights, targets, valid, params: TreeParameters) -> torch.Tensor:
    """The tree code for rows whose targets need more than one expansion."""
    n_rows, n_targets = targets.shape
    n_cols = weights.shape[-1]
    reach = torch.where(valid, targets, 0.0).amax(1)
    levels, leaf_d, leaf_w, depth = _build(points, weights, params.order, reach, params.rho)
    out = torch.zeros(n_rows * n_targets, n_cols, dtype=WORK, device=points.device)
    flat = valid.reshape(-1).nonzero().squeeze(1)  # row * M + target of each live pair
    row = flat // n_targets
    t = targets.reshape(-1)[flat]
    node = torch.zeros_like(flat)
    for lev in range(depth + 1):
        level = levels[lev]
        idx = row * (1 << lev) + node
        live = t * level.dmin[idx] <= params.cut
        expand = live & (t * level.radius[idx] <= params.rho)
        rest = live & ~expand
        for part in expand.nonzero().squeeze(1).split(GATHER_BATCH):
            at = idx[part]
            moments = level.moments.index_select(0, at)
            expanded = _expand(moments, t[part], level.centre[at], level.radius[at], params.cut)
            out.index_add_(0, flat[part], expanded)
        sel = rest.nonzero().squeeze(1)
        if sel.numel() == 0:
            break
        if lev == depth:  # direct sums at the last level's nodes (the leaves)
            for part in sel.split(GATHER_BATCH):
                at = idx[part]
                e = _exp_neg(t[part, None] * leaf_d[at], params.cut)
                out.index_add_(0, flat[part], torch.bmm(e.unsqueeze(1), leaf_w[at]).squeeze(1))
            break
        flat, row, t = (x[sel].repeat_interleave(2) for x in (flat, row, t))
        node = (2 * node[sel, None] + torch.arange(2, device=node.device)).reshape(-1)
    return out.view(n_rows, n_targets, n_cols)


# ------------------------------------------------------------------------ the attention
def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, finite: bool = True
) -> None:
    """Types, dtypes, shapes and (with ``finite``) finiteness of the inputs; ``ValueError``."""
    tensors = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"tree attention computes in float32 or float64, got {name} of dtype {x.dtype}; "
                "convert with .float() (half precision is not supported)."
            )
        if x.shape != q.shape or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"q, k and v must share shape, dtype and device; got q {tuple(q.shape)} "
                f"{q.dtype} on {q.device} and {name} {tuple(x.shape)} {x.dtype} on {x.device}."
            )
    if q.dim() == 0 or q.shape[-1] == 0:
        raise ValueError(
            f"q, k and v need a last (genes) axis of length >= 1, got {tuple(q.shape)}"
        )
    if not finite:
        return
    for name, x in tensors.items():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(
                f"{name} holds {bad} non-finite value(s) (inf or nan); the attention of such "
                "inputs is undefined. Check the model's weights and inputs for overflow."
            )


class _Sides:
    """Per-row quantities of the rank-1 reduction, in the working dtype, (N, G) each."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor):
        self.q, self.k = q, k
        kmax, kmin = k.amax(1, keepdim=True), k.amin(1, keepdim=True)
        self.pos = q >= 0
        self.t = q.abs()
        self.d_plus, self.d_minus = kmax - k, k - kmin
        self.d_own = torch.where(self.pos, self.d_plus, self.d_minus)
        # exp(q_i k_i - m_i) <= 1, its exponent clamped where the result would be subnormal
        self.e_diag = torch.exp(-(self.t * self.d_own).clamp(max=EXP_FLOOR))

    def row_sums(self, weights, params: TreeParameters) -> torch.Tensor:
        """``sum_j w_j exp(q_i k_j - m_i)`` per query.

        ``weights`` is one (N, G, C) tensor for both signs of ``q``, or a pair (``q >= 0``,
        ``q < 0``) of them.
        """
        plus, minus = weights if isinstance(weights, tuple) else (weights, weights)
        out = exp_sums(self.d_plus, plus, self.t, self.pos, params)
        return exp_sums(self.d_minus, minus, self.t, ~self.pos, params, out=out)

    def column_sums(self, coeffs: torch.Tensor, params: TreeParameters) -> torch.Tensor:
        """``sum_i c_i exp(q_i k_j - m_i)`` per key; ``coeffs`` (N, G, C)."""
        out = None
        for side, d in ((self.pos, self.d_plus), (~self.pos, self.d_minus)):
            # sources of the other sign become zero-weight copies of the largest source
            top = torch.where(side, self.t, 0.0).amax(1, keepdim=True)
            points = torch.where(side, self.t, top)
            weights = coeffs * side.unsqueeze(-1)
            has = side.any(1, keepdim=True).expand_as(side)
            out = exp_sums(points, weights, d, has, params, out=out)
        return out


def _to_output(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` with subnormal results flushed to zero."""
    y = x.to(dtype)
    return y.masked_fill_(y.abs() < torch.finfo(dtype).tiny, 0.0)


def tree_forward(q, k, v, params: TreeParameters, with_grad_sums: bool, sums_by=None):
    """Forward row sums on (N, G) float64 tensors (the sums by ``sums_by``, :class:`_Sides`
    or a subclass, see :func:`tree_function`).

    Returns ``out, z, e_diag`` and, with ``with_grad_sums``, the query gradient's row sums
    ``r = sum_j e_ij v_j k_j`` and ``kk = sum_j e_ij k_j`` (else ``None``).
    """
    sides = (sums_by or _Sides)(q, k)
    cols = [torch.ones_like(v), v] + ([v * k, k] if with_grad_sums else [])
    w = torch.stack(cols, -1)
    sums = sides.row_sums(w, params)
    z = sums[..., 0]
    out = (sums[..., 1] - sides.e_diag * v) / z
    grad_sums = (sums[..., 2], sums[..., 3]) if with_grad_sums else (None, None)
    return out, z, sides, grad_sums


def tree_backward(q, k, v, out, z, sides: _Sides, r, kk, grad, params: TreeParameters):
    """``dq, dk, dv`` (float64, (N, G)) from the forward's sums and the upstream ``grad``."""
    e_diag = sides.e_diag
    dq = grad * ((r - e_diag * v * k) - out * kk) / z
    c1 = grad / z
    c2 = c1 * q
    sums = sides.column_sums(torch.stack([c1, c2, c2 * out], -1), params)
    a_diag = e_diag / z
    dv = sums[..., 0] - grad * a_diag
    dk = v * (sums[..., 1] - grad * q * a_diag) - sums[..., 2]
    return dq, dk, dv


def tree_function(name: str, sides: type[_Sides] = _Sides) -> type[torch.autograd.Function]:
    """The autograd function of the tree code whose sums ``sides`` computes.

    ``sides`` is :class:`_Sides` (the pure-PyTorch sums) or a subclass that overrides
    ``row_sums`` and ``column_sums`` (the native C sums of :mod:`tgem._kernels._tree_native`);
    everything else (the reduction, the diagonal, the gradients' elementwise parts, the
    rounding to the input dtype) is this module's, shared by both implementations.
    """

    class _TreeAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, tol):
            shape, dtype = q.shape, q.dtype
            genes = shape[-1]
            params = tree_parameters(dtype, genes, tol)
            q2, k2, v2 = (x.detach().reshape(-1, genes).to(WORK).contiguous() for x in (q, k, v))
            need = any(ctx.needs_input_grad[:3])
            out, z, _, (r, kk) = tree_forward(q2, k2, v2, params, need, sides)
            if need:
                ctx.save_for_backward(q2, k2, v2, out, z, r, kk)
                ctx.params = params
            ctx.shape, ctx.dtype = shape, dtype
            return _to_output(out, dtype).reshape(shape)

        @staticmethod
        def backward(ctx, grad):
            check_once_differentiable(name)
            q, k, v, out, z, r, kk = ctx.saved_tensors
            g = grad.reshape(q.shape).to(WORK)
            grads = tree_backward(q, k, v, out, z, sides(q, k), r, kk, g, ctx.params)
            return (*(_to_output(x, ctx.dtype).reshape(ctx.shape) for x in grads), None)

    _TreeAttention.__name__ = _TreeAttention.__qualname__ = f"_TreeAttention_{name}"
    return _TreeAttention


_TreeAttention = tree_function("tree")


def tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tol: float | None = None
) -> torch.Tensor:
    """T-GEM attention by the tree code, in O(G log G) work per row (pure PyTorch).

    Same result as :func:`tgem._kernels._reference.reference_attention` within ``tol`` (see the
    module docstring for the bound and its metric), on any device that has float64.
    Differentiable once (double backward raises, as for the other fast paths).

    Parameters
    ----------
    q, k, v : torch.Tensor of shape (..., genes), float32 or float64
        Per-gene scalar queries, keys and values (e.g. (batch, heads, genes) or (N, genes)).
    tol : float, optional
        Error tolerance (between 1e-13 and 0.1, :data:`TOL_RANGE`); ``None`` takes
        :data:`DEFAULT_TOL` of the dtype.

    Returns
    -------
    torch.Tensor, same shape and dtype as ``q``.

    Raises
    ------
    ValueError
        On half-precision or mismatched inputs, non-finite values or a ``tol`` out of range.

    Examples
    --------
    >>> import torch
    >>> from tgem._kernels import reference_attention
    >>> q, k, v = torch.randn(3, 2, 4, 50, dtype=torch.float64).unbind(0)
    >>> bool(torch.allclose(tree_attention(q, k, v), reference_attention(q, k, v)))
    True
    """
    _check_inputs(q, k, v)
    if tol is not None:
        check_tol(tol)
    return _TreeAttention.apply(q, k, v, tol)


@torch.no_grad()
def tree_entropy_rows(q: torch.Tensor, k: torch.Tensor, *, tol: float | None = None):
    """Natural-log entropy of each query's softmax row (before the diagonal is zeroed).

    The tree code's counterpart of :func:`tgem._kernels._exact.attention_entropy_rows`:
    ``H_i = log Z_i + t_i S_d(t_i) / Z_i`` with ``S_d = sum_j d_j exp(-t_i d_j)``.
    Input (..., genes); output has the same shape and dtype, values in [0, log genes].
    """
    return entropy_rows(q, k, tol, _Sides)


def entropy_rows(q, k, tol, sums_by: type[_Sides]) -> torch.Tensor:
    """:func:`tree_entropy_rows` with the sums of ``sums_by`` (see :func:`tree_function`)."""
    _check_inputs(q, k)
    shape, dtype = q.shape, q.dtype
    genes = shape[-1]
    params = tree_parameters(dtype, genes, tol)
    q2, k2 = (x.reshape(-1, genes).to(WORK) for x in (q, k))
    sides = sums_by(q2.contiguous(), k2.contiguous())
    ones = torch.ones_like(q2)
    weights = (torch.stack([ones, sides.d_plus], -1), torch.stack([ones, sides.d_minus], -1))
    sums = sides.row_sums(weights, params)
    z = sums[..., 0]
    ent = torch.log(z) + sides.t * sums[..., 1] / z
    return _to_output(ent.clamp_(min=0.0), dtype).reshape(shape)


def tree_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Backend hook: ``None`` when the tree code runs on ``device``/``dtype``, else why not."""
    if dtype not in (torch.float32, torch.float64):
        return f"float32 and float64 only, not {dtype}"
    if torch.device(device).type == "mps":
        return "the tree code sums in float64, which MPS does not support"
    return None


def tree_backend() -> Backend:
    """The ``"tree"`` attention backend (its ``auto`` choice is left to the registry)."""
    return Backend("tree", tree_attention, tree_unavailable, priority=-2, takes_tol=True)


register_backend(tree_backend())
