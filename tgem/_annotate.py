"""Cell-type annotation of AnnData objects.

:func:`annotate` runs a fitted :class:`~tgem.TGEMClassifier` on an AnnData object, scanpy
style: labels, confidence and probabilities go to ``obs``, ``obsm`` and ``uns``, so that the
next step can be ``sc.pl.umap(adata, color="tgem_label")``. Cells of types the model did not
learn are left ``unassigned`` by the rules of :mod:`tgem._rejection`.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tgem._rejection import (  # noqa: F401 - RULES and the three functions: old import paths
    RULES,
    _check_rule,
    _check_unassigned,
    _proba_and_score,
    _resolve_threshold,
    fit_rejection_threshold,
    predict_with_rejection,
    rejection_scores,
)
from tgem._version import __version__
from tgem.datasets._gene_ids import DEFAULT_MIN_OVERLAP, match_genes
from tgem.interpret import attribute

__all__ = ["annotate"]

#: ``reject="auto"`` uses ``"combined"`` from this many held-out cells. Its p-values move in
#: steps of ``1 / (n + 1)``: with fewer cells a 5 % threshold rejects almost nothing (37
#: held-out PBMC cells: none of 95 cells of an unseen type), so smaller models use
#: ``"neighbors"``, whose distances are continuous (on PBMC, one type left out: median AUROC
#: 0.856 against 0.769 for max_proba, ``benchmarks/results/annotate_rejection.md``).
AUTO_COMBINED_MIN_CALIBRATION = 100

_INSTALL = 'install it with `pip install "tgem[anndata]"`'


# ------------------------------------------------------------------ annotate
def _import_anndata():
    try:
        import anndata
    except ImportError as exc:
        raise ImportError(f"tgem.annotate needs the optional package anndata; {_INSTALL}.") from exc
    return anndata


def _matrix(adata, layer):
    if layer is None:
        return adata.X
    if not isinstance(layer, str) or layer not in adata.layers:
        raise ValueError(
            f"layer {layer!r} is not in adata.layers {list(adata.layers)}; pass one of "
            "them, or layer=None for adata.X."
        )
    return adata.layers[layer]


def _fill_values(model, match, fill_value) -> tuple[np.ndarray, str]:
    """The value given to each model gene missing from the data, and the rule used."""
    n_genes = len(match.model_genes)
    if fill_value is not None:
        if isinstance(fill_value, bool) or not isinstance(fill_value, numbers.Real):
            raise TypeError(f"fill_value must be a real number or None; got {fill_value!r}.")
        if not math.isfinite(fill_value):
            raise ValueError(f"fill_value must be finite; got {fill_value!r}.")
        return np.full(n_genes, float(fill_value), dtype=np.float32), "value"
    if getattr(model.module_, "standardize", False):
        mean = model.module_.input_mean.detach().cpu().numpy().astype(np.float32)
        return mean, "training_mean"
    if match.missing:
        raise ValueError(
            f"{len(match.missing)} of the model's {n_genes} genes are missing from the data "
            f"({', '.join(match.missing[:5])}{', ...' if len(match.missing) > 5 else ''}) and "
            "the model keeps no training means (it was fitted with standardize=False). Pass "
            "fill_value=0.0 (or another value in the data's units) to fill them, or use a "
            "model fitted with standardize=True."
        )
    return np.zeros(n_genes, dtype=np.float32), "none"


def _batches(matrix, match, fill, batch_size: int):
    """Row blocks of the data in the model's gene order, missing genes filled."""
    found = np.flatnonzero(match.index >= 0)
    columns = match.index[found]
    n_rows = matrix.shape[0]
    for start in range(0, n_rows, batch_size):
        block = matrix[start : min(start + batch_size, n_rows)]
        if sp.issparse(block) or hasattr(block, "to_memory"):
            block = sp.csr_matrix(block)[:, columns].toarray()
        else:
            block = np.asarray(block)[:, columns]
        out = np.repeat(fill[None, :], block.shape[0], axis=0)
        out[:, found] = block
        yield start, out


def _h5ad_safe(value):
    """A parameter value as something ``write_h5ad`` stores and reads back (never None)."""
    if value is None:
        return "None"
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (numbers.Integral, numbers.Real, str)):
        return value
    return repr(value)


def _identity(model, match, rule, threshold, source, unassigned, layer, fill_rule) -> dict:
    return {
        "tgem_version": __version__,
        "params": {k: _h5ad_safe(v) for k, v in model.get_params().items()},
        "classes": [str(c) for c in model.classes_],
        "gene_match": match.to_dict(),
        "fill_rule": fill_rule,
        "rejection": {
            "rule": rule if rule is not None else "none",
            "threshold": float(threshold) if threshold is not None else float("nan"),
            "threshold_source": source,
            "unassigned": unassigned,
        },
        "layer": "X" if layer is None else layer,
    }


def _check_clusters(adata, column) -> pd.Series:
    """The clustering column named by ``majority_voting``, checked before any work."""
    if not isinstance(column, str) or column not in adata.obs:
        raise ValueError(
            f"majority_voting={column!r} is not a column of adata.obs {list(adata.obs)[:10]}; "
            "pass the name of a clustering column, e.g. 'leiden'."
        )
    clusters = adata.obs[column]
    n_missing = int(clusters.isna().sum())
    if n_missing:
        raise ValueError(
            f"the clustering column {column!r} has {n_missing} cell(s) without a cluster "
            "(NaN); give them a cluster of their own first, e.g. adata.obs[column] = "
            "adata.obs[column].astype(str).fillna('none'), or pass majority_voting=None."
        )
    return clusters


def _majority_vote(adata, column: str, clusters, labels: pd.Categorical, key: str) -> dict:
    frame = pd.DataFrame({"cluster": clusters.astype(str).to_numpy(), "label": labels})
    counts = pd.crosstab(frame["cluster"], frame["label"])
    winner = counts.idxmax(axis=1)
    share = counts.max(axis=1) / counts.sum(axis=1)
    voted = frame["cluster"].map(winner).to_numpy()
    adata.obs[f"{key}_majority_voting"] = pd.Categorical(voted, categories=labels.categories)
    adata.obs[f"{key}_vote_share"] = frame["cluster"].map(share).to_numpy().astype(np.float64)
    return {"column": column, "clusters": [str(c) for c in counts.index]}


def annotate(
    adata,
    model,
    *,
    layer: str | None = None,
    key_added: str = "tgem",
    copy: bool = False,
    batch_size: int = 1024,
    reject: str | None = "auto",
    threshold=None,
    unassigned: str = "unassigned",
    fill_value=None,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
    organism: str = "human",
    importances: bool = False,
    majority_voting: str | None = None,
):
    """Annotate the cells of an AnnData object with a fitted model, scanpy style.

    The data are read in row blocks of ``batch_size`` cells (sparse blocks stay sparse
    until the model's genes are picked), so a backed AnnData is never loaded whole. The
    data's genes are matched to the model's with :func:`tgem.datasets.match_genes`
    (symbols, Ensembl ids, versions, case, aliases).

    Parameters
    ----------
    adata : anndata.AnnData
        The cells, in memory or backed (``anndata.read_h5ad(path, backed="r")``). Values
        in the units the model was trained on (e.g. log-normalised).
    model : TGEMClassifier
        A classifier fitted on named genes (a DataFrame or AnnData).
    layer : str, optional
        The layer to read; ``adata.X`` when None.
    key_added : str, default="tgem"
        Prefix of the keys written (see Returns).
    copy : bool, default=False
        Annotate a copy and return it, leaving ``adata`` untouched. Not available for a
        backed AnnData (load it with ``adata.to_memory()`` first).
    batch_size : int, default=1024
        Cells read and predicted at a time.
    reject : {"auto", "max_proba", "energy", "neighbors", "combined"} or None, default="auto"
        The rejection rule (see :func:`rejection_scores`); None assigns every cell.
        ``"auto"``, for a model fitted with ``calibration="temperature"`` (it carries its
        thresholds and reference) and no ``threshold`` given: ``"combined"`` from 100
        held-out cells, the rule that flagged both cells of another organism and types
        left out of training in the project's measurements, and ``"neighbors"`` below
        (the combined p-values are then too coarse to reject 5 %). ``"max_proba"``
        otherwise: for other models, and when a threshold is given (it is then a
        probability).
        ``uns[key]["rejection"]["rule"]`` records the rule used.
    threshold : float, optional
        Cells whose score is below it are labelled ``unassigned``. When not given: the
        model's threshold fitted on its held-out cells (``rejection_thresholds_``, with
        ``calibration="temperature"``), else 0.5 for ``"max_proba"``, while ``"energy"``
        then requires one.
    unassigned : str, default="unassigned"
        The label of rejected cells.
    fill_value : float, optional
        Value of the model's genes missing from the data. When None, a model fitted with
        ``standardize=True`` fills each with its training mean (the input that moves a
        prediction least), and any other model refuses missing genes with an error.
    min_overlap : float in [0, 1], default=0.5
        Least share of the model's genes that must be found (see ``match_genes``).
    organism : {"human"}, default="human"
        Whose gene table matches the identifiers.
    importances : bool, default=False
        Also compute Integrated Gradients attributions of each cell's predicted class
        (slow: about 50 to 1000 network evaluations per cell) and store the mean over the
        cells predicted as each class.
    majority_voting : str, optional
        A clustering column of ``adata.obs`` (e.g. ``"leiden"``): every cell also gets
        the most frequent label of its cluster and that label's share of the cluster's
        cells. Cells without a cluster (NaN) raise an error: give them a cluster first.

    Returns
    -------
    adata : anndata.AnnData or None
        The annotated copy with ``copy=True``, else None. Written (``key = key_added``):

        - ``obs[key + "_label"]``: categorical, the model's classes and ``unassigned``;
        - ``obs[key + "_confidence"]``: the largest class probability;
        - ``obs[key + "_energy"]``: the energy score, with ``reject="energy"``;
        - ``obs[key + "_neighbor_distance"]``: the mean distance to the 10 nearest
          training cells (minus the score), with ``reject="neighbors"``;
        - ``obs[key + "_combined_p"]``: the smaller of the energy and neighbours
          p-values, with ``reject="combined"`` (also when ``"auto"`` resolves to it);
        - ``obsm[key + "_probabilities"]``: (n_cells, n_classes), columns in the order
          of ``uns[key]["classes"]``;
        - ``varm[key + "_importances"]``: (n_genes, n_classes) mean attribution of each
          data gene to the cells predicted as each class (0 for genes the model lacks),
          with ``importances=True``;
        - ``obs[key + "_majority_voting"]`` and ``obs[key + "_vote_share"]`` with
          ``majority_voting``;
        - ``uns[key]``: the model's identity (``tgem_version``, ``params``, ``classes``),
          the gene-match report (``gene_match``), the fill rule and the rejection rule,
          threshold, its source (``"given"``, ``"calibration"`` or ``"default"``) and
          label; plain values that survive ``write_h5ad`` and ``read_h5ad``.

    Notes
    -----
    With a backed AnnData the results go to the object in memory (``obs``, ``obsm``,
    ``varm`` and ``uns`` are in-memory parts of it), never to its file: a file opened
    read-only stays untouched. Save them with ``adata.write_h5ad(new_path)``, or with
    ``adata.write()`` for a file opened with ``backed="r+"``.

    Examples
    --------
    >>> import anndata
    >>> import tgem
    >>> from tgem.datasets import load_pbmc68k
    >>> X, y = load_pbmc68k(return_X_y=True, as_frame=True)
    >>> model = tgem.TGEMClassifier(max_epochs=2, random_state=0).fit(X[:500], y[:500])
    >>> adata = anndata.AnnData(X[500:])
    >>> tgem.annotate(adata, model)
    >>> adata.obs["tgem_label"].cat.categories[-1]
    'unassigned'
    >>> adata.obsm["tgem_probabilities"].shape
    (200, 10)
    """
    anndata = _import_anndata()
    if not isinstance(adata, anndata.AnnData):
        raise TypeError(f"adata must be an anndata.AnnData; got {type(adata).__name__}.")
    names = getattr(model, "feature_names_in_", None)
    if names is None:
        raise ValueError(
            "the model has no gene names (it was fitted on an array); fit it on a DataFrame "
            "or AnnData whose columns are the genes."
        )
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty str; got {key_added!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be an int; got {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size!r}.")
    source = "none"
    if reject == "auto":
        held = getattr(model, "calibration_scores_", {}).get("energy", ())
        if threshold is not None or not len(held):  # a given threshold is a probability
            reject = "max_proba"
        else:
            reject = "combined" if len(held) >= AUTO_COMBINED_MIN_CALIBRATION else "neighbors"
    if reject is not None:
        reject = _check_rule(reject)
        threshold, source = _resolve_threshold(threshold, reject, model)
    unassigned = _check_unassigned(unassigned, model.classes_)
    clusters = None if majority_voting is None else _check_clusters(adata, majority_voting)
    if copy:
        if adata.isbacked:
            raise ValueError(
                "copy=True is not available for a backed AnnData (its copy would need a new "
                "file); pass copy=False (results stay in memory, the file is untouched) or "
                "load it first with adata = adata.to_memory()."
            )
        adata = adata.copy()
    matrix = _matrix(adata, layer)
    match = match_genes(
        list(adata.var_names), list(names), organism=organism, min_overlap=min_overlap
    )
    fill, fill_rule = _fill_values(model, match, fill_value)
    n_cells, n_classes = adata.n_obs, len(model.classes_)
    proba = np.empty((n_cells, n_classes), dtype=np.float64)
    score = np.empty(n_cells, dtype=np.float64)
    attributions = np.zeros((n_classes, len(names)), dtype=np.float64)
    for start, block in _batches(matrix, match, fill, batch_size):
        frame = pd.DataFrame(block, columns=names)
        rows = slice(start, start + len(block))
        proba[rows], score[rows] = _proba_and_score(model, frame, reject or "max_proba")
        if importances:
            _add_importances(model, frame, proba[rows], attributions)
    predicted = np.argmax(proba, axis=1)
    codes = predicted.copy()  # category codes: no per-cell strings for a large file
    if reject is not None:
        codes[score < threshold] = n_classes
    categories = [str(c) for c in model.classes_] + [unassigned]
    labels = pd.Categorical.from_codes(codes, categories=categories)
    adata.obs[f"{key_added}_label"] = labels
    adata.obs[f"{key_added}_confidence"] = proba.max(axis=1)
    if reject == "energy":
        adata.obs[f"{key_added}_energy"] = score
    if reject == "neighbors":
        adata.obs[f"{key_added}_neighbor_distance"] = -score
    if reject == "combined":
        adata.obs[f"{key_added}_combined_p"] = score
    adata.obsm[f"{key_added}_probabilities"] = proba
    if importances:
        adata.varm[f"{key_added}_importances"] = _per_data_gene(
            attributions, predicted, n_classes, match, adata.n_vars
        )
    identity = _identity(model, match, reject, threshold, source, unassigned, layer, fill_rule)
    if majority_voting is not None:
        identity["majority_voting"] = _majority_vote(
            adata, majority_voting, clusters, labels, key_added
        )
    adata.uns[key_added] = identity
    return adata if copy else None


def _add_importances(model, frame, proba, sums: np.ndarray) -> None:
    predicted = np.argmax(proba, axis=1)
    with warnings.catch_warnings():  # interpret passes the frame on as an array
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        values = np.asarray(attribute(model, frame, target="predicted", internal_batch_size=64))
    np.add.at(sums, predicted, values)


def _per_data_gene(sums, predicted, n_classes, match, n_vars) -> np.ndarray:
    counts = np.bincount(predicted, minlength=n_classes).astype(np.float64)
    means = sums / np.maximum(counts, 1)[:, None]
    out = np.zeros((n_vars, n_classes), dtype=np.float64)
    found = match.index >= 0
    out[match.index[found]] = means[:, found].T
    return out
