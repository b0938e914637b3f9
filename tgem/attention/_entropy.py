"""Entropy of the attention rows, per layer and head (optionally per sample and gene)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tgem._finite import RESULT_FIX, check_finite_result
from tgem._kernels import attention_entropy_rows
from tgem._memory import check_fits
from tgem._runtime import dense_batch, iter_batches, torch_threads
from tgem.attention._common import ENTROPY_AXES, _n_heads, _prepare


def attention_entropy(clf, X, *, per_sample: bool = False, per_gene: bool = False) -> np.ndarray:
    """Entropy (natural log) of each head's attention distributions, per layer and head.

    For sample ``b``, layer ``l``, head ``h`` and query gene ``i`` the attention row is the
    softmax ``A_i = softmax_j(q_i k_j)`` *before* the gene's own weight is zeroed (as the
    original computes it); its entropy ``-sum_j A_ij log A_ij`` lies in ``[0, log G]``: ``log
    G`` for uniform attention, 0 for attention on one gene. Rows are reduced block by block
    (never the whole gene x gene matrix).

    Parameters
    ----------
    clf : TGEMClassifier
        A fitted classifier.
    X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_genes)
        Samples whose attention is measured.
    per_sample : bool, default=False
        Keep the sample axis instead of averaging over samples.
    per_gene : bool, default=False
        Keep the query-gene axis instead of averaging over genes.

    Returns
    -------
    ndarray of float64
        ``(n_layers, n_heads)`` by default; ``(n_samples, n_layers, n_heads)`` with
        ``per_sample``; ``(n_layers, n_heads, n_genes)`` with ``per_gene``;
        ``(n_samples, n_layers, n_heads, n_genes)`` with both.

    See Also
    --------
    tgem.plotting.plot_entropy : box plots of the per-sample values per head and layer.

    Examples
    --------
    >>> import numpy as np
    >>> from tgem import TGEMClassifier
    >>> from tgem.attention import attention_entropy
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(20, 6)).astype(np.float32)
    >>> clf = TGEMClassifier(n_layers=2, n_heads=3, max_epochs=1, random_state=0)
    >>> clf = clf.fit(X, X[:, 0] > 0)
    >>> H = attention_entropy(clf, X)
    >>> H.shape
    (2, 3)
    >>> bool(((H >= 0) & (H <= np.log(6))).all())
    True
    >>> attention_entropy(clf, X, per_sample=True).shape
    (20, 2, 3)
    """
    X, module, device = _prepare(clf, X)
    n, g = X.shape
    n_layers, n_heads = len(module.layers), _n_heads(module)
    shape = (n if per_sample else 1, n_layers, n_heads, g if per_gene else 1)
    check_fits(
        shape,
        8,
        "The entropy per sample and gene",
        "Pass fewer samples, or per_sample=False or per_gene=False.",
    )
    acc = np.zeros(shape, dtype=np.float64)
    module.eval()
    with torch_threads(clf.n_threads), torch.no_grad():
        for sl in iter_batches(n, clf.predict_batch_size):
            _, states = module(dense_batch(X, sl, device), return_layers=True)
            for li, layer in enumerate(module.layers):
                q, k, _ = layer.qkv(states[li])
                ent = attention_entropy_rows(q, k).double()  # (B, H, G)
                if not per_gene:
                    ent = ent.mean(-1, keepdim=True)
                ent = ent.cpu().numpy()
                if per_sample:
                    acc[sl, li] = ent
                else:
                    acc[0, li] += ent.sum(0)
    if not per_sample:
        acc = acc[0] / n
    check_finite_result(acc, "attention_entropy's entropies", RESULT_FIX, ENTROPY_AXES)
    return acc if per_gene else acc[..., 0]


def entropy_table(entropy, *, per_gene: bool = False, genes=None) -> pd.DataFrame:
    """Tidy (long) table of :func:`attention_entropy` values, one row per value.

    Parameters
    ----------
    entropy : ndarray
        ``(n_layers, n_heads)``, or ``(n_samples, n_layers, n_heads)`` (``per_sample``); with
        ``per_gene``, ``(n_layers, n_heads, n_genes)`` or ``(n_samples, n_layers, n_heads,
        n_genes)``.
    per_gene : bool, default=False
        Whether the last axis holds genes (``attention_entropy(..., per_gene=True)``).
    genes : sequence of str, optional
        Gene names for the ``gene`` column (default: positions).

    Returns
    -------
    DataFrame
        Columns ``[sample,] layer, head, [gene,] entropy``; layers and heads count from 0.

    Examples
    --------
    >>> import numpy as np
    >>> from tgem.attention import entropy_table
    >>> entropy_table(np.array([[1.0, 2.0]]))
       layer  head  entropy
    0      0     0      1.0
    1      0     1      2.0
    >>> entropy_table(np.ones((3, 2, 2))).groupby("layer")["entropy"].mean().tolist()
    [1.0, 1.0]
    """
    arr = np.asarray(entropy, dtype=np.float64)
    names = ["layer", "head", "gene"] if per_gene else ["layer", "head"]
    if arr.ndim == len(names) + 1:
        names = ["sample"] + names
    elif arr.ndim != len(names):
        raise ValueError(
            f"entropy has shape {arr.shape}; expected {len(names)} or "
            f"{len(names) + 1} axes ({', '.join(names)}, optionally led by the "
            "samples). Pass per_gene=True for per-gene values."
        )
    index = pd.MultiIndex.from_product([range(n) for n in arr.shape], names=names)
    table = pd.DataFrame({"entropy": arr.reshape(-1)}, index=index).reset_index()
    if per_gene and genes is not None:
        genes = np.asarray(genes, dtype=object)
        if genes.shape != (arr.shape[-1],):
            raise ValueError(f"genes has {genes.size} names for {arr.shape[-1]} genes.")
        table["gene"] = genes[table["gene"].to_numpy()]
    return table
