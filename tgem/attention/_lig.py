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

import torch

from tgem._kernels import LOG2E, row_max
from tgem._quadrature import fixed_rule

#: Gene-pair elements held at once while forming an attribution matrix (64 MiB of float32).
PAIR_BLOCK_ELEMENTS = 1 << 24
#: Rows x heads x genes elements of one integration pass (steps x samples rows).
PASS_ELEMENTS = 1 << 23
#: Rows x heads x genes x genes of one pass: a backend's backward may hold scratch that grows
#: with genes^2 per row (the native kernel keeps one partial sum per 64 key genes), so passes
#: shrink at large gene counts (21 rows at 12,625 genes, 5 heads).
PASS_PAIR_ELEMENTS = 1 << 34


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
    alphas, weights = fixed_rule(method, n_steps)
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
