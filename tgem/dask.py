"""Distributed inference and attribution on Dask arrays (needs the ``dask`` extra).

A fitted :class:`tgem.TGEMClassifier` is sent to the cluster **once** — scattered to every
worker of the active ``dask.distributed`` client, or held in a single graph node with the
local schedulers — and each block of rows is scored or attributed where it lives with
``map_blocks``/``blockwise``. The model is never serialised into every task. Results are
lazy Dask arrays; ``.compute()`` them, or write them with ``da.to_zarr``.

Functions
---------
* :func:`predict_proba`, :func:`predict` — class probabilities and labels per row.
* :func:`attribute` — gene attributions (:func:`tgem.interpret.attribute`) per row.
* :func:`from_h5ad` — the expression matrix of an ``.h5ad`` file as a lazy Dask array
  (each task opens the file itself).
"""

from __future__ import annotations

import numpy as np

from tgem._h5ad import H5ADDataset, is_h5ad_input
from tgem.interpret import attribute as _attribute
from tgem.interpret._resolve import _resolve_baseline, _resolve_method

__all__ = ["predict_proba", "predict", "attribute", "from_h5ad"]

_INSTALL = 'install it with `pip install "tgem[dask]"`'


def _dask_array():
    try:
        import dask.array as da
    except ImportError as exc:
        raise ImportError(f"tgem.dask needs dask; {_INSTALL}.") from exc
    return da


def _default_client(client):
    if client is not None:
        return client
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        return default_client()
    except ValueError:  # no client: dask's local schedulers
        return None


def _model_handle(estimator, client):
    """The fitted estimator as one graph dependency: a scattered future or a delayed node."""
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(estimator, "module_")
    client = _default_client(client)
    if client is not None:
        return client.scatter(estimator, broadcast=True, hash=False)
    import dask

    return dask.delayed(estimator, pure=True, traverse=False)


def _as_rows(X, chunk_rows: int):
    """X as a 2-D Dask array with one chunk along the genes."""
    da = _dask_array()
    if is_h5ad_input(X):
        return from_h5ad(X, chunk_rows=chunk_rows)
    if not isinstance(X, da.Array):
        X = da.from_array(np.asarray(X), chunks=(chunk_rows, -1))
    if X.ndim != 2:
        raise ValueError(f"X must be two-dimensional (cells x genes); got shape {X.shape}.")
    return X.rechunk({1: -1})


def _check_genes(estimator, X) -> None:
    if X.shape[1] != estimator.n_features_in_:
        raise ValueError(
            f"X has {X.shape[1]} features, but {type(estimator).__name__} is expecting "
            f"{estimator.n_features_in_} features as input; pass the same genes as in fit."
        )


def _frame(block, model):
    """A block as the model expects it: a DataFrame when it was fitted with gene names."""
    names = getattr(model, "feature_names_in_", None)
    if names is None:
        return np.asarray(block)
    import pandas as pd

    return pd.DataFrame(np.asarray(block), columns=names, copy=False)


def _proba_block(block, model):
    return model.predict_proba(_frame(block, model))


def _predict_block(block, model):
    return model.predict(_frame(block, model))


def predict_proba(estimator, X, *, client=None, chunk_rows: int = 4096):
    """Class probabilities of every row of ``X``, computed block by block on the cluster.

    Parameters
    ----------
    estimator : TGEMClassifier
        A fitted classifier.
    X : dask.array.Array, array-like, .h5ad path or AnnData of shape (n_cells, n_genes)
        Rows to score, with the genes in ``fit``'s order (``estimator.feature_names_in_``).
    client : distributed.Client, optional
        The cluster to scatter the model to; default: the active client if any, else dask's
        local scheduler.
    chunk_rows : int, default=4096
        Rows per block when ``X`` is not already a Dask array.

    Returns
    -------
    dask.array.Array of shape (n_cells, n_classes)
        float64 probabilities, columns in ``estimator.classes_`` order (lazy).

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> from tgem import TGEMClassifier
    >>> from tgem.dask import predict_proba
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 5)).astype(np.float32)
    >>> y = np.where(X[:, 0] > 0, "up", "down")
    >>> clf = TGEMClassifier(n_layers=1, n_heads=2, max_epochs=2, n_threads=1,
    ...                      random_state=0).fit(X, y)
    >>> P = predict_proba(clf, da.from_array(X, chunks=(16, 5)))
    >>> P.shape, P.chunks[0]
    ((40, 2), (16, 16, 8))
    >>> bool(np.allclose(P.compute(), clf.predict_proba(X), atol=1e-6))
    True
    """
    X = _as_rows(X, chunk_rows)
    _check_genes(estimator, X)
    model = _model_handle(estimator, client)
    n_classes = len(estimator.classes_)
    return X.map_blocks(
        _proba_block,
        model,
        dtype=np.float64,
        chunks=(X.chunks[0], (n_classes,)),
        meta=np.empty((0, 0)),
    )


def predict(estimator, X, *, client=None, chunk_rows: int = 4096):
    """The most probable class of every row of ``X`` (lazy), block by block on the cluster.

    Parameters and defaults as in :func:`predict_proba`.

    Returns
    -------
    dask.array.Array of shape (n_cells,)
        Labels from ``estimator.classes_``.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> from tgem import TGEMClassifier
    >>> from tgem.dask import predict
    >>> X = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    >>> clf = TGEMClassifier(n_layers=1, n_heads=1, max_epochs=1, random_state=0).fit(
    ...     X, X[:, 0] > 0)
    >>> bool((predict(clf, da.from_array(X, chunks=(8, 4))).compute()
    ...       == clf.predict(X)).all())
    True
    """
    X = _as_rows(X, chunk_rows)
    _check_genes(estimator, X)
    model = _model_handle(estimator, client)
    classes = estimator.classes_
    return X.map_blocks(
        _predict_block,
        model,
        dtype=classes.dtype,
        drop_axis=1,
        chunks=(X.chunks[0],),
        meta=np.empty((0,), dtype=classes.dtype),
    )


def _attribute_block(block, labels, baseline, model, kwargs):
    kw = dict(kwargs)
    if labels is not None:
        kw[kw.pop("_labels_as")] = np.asarray(labels)
    if baseline is not None:
        kw["baseline"] = np.asarray(baseline)
    out = _attribute(model, _frame(block, model), **kw)
    return np.asarray(out, dtype=np.float64)


def attribute(
    estimator,
    X,
    *,
    target="true",
    y=None,
    method: str = "integrated_gradients",
    baseline="zeros",
    client=None,
    chunk_rows: int = 1024,
    **kwargs,
):
    """Gene attributions of every row of ``X`` (lazy), block by block on the cluster.

    Each block runs :func:`tgem.interpret.attribute` on the worker holding it, with the
    model scattered once. Integrated Gradients costs about 100 forward and backward passes
    per row; spreading the rows over a cluster divides the wall time by the number of
    workers.

    Parameters
    ----------
    estimator : TGEMClassifier
        A fitted classifier.
    X : dask.array.Array, array-like, .h5ad path or AnnData of shape (n_cells, n_genes)
        Rows to explain.
    target : "true", "predicted", a class label, or array-like of shape (n_cells,)
        As in :func:`tgem.interpret.attribute`; per-row labels may be a Dask array.
    y : array-like or dask.array.Array of shape (n_cells,), optional
        True labels, for ``target="true"``.
    method : str, default="integrated_gradients"
        Integrated Gradients or Guided Backprop (``"guided_backprop"``). The noise-tunnel
        variants draw noise from the row number within a call, so run them with
        :func:`tgem.interpret.attribute` directly.
    baseline : {"zeros", "mean"} or array-like of shape (n_genes,), default="zeros"
        ``"mean"`` is the training mean, computed here from the fitted model's training data.
    client : distributed.Client, optional
        Default: the active client if any, else dask's local scheduler.
    chunk_rows : int, default=1024
        Rows per block when ``X`` is not already a Dask array.
    **kwargs
        Passed on to :func:`tgem.interpret.attribute` (``n_steps``, ``quadrature``, ``tol``,
        ``internal_batch_size``); ``return_convergence_delta`` is not supported here.

    Returns
    -------
    dask.array.Array of shape (n_cells, n_genes)
        float64 attributions.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> from tgem import TGEMClassifier
    >>> from tgem import dask as tdask
    >>> from tgem.interpret import attribute
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(24, 5)).astype(np.float32)
    >>> y = np.where(X[:, 0] > 0, "up", "down")
    >>> clf = TGEMClassifier(n_layers=1, n_heads=2, max_epochs=2, n_threads=1,
    ...                      random_state=0).fit(X, y)
    >>> A = tdask.attribute(clf, da.from_array(X, chunks=(10, 5)), y=y)
    >>> bool(np.allclose(A.compute(), attribute(clf, X, y=y), atol=1e-6))
    True
    """

    if _resolve_method(method)[1] is not None:
        raise ValueError(
            f"method={method!r} adds noise drawn from each row's position in the call, which "
            "differs block by block; use tgem.interpret.attribute for noise tunnels, or "
            "method='integrated_gradients' / 'guided_backprop' here."
        )
    if kwargs.get("return_convergence_delta"):
        raise ValueError(
            "return_convergence_delta is not supported by tgem.dask.attribute; "
            "use tgem.interpret.attribute on a subset to check convergence."
        )
    da = _dask_array()
    X = _as_rows(X, chunk_rows)
    _check_genes(estimator, X)
    n, g = X.shape
    kwargs = dict(kwargs, method=method)
    labels = None
    if isinstance(target, str) and target == "true":
        if y is None:
            raise ValueError(
                "target='true' needs the true labels: pass y=... (one label per "
                "row of X), or use target='predicted' or a class label."
            )
        labels, kwargs["_labels_as"], kwargs["target"] = y, "y", "true"
    elif isinstance(target, str) and target == "predicted" or np.ndim(target) == 0:
        kwargs["target"] = target
    else:
        labels, kwargs["_labels_as"] = target, "target"
    if labels is not None:
        labels = labels if isinstance(labels, da.Array) else da.from_array(np.asarray(labels))
        if labels.shape != (n,):
            raise ValueError(f"the labels have shape {labels.shape}; pass one per row of X ({n},).")
        labels = labels.rechunk((X.chunks[0],))
    base = None
    if isinstance(baseline, str) and baseline == "mean":
        base = _resolve_baseline(estimator, "mean", n, g)[0]
    elif isinstance(baseline, str):
        kwargs["baseline"] = baseline
    else:
        base = np.asarray(baseline, dtype=np.float32)
        if base.shape != (g,):
            raise ValueError(
                f"baseline has shape {base.shape}; pass 'zeros', 'mean' or one "
                f"value per gene ({g},)."
            )
    model = _model_handle(estimator, client)
    args = [X, "ij", labels, None if labels is None else "i", base, None, model, None, kwargs, None]
    return da.blockwise(
        _attribute_block, "ij", *args, dtype=np.float64, concatenate=True, meta=np.empty((0, 0))
    )


def from_h5ad(data, *, layer: str | None = None, chunk_rows: int = 4096):
    """The expression matrix of an ``.h5ad`` file as a lazy Dask array of dense float32 rows.

    Only the file's path and metadata go into the graph; each task opens the file itself
    (in its own process) and reads its block of rows.

    Parameters
    ----------
    data : str, path-like, AnnData or H5ADDataset
        An ``.h5ad`` path, a backed AnnData, or a dataset.
    layer : str, optional
        Read ``layers[layer]`` instead of ``X``.
    chunk_rows : int, default=4096
        Rows per block.

    Returns
    -------
    dask.array.Array of shape (n_cells, n_genes)

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import anndata, numpy as np, scipy.sparse as sp
    >>> X = sp.random(10, 4, density=0.5, format="csr", dtype=np.float32, random_state=0)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "cells.h5ad"
    >>> anndata.AnnData(X=X).write_h5ad(path)
    >>> A = from_h5ad(path, chunk_rows=4)
    >>> A.chunks[0], bool(np.array_equal(A.compute(), X.toarray()))
    ((4, 4, 2), True)
    """
    da = _dask_array()
    ds = data if isinstance(data, H5ADDataset) else H5ADDataset(data, layer=layer)
    return da.from_array(
        ds,
        chunks=(chunk_rows, -1),
        asarray=True,
        fancy=False,
        meta=np.empty((0, 0), dtype=np.float32),
    )
