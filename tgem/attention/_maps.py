"""Attention maps of one layer and head, streamed block by block; each layer's output."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tgem._finite import RESULT_FIX, check_finite_result
from tgem._kernels import attention_rows, row_max
from tgem._memory import check_fits
from tgem._naming import model_gene_names
from tgem._runtime import dense_batch, iter_batches, torch_threads
from tgem.attention._common import (
    MAP_AXES,
    OUTPUT_AXES,
    _gene_indices,
    _layer_index,
    _n_heads,
    _prepare,
)

#: Attention weights (samples x heads x query rows x genes) formed at once (16 MiB of float32).
MAP_BLOCK_ELEMENTS = 1 << 22


def attention_map(
    clf,
    X,
    *,
    layer: int = 0,
    head: int | None = 0,
    average: bool = True,
    masked: bool = True,
    genes=None,
) -> np.ndarray:
    """Attention matrix of one layer (and head) for given samples, or its mean over them.

    Entry ``(i, j)`` is the weight query gene ``i`` gives key gene ``j``. The matrix is
    formed block by block of query rows; only the requested result is ever held whole.

    Parameters
    ----------
    clf : TGEMClassifier
        A fitted classifier.
    X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_genes)
        Samples whose attention is returned (or averaged).
    layer : int, default=0
        Layer index (negative counts from the last).
    head : int or None, default=0
        Head index; None averages the heads.
    average : bool, default=True
        Return the mean over samples ``(g, g)``; False returns every sample ``(n, g, g)``.
    masked : bool, default=True
        Zero the gene's own weight as the model does; False gives the plain softmax rows.
    genes : sequence of str or int, optional
        Restrict rows and columns to these genes (names or positions), in this order. The
        softmax is still over all genes.

    Returns
    -------
    ndarray of float32, shape (g, g) or (n_samples, g, g)
        ``g`` is ``len(genes)`` or the model's number of genes.

    Raises
    ------
    MemoryError
        If the result would take more than half of what this process may still allocate
        (free memory, its cgroup's memory limit and its ``ulimit``, whichever is least); the
        message gives the size and the limit. Average, pass fewer samples or select genes.

    Examples
    --------
    >>> import numpy as np
    >>> from tgem import TGEMClassifier
    >>> from tgem.attention import attention_map
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(20, 6)).astype(np.float32)
    >>> clf = TGEMClassifier(n_layers=2, n_heads=2, max_epochs=1, random_state=0)
    >>> clf = clf.fit(X, X[:, 0] > 0)
    >>> A = attention_map(clf, X, layer=1, head=0, masked=False)
    >>> A.shape, bool(np.allclose(A.sum(1), 1.0, atol=1e-5))
    ((6, 6), True)
    >>> attention_map(clf, X[:3], genes=[0, 2], average=False).shape
    (3, 2, 2)
    """
    X, module, device = _prepare(clf, X)
    n, g = X.shape
    li = _layer_index(layer, len(module.layers))
    n_heads = _n_heads(module)
    if head is not None and not -n_heads <= head < n_heads:
        raise ValueError(
            f"head={head!r}, but each layer has {n_heads} heads; pass an int in "
            f"[0, {n_heads}) or None for their mean."
        )
    idx = None if genes is None else _gene_indices(genes, model_gene_names(clf))
    gs = g if idx is None else len(idx)
    shape = (gs, gs) if average else (n, gs, gs)
    check_fits(
        shape,
        12 if average else 4,
        "The attention map",
        "Use average=True, fewer samples, or select genes with genes=[...].",
    )
    out = np.zeros(shape, dtype=np.float32)
    acc = np.zeros(shape, dtype=np.float64) if average else None
    module.eval()
    heads = slice(None) if head is None else slice(head % n_heads, head % n_heads + 1)
    with torch_threads(clf.n_threads), torch.no_grad():
        for sl in iter_batches(n, clf.predict_batch_size):
            _, states = module(dense_batch(X, sl, device), return_layers=True)
            q, k, _ = module.layers[li].qkv(states[li])
            q, k = q[:, heads], k[:, heads]
            for r_idx, block in _map_blocks(q, k, idx, masked):
                block = block.mean(1)  # over heads: (B, rows, gs)
                if average:
                    acc[r_idx] += block.double().sum(0).cpu().numpy()
                else:
                    out[sl, r_idx] = block.cpu().numpy()
    if average:
        out[...] = acc / n
    return check_finite_result(out, "attention_map's attention weights", RESULT_FIX, MAP_AXES)


def _map_blocks(q, k, idx, masked):
    """Yield (row positions in the result, (B, H, rows, cols) attention) block by block."""
    b, h, g = q.shape
    step = max(1, min(g, MAP_BLOCK_ELEMENTS // max(1, b * h * g)))
    if idx is None:
        for i0 in range(0, g, step):
            i1 = min(g, i0 + step)
            yield slice(i0, i1), attention_rows(q, k, slice(i0, i1), masked=masked)
        return
    cols = torch.as_tensor(idx, device=q.device)
    m = row_max(q, k)
    for r0 in range(0, len(idx), step):
        rows = cols[r0 : r0 + step]
        s = q[..., rows, None] * k[..., None, :] - m[..., rows, None]
        a = torch.exp(s)
        a /= a.sum(-1, keepdim=True)
        if masked:
            a[..., torch.arange(len(rows), device=q.device), rows] = 0.0
        yield slice(r0, r0 + len(rows)), a[..., cols]


# ----------------------------------------------------------------------------- embeddings
def layer_outputs(clf, X, *, layers: Sequence[int] | None = None) -> np.ndarray:
    """Each layer's output for the samples, usable as embeddings (one per layer).

    Layer ``l``'s output is its residual block ``x + LayerNorm(attention(x))``, one number per
    gene, as the original saved them for plotting samples in the model's space.

    Parameters
    ----------
    clf : TGEMClassifier
        A fitted classifier.
    X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_genes)
    layers : sequence of int, optional
        Which layers (default all), in the order returned.

    Returns
    -------
    ndarray of float32, shape (n_layers_returned, n_samples, n_genes)

    Examples
    --------
    >>> import numpy as np
    >>> from tgem import TGEMClassifier
    >>> from tgem.attention import layer_outputs
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(20, 6)).astype(np.float32)
    >>> clf = TGEMClassifier(n_layers=3, n_heads=2, max_epochs=1, random_state=0)
    >>> clf = clf.fit(X, X[:, 0] > 0)
    >>> layer_outputs(clf, X[:5]).shape
    (3, 5, 6)
    >>> layer_outputs(clf, X[:5], layers=[-1]).shape
    (1, 5, 6)
    """
    X, module, device = _prepare(clf, X)
    n, g = X.shape
    n_layers = len(module.layers)
    chosen = (
        list(range(n_layers)) if layers is None else [_layer_index(ly, n_layers) for ly in layers]
    )
    check_fits((len(chosen), n, g), 4, "The layer outputs", "Pass fewer samples or layers.")
    out = np.empty((len(chosen), n, g), dtype=np.float32)
    module.eval()
    with torch_threads(clf.n_threads), torch.no_grad():
        for sl in iter_batches(n, clf.predict_batch_size):
            _, states = module(dense_batch(X, sl, device), return_layers=True)
            for pos, li in enumerate(chosen):
                out[pos, sl] = states[li + 1].float().cpu().numpy()
    return check_finite_result(out, "layer_outputs' values", RESULT_FIX, OUTPUT_AXES)
