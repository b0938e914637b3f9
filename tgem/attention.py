"""Attention analysis of a fitted :class:`~tgem.TGEMClassifier`.

- :func:`attention_entropy` (tidy with :func:`entropy_table`): natural-log entropy of each
  head's attention rows, per layer and head (optionally per sample and per gene), never
  holding more than a block of the gene x gene matrix.
- :func:`attention_map`: one layer's (and head's) attention matrix for given samples, or its
  mean, streamed block by block, with a clear error when the result would not fit.
- :func:`layer_outputs`: each layer's output, usable as an embedding of the samples.
- :func:`attention_attribution`: the original's Layer Integrated Gradients on each layer's
  softmax attention map (baseline input 0), averaged over samples and summed over heads, in
  O(genes^2) memory per layer whatever the number of samples and steps.
- :func:`attention_network`, :func:`attention_edges`, :func:`hub_genes`, :func:`write_edges`,
  :func:`write_graphml`, :func:`to_networkx`: the gene-gene network and its hub genes, as
  tidy tables, Cytoscape-ready TSV, GraphML and ``networkx`` graphs.

All functions read a fitted classifier and never modify it or the user's arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.utils.validation import check_is_fitted

from tgem._attention_attr import attribute_module, check_fits, rows_per_pass_for
from tgem._finite import RESULT_FIX, check_finite_result
from tgem._gene_network import (
    attention_edges,
    hub_genes,
    to_networkx,
    write_edges,
    write_graphml,
)
from tgem._kernels import attention_entropy_rows, attention_rows, row_max
from tgem._naming import default_gene_names
from tgem._runtime import dense_batch, iter_batches, torch_threads

__all__ = [
    "attention_entropy",
    "entropy_table",
    "attention_map",
    "layer_outputs",
    "attention_attribution",
    "attention_network",
    "attention_edges",
    "hub_genes",
    "write_edges",
    "write_graphml",
    "to_networkx",
]

logger = logging.getLogger(__name__)

# names of the axes of each result, for the position of a non-finite value in an error
_ENTROPY_AXES = ("sample", "layer", "head", "gene")
_MAP_AXES = ("sample", "query gene", "key gene")
_OUTPUT_AXES = ("layer", "sample", "gene")
_PAIR_AXES = ("layer", "query gene", "key gene")


# ----------------------------------------------------------------------------- helpers
def _prepare(clf, X):
    check_is_fitted(clf, "module_")
    X = clf._validate_X(X, reset=False)
    module = clf.module_
    return X, module, clf._device_for_predict()


def _n_heads(module) -> int:
    return int(module.layers[0].WQ.shape[0])


def _gene_names(clf, genes: Sequence[str] | None = None) -> np.ndarray:
    """Names of the model's genes: ``genes``, else ``feature_names_in_``, else ``gene_<i>``."""
    n = clf.n_features_in_
    if genes is not None:
        names = np.asarray(genes, dtype=object)
        if names.shape != (n,):
            raise ValueError(
                f"genes has {names.size} names, but the model has {n} genes; pass one name per "
                "column of X, in order."
            )
        return names
    if hasattr(clf, "feature_names_in_"):
        return np.asarray(clf.feature_names_in_, dtype=object)
    return default_gene_names(n)


def _layer_index(layer: int, n_layers: int) -> int:
    if not isinstance(layer, (int, np.integer)) or not -n_layers <= layer < n_layers:
        raise ValueError(
            f"layer={layer!r}, but the model has {n_layers} layers; pass an int in [0, {n_layers})."
        )
    return int(layer) % n_layers


def _gene_indices(genes, names: np.ndarray) -> np.ndarray:
    """Column indices for ``genes`` given as names or integer positions."""
    arr = np.asarray(genes)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("genes must be a non-empty 1-d list of gene names or positions.")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < -len(names) or arr.max() >= len(names):
            raise ValueError(f"gene positions must lie in [0, {len(names)}), got {arr.tolist()}.")
        return arr % len(names)
    lookup = {name: i for i, name in enumerate(names)}
    missing = [g for g in arr.tolist() if g not in lookup]
    if missing:
        raise ValueError(
            f"genes not in the model: {missing[:10]}; pass names from "
            "feature_names_in_ (or the genes argument) or integer positions."
        )
    return np.array([lookup[g] for g in arr.tolist()])


# ----------------------------------------------------------------------------- entropy
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
    check_finite_result(acc, "attention_entropy's entropies", RESULT_FIX, _ENTROPY_AXES)
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


# ----------------------------------------------------------------------------- maps
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
    idx = None if genes is None else _gene_indices(genes, _gene_names(clf))
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
    return check_finite_result(out, "attention_map's attention weights", RESULT_FIX, _MAP_AXES)


def _map_blocks(q, k, idx, masked):
    """Yield (row positions in the result, (B, H, rows, cols) attention) block by block."""
    b, h, g = q.shape
    step = max(1, min(g, (1 << 22) // max(1, b * h * g)))
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
    return check_finite_result(out, "layer_outputs' values", RESULT_FIX, _OUTPUT_AXES)


# ----------------------------------------------------------------------------- attribution
def _class_index(clf, target) -> int:
    matches = np.flatnonzero(np.asarray(clf.classes_) == target)
    if matches.size != 1:
        raise ValueError(
            f"target={target!r} is not one of the classes "
            f"{np.asarray(clf.classes_).tolist()}; pass a label from classes_."
        )
    return int(matches[0])


def attention_attribution(
    clf,
    X,
    target,
    *,
    layers: Sequence[int] | None = None,
    n_steps: int = 50,
    method: str = "gausslegendre",
    batch_size: int | None = None,
    return_convergence_delta: bool = False,
):
    """Attribution of a class to each layer's attention map, as the original computes it.

    For each layer, Layer Integrated Gradients (captum's ``LayerIntegratedGradients``) on the
    layer's softmax attention map (per head) with an input baseline of 0: the map is
    interpolated from its value at ``x = 0`` to its value at the sample while the value path,
    the residual and the other layers stay at the sample; the target is the log-probability
    of ``target``. The attributions are averaged over the samples ``X`` and summed over the
    heads. Entry ``(i, j)`` scores the link from query gene ``i`` to key gene ``j``; the
    diagonal is 0 (the model zeroes the gene's own weight).

    The gradient with respect to a map entry is a product of a per-query and a per-key term,
    so the integration runs on O(genes) vectors and the gene x gene matrix is formed once per
    layer: memory is ``n_layers x genes^2`` floats (plus a block), whatever the number of
    samples and steps. Work is about one Integrated-Gradients pass per sample.

    Parameters
    ----------
    clf : TGEMClassifier
        A fitted classifier.
    X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_genes)
        The samples to average over (usually those of class ``target``).
    target : label
        The class (a value of ``clf.classes_``) whose log-probability is attributed.
    layers : sequence of int, optional
        Layers to attribute (default all), in the order returned.
    n_steps : int, default=50
        Integration steps (captum's default).
    method : {"gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", \
"riemann_middle"}, default="gausslegendre"
        Integration rule, as in captum.
    batch_size : int, optional
        Samples processed together (default: at least 8, more when a whole integration
        pass of them stays small). Integration steps are split into passes of bounded size
        whatever the batch.
    return_convergence_delta : bool, default=False
        Also return, per sample and layer, ``sum(attributions) - (F(x; A(x)) - F(x; A(0)))``
        (completeness: near 0 when ``n_steps`` is large enough). This is not captum's delta,
        which compares with ``F(0)`` and does not vanish for a layer attribution.

    Returns
    -------
    scores : ndarray of float32, shape (n_layers_returned, n_genes, n_genes)
    delta : ndarray of float64, shape (n_samples, n_layers_returned)
        Only with ``return_convergence_delta``.

    Raises
    ------
    MemoryError
        If the score matrices would take more than half of what this process may still
        allocate (free memory, its cgroup's memory limit and its ``ulimit``).

    See Also
    --------
    attention_edges : the network from these scores (normalised, top fraction kept).
    attention_network : scores and network for one or all classes.

    Examples
    --------
    >>> import numpy as np
    >>> from tgem import TGEMClassifier
    >>> from tgem.attention import attention_attribution
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(30, 5)).astype(np.float32)
    >>> y = np.where(X[:, 0] > 0, "up", "down")
    >>> clf = TGEMClassifier(n_layers=2, n_heads=2, activation=None, max_epochs=2,
    ...                      random_state=0).fit(X, y)
    >>> scores, delta = attention_attribution(clf, X[y == "up"], "up", n_steps=20,
    ...                                       return_convergence_delta=True)
    >>> scores.shape
    (2, 5, 5)

    Without an activation's kink the attributions add up to the output's change (the
    convergence delta is float32 rounding):

    >>> bool(np.abs(delta).max() < 1e-5)
    True
    """
    X, module, device = _prepare(clf, X)
    n, g = X.shape
    t = _class_index(clf, target)
    n_layers = len(module.layers)
    chosen = (
        list(range(n_layers)) if layers is None else [_layer_index(ly, n_layers) for ly in layers]
    )
    if len(set(chosen)) != len(chosen) or not chosen:
        raise ValueError(f"layers={layers!r} must name distinct layers, at least one.")
    check_fits(
        (len(chosen), g, g),
        4,
        "The attention attribution",
        "Attribute fewer layers at a time (layers=[...]) or fewer genes.",
    )
    if batch_size is None:
        batch_size = max(8, rows_per_pass_for(_n_heads(module), g) // max(1, n_steps))
    elif batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive int or None.")
    batches = (dense_batch(X, sl, device) for sl in iter_batches(n, batch_size))
    with torch_threads(clf.n_threads):
        scores, delta = attribute_module(module, batches, t, chosen, n_steps, method, n)
    scores = scores.cpu().numpy()
    check_finite_result(scores, "attention_attribution's scores", RESULT_FIX, _PAIR_AXES)
    check_finite_result(
        delta, "attention_attribution's convergence deltas", RESULT_FIX, ("sample", "layer")
    )
    logger.info(
        "attention attribution of class %r over %d samples: max |delta| %.3g",
        target,
        n,
        float(np.abs(delta.numpy()).max()) if n else 0.0,
    )
    return (scores, delta.numpy()) if return_convergence_delta else scores


def attention_network(
    clf,
    X,
    y=None,
    *,
    target=None,
    top_fraction: float | None = 0.001,
    threshold: float | None = None,
    genes: Sequence[str] | None = None,
    n_steps: int = 50,
    method: str = "gausslegendre",
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Gene-gene network of one or more classes from their attention attribution.

    For each class, :func:`attention_attribution` over the samples of that class, then
    :func:`attention_edges`: each layer divided by its largest absolute score and the top
    ``top_fraction`` of signed scores (or those above ``threshold``) kept jointly across the
    layers, as the original's network script does. One class's score matrices are freed
    before the next class is attributed.

    Parameters
    ----------
    clf : TGEMClassifier
        A fitted classifier.
    X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_genes)
    y : array-like of shape (n_samples,), optional
        Labels of ``X``; a class's samples are the rows with that label. Without ``y`` all
        rows are used for each class (pass the samples of one class and ``target``).
    target : label or sequence of labels, optional
        Class(es) to attribute; default all classes present in ``y`` (or, without ``y``,
        all of ``clf.classes_``).
    top_fraction, threshold, genes
        As in :func:`attention_edges`.
    n_steps, method, batch_size
        As in :func:`attention_attribution`.

    Returns
    -------
    DataFrame
        Columns ``class``, ``layer``, ``query``, ``key``, ``score`` (normalised score),
        sorted by class then decreasing score.

    Examples
    --------
    >>> import numpy as np
    >>> from tgem import TGEMClassifier
    >>> from tgem.attention import attention_network, hub_genes
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(30, 5)).astype(np.float32)
    >>> y = np.where(X[:, 0] > 0, "up", "down")
    >>> clf = TGEMClassifier(n_layers=2, n_heads=2, max_epochs=2, random_state=0).fit(X, y)
    >>> edges = attention_network(clf, X, y, top_fraction=0.1, n_steps=8)
    >>> list(edges.columns)
    ['class', 'layer', 'query', 'key', 'score']
    >>> sorted(edges["class"].unique().tolist())
    ['down', 'up']
    """
    names = _gene_names(clf, genes)
    if target is None:
        classes = list(np.unique(y)) if y is not None else list(clf.classes_)
    elif np.ndim(target) == 0:
        classes = [target]
    else:
        classes = list(target)
    if y is not None:
        y = np.asarray(y)
        if y.shape[0] != np.shape(X)[0]:
            raise ValueError(
                f"y has {y.shape[0]} labels but X has {np.shape(X)[0]} rows; "
                "pass one label per sample."
            )
    tables = []
    for c in classes:
        rows = np.flatnonzero(y == c) if y is not None else np.arange(np.shape(X)[0])
        if rows.size == 0:
            raise ValueError(f"no sample of class {c!r} in X; pass samples of each class.")
        Xc = X.iloc[rows] if hasattr(X, "iloc") else X[rows]
        scores = attention_attribution(
            clf, Xc, c, n_steps=n_steps, method=method, batch_size=batch_size
        )
        edges = attention_edges(scores, names, top_fraction=top_fraction, threshold=threshold)
        del scores
        edges.insert(0, "class", c.item() if isinstance(c, np.generic) else c)
        tables.append(edges)
    return pd.concat(tables, ignore_index=True)
