"""Row statistics of the attention map for the analysis functions, block by block.

:func:`attention_entropy_rows` and :func:`attention_rows` never hold the whole gene x gene
matrix (see :mod:`tgem.attention`).
"""

from __future__ import annotations

import math

import torch

from tgem._kernels._exact import EXP_FLOOR, _block_rows
from tgem._kernels._reference import row_max


@torch.no_grad()
def attention_entropy_rows(
    q: torch.Tensor, k: torch.Tensor, block_elements: int | None = None
) -> torch.Tensor:
    """Natural-log entropy of each query's softmax row (before the diagonal is zeroed).

    ``H_i = log Z_i - (sum_j e_ij (s_ij - m_i)) / Z_i`` with ``e_ij = exp(s_ij - m_i)``,
    accumulated block by block: never more than one block of the gene x gene matrix.
    Input (..., genes); output has the same shape, values in [0, log genes].
    """
    shape = q.shape
    g = shape[-1]
    q2, k2 = q.reshape(-1, g), k.reshape(-1, g)
    m = row_max(q2, k2)
    z = torch.empty_like(q2)
    weighted = torch.empty_like(q2)
    step = _block_rows(q2.shape[0], g, block_elements)
    for i0 in range(0, g, step):
        i1 = min(g, i0 + step)
        s = q2[:, i0:i1, None] * k2[:, None, :] - m[:, i0:i1, None]
        e = torch.exp(s.clamp(min=EXP_FLOOR.get(s.dtype, -math.inf)))  # no subnormal
        z[:, i0:i1] = e.sum(-1)
        weighted[:, i0:i1] = (e * s).sum(-1)
    ent = torch.log(z) - weighted / z
    return ent.clamp_(min=0.0).reshape(shape)


@torch.no_grad()
def attention_rows(
    q: torch.Tensor, k: torch.Tensor, rows: slice, masked: bool = True
) -> torch.Tensor:
    """Rows ``rows`` of the attention map, shape (..., len(rows), genes).

    With ``masked`` the gene's own entry is zero (what the model uses), otherwise the plain
    softmax row.
    """
    g = q.shape[-1]
    start, stop, _ = rows.indices(g)
    m = row_max(q, k)[..., start:stop, None]
    e = torch.exp(q[..., start:stop, None] * k[..., None, :] - m)
    a = e / e.sum(-1, keepdim=True)
    if masked:
        a.diagonal(offset=start, dim1=-2, dim2=-1).zero_()
    return a
