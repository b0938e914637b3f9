"""The plain T-GEM attention: the formulation every other backend is tested against.

For tensors ``q, k, v`` of shape ``(batch, heads, genes)``::

    S_ij = q_i * k_j                     (no scaling)
    A    = softmax_j(S)                  (over keys j)
    A_ii = 0                             (after the softmax, no renormalisation)
    out_i = sum_j A_ij * v_j

:func:`reference_attention` materialises the (batch, heads, genes, genes) tensors; it is the
test oracle and the backend ``"reference"`` (the only one that is differentiable twice).
"""

from __future__ import annotations

import torch

from tgem._kernels._registry import Backend, always_available, register_backend


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain T-GEM attention that materialises the gene x gene softmax (the test oracle).

    Parameters
    ----------
    q, k, v : torch.Tensor of shape (batch, heads, genes)
        Per-gene scalar queries, keys and values.

    Returns
    -------
    torch.Tensor of shape (batch, heads, genes)
        ``out_i = sum_{j != i} softmax_j(q_i k_j) v_j``.

    Examples
    --------
    >>> import torch
    >>> q = k = v = torch.ones(1, 1, 3)
    >>> reference_attention(q, k, v)
    tensor([[[0.6667, 0.6667, 0.6667]]])
    """
    scores = q.unsqueeze(-1) * k.unsqueeze(-2)
    attn = torch.softmax(scores, dim=-1)
    eye = torch.eye(q.shape[-1], dtype=torch.bool, device=q.device)
    attn = attn.masked_fill(eye, 0.0)
    return torch.matmul(attn, v.unsqueeze(-1)).squeeze(-1)


def reference_softmax(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The unmasked softmax attention map ``softmax_j(q_i k_j)``, shape (..., genes, genes)."""
    return torch.softmax(q.unsqueeze(-1) * k.unsqueeze(-2), dim=-1)


def row_max(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Exact maximum of each score row ``max_j q_i k_j`` in closed form, shape like ``q``.

    Rounding is monotone, so ``q_i * max_j k_j`` (``q_i >= 0``) or ``q_i * min_j k_j``
    (``q_i < 0``) is the largest *computed* score of the row, not just an approximation.
    """
    kmax = k.amax(dim=-1, keepdim=True)
    kmin = k.amin(dim=-1, keepdim=True)
    return torch.where(q >= 0, q * kmax, q * kmin)


register_backend(
    Backend("reference", reference_attention, always_available, priority=-1, exact=False)
)
