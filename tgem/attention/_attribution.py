"""Attention attribution of a class, and the gene network built from it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from tgem._finite import RESULT_FIX, check_finite_result
from tgem._memory import check_fits
from tgem._naming import model_gene_names
from tgem._runtime import dense_batch, iter_batches, torch_threads
from tgem.attention._common import (
    PAIR_AXES,
    _class_index,
    _layer_index,
    _n_heads,
    _prepare,
)
from tgem.attention._lig import attribute_module, rows_per_pass_for
from tgem.attention._network import attention_edges

logger = logging.getLogger("tgem.attention")

#: Fewest samples per batch when ``batch_size`` is None.
MIN_BATCH = 8


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
        batch_size = max(MIN_BATCH, rows_per_pass_for(_n_heads(module), g) // max(1, n_steps))
    elif batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive int or None.")
    batches = (dense_batch(X, sl, device) for sl in iter_batches(n, batch_size))
    with torch_threads(clf.n_threads):
        scores, delta = attribute_module(module, batches, t, chosen, n_steps, method, n)
    scores = scores.cpu().numpy()
    check_finite_result(scores, "attention_attribution's scores", RESULT_FIX, PAIR_AXES)
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
    names = model_gene_names(clf, genes)
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
