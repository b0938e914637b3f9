"""Input checks and ``.h5ad`` polymorphism: what ``TGEMClassifier`` trains and predicts on.

``fit`` and ``predict`` accept NumPy arrays, scipy sparse matrices, pandas DataFrames and, for
data that does not fit in memory, an ``.h5ad`` path, an AnnData or a :class:`tgem.H5ADDataset`
(read from disk batch by batch). This module turns each of them into what the training loop
and the network read (a validated array or an ``H5ADDataset``), with errors that name the
problem and the fix, and splits it into the parts ``fit`` holds out (validation,
calibration) without reading an ``.h5ad`` file into memory. The estimator only calls it.
"""

from __future__ import annotations

import numbers
import re
import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    _get_feature_names,
    _num_features,
    column_or_1d,
    validate_data,
)

from tgem._calibration import split_calibration
from tgem._finite import check_magnitude
from tgem._h5ad import h5ad_fit_input, h5ad_predict_input, is_h5ad_input, take_rows
from tgem._scale import check_log_scale
from tgem._standardize import gene_statistics


def _valid_device(value) -> bool:
    """Whether ``value`` names a device: "auto", "cpu", "cuda" or "cuda:N"."""
    if not isinstance(value, str):
        return False
    if value in ("auto", "cpu", "cuda"):
        return True
    return value.startswith("cuda:") and value[5:].isdigit()


#: What to do about scikit-learn's input errors: (pattern of its message, the fix appended).
_INPUT_FIXES = (
    (
        "could not convert|non-numeric|dtype='numeric' is not compatible",
        "X must hold numbers only: convert it (e.g. X.astype(float), or pd.to_numeric per "
        "column) and drop label or annotation columns before passing it.",
    ),
    (
        "inconsistent numbers of samples",
        "X and y must describe the same samples: pass one label in y per row of X.",
    ),
    ("Found array with 0 sample", "X is empty: pass at least one sample (row)."),
    ("Found array with 0 feature", "X has no genes: pass at least one gene (column)."),
    (
        "features, but .* is expecting|feature names should match",
        "Pass the genes the model was fitted on, in the same order; tgem.align_genes(X, model) "
        "reorders a DataFrame's genes by name and reports missing and extra ones.",
    ),
)


def _label_kind(y) -> str:
    """'string' or 'number': the kind of labels in y (as scikit-learn's metrics tell them)."""
    values = np.asarray(y)
    if values.dtype.kind in "OUS" and any(isinstance(v, str) for v in values.ravel()):
        return "string"
    return "number"


def _validate_data(estimator, *args, **kw):
    """scikit-learn's ``validate_data``, with the fix added to the messages of its errors."""
    try:
        return validate_data(estimator, *args, **kw)
    except ValueError as exc:
        message = str(exc)
        for pattern, fix in _INPUT_FIXES:
            if re.search(pattern, message) and fix not in message:
                raise type(exc)(f"{message} {fix}") from exc
        raise


def _check_columns(X) -> None:
    """Clear errors for a pandas DataFrame with duplicated or non-numeric gene columns."""
    if not isinstance(X, pd.DataFrame):
        return
    columns = pd.Index(X.columns)
    if columns.has_duplicates:
        dup = columns[columns.duplicated()].unique().tolist()
        raise ValueError(
            f"X has {len(dup)} duplicated column name(s), e.g. {dup[:5]}; each gene must be one "
            "column. Make the names unique, e.g. average duplicated genes with "
            "X.T.groupby(level=0).mean().T."
        )
    for i, dtype in enumerate(X.dtypes):
        if pd.api.types.is_numeric_dtype(dtype):
            continue
        column = X.iloc[:, i]
        numbers = pd.to_numeric(column.astype(object), errors="coerce")
        bad = column[numbers.isna() & column.notna()]
        if len(bad):
            raise ValueError(
                f"X's column {columns[i]!r} (dtype {dtype}) holds non-numeric values such as "
                f"{bad.iloc[0]!r}; T-GEM needs a number for every gene. Drop or convert that "
                "column (e.g. X.drop(columns=[...]) or pd.to_numeric)."
            )


#: Largest sum of the sample weights: the loss sums weighted NLLs in float32 (max ~3.4e38).
MAX_TOTAL_WEIGHT = 1e30


def _genes_of(X) -> tuple[int | None, np.ndarray | None]:
    """The number of genes (columns) of ``X`` and their names (None when it has none)."""
    try:
        n_genes = _num_features(X)
    except TypeError:  # e.g. a 1-d array: validate_data gives the clear error
        n_genes = None
    return n_genes, _get_feature_names(X)


def _gene_difference(fitted, names) -> tuple[list, list]:
    """The fitted genes missing from ``names``, and the genes of ``names`` not fitted."""
    fitted_set, names_set = set(fitted), set(names)
    missing = [g for g in fitted if g not in names_set]
    return missing, [g for g in names if g not in fitted_set]


def _check_missing_labels(y) -> None:
    """Refuse labels that are None or NaN (an unlabelled sample), naming where they are."""
    if y.dtype.kind not in "OfcmM":  # ints, bools and strings cannot be missing
        return
    missing = np.flatnonzero(pd.isna(y))
    if len(missing):
        raise ValueError(
            f"y has {len(missing)} missing labels (None or NaN) out of {len(y)}, at rows "
            f"{missing[:5].tolist()}{' ...' if len(missing) > 5 else ''}; every sample needs a "
            "class. Drop the unlabelled samples (e.g. keep = pd.notna(y); fit(X[keep], "
            "y[keep])) or fill their labels."
        )


def _check_weights(sample_weight, class_weight, X, y, classes, y_enc) -> np.ndarray:
    """The per-sample loss weights (sample_weight x class_weight), checked for the loss."""
    weights = _check_sample_weight(sample_weight, X, dtype=np.float64)
    negative = np.flatnonzero(weights < 0)
    if len(negative):
        raise ValueError(
            f"sample_weight has {len(negative)} negative value(s), e.g. "
            f"{weights[negative[0]]:g} at row {negative[0]}; weights scale each sample's "
            "loss and must be >= 0; pass non-negative weights (0 leaves a sample out)."
        )
    if class_weight is not None:
        if isinstance(class_weight, dict):
            bad = {
                k: v
                for k, v in class_weight.items()
                if not (isinstance(v, numbers.Real) and np.isfinite(v) and v >= 0)
            }
            if bad:
                label, value = next(iter(bad.items()))
                raise ValueError(
                    f"class_weight has a negative or non-finite weight, {value!r} for class "
                    f"{label!r}; pass weights >= 0 (e.g. {{{label!r}: 1.0}}) or "
                    "class_weight='balanced'."
                )
        weights = weights * compute_class_weight(class_weight, classes=classes, y=y)[y_enc]
    if not np.any(weights > 0):
        raise ValueError("All sample weights are zero; pass at least one positive weight.")
    total = float(np.sum(weights))
    if not total <= MAX_TOTAL_WEIGHT:
        raise ValueError(
            f"The sample weights add up to {total:g} (largest {np.max(weights):g}), which would "
            f"overflow the float32 loss (the sum must stay below {MAX_TOTAL_WEIGHT:g}); "
            "only their ratios matter, so rescale them, e.g. sample_weight / "
            "sample_weight.max()."
        )
    if not np.any(weights.astype(np.float32) > 0):
        raise ValueError(
            f"The sample weights are all below float32's smallest positive value (largest "
            f"{np.max(weights):g}), so the float32 loss would weigh every sample 0; only "
            "their ratios matter, so rescale them, e.g. sample_weight / sample_weight.max()."
        )
    return weights


def input_statistics(X, dist=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and scale of the training ``X`` (float64); rank 0's under DDP.

    Every process holds (or can read) all of ``X`` and computes the same statistics; they are
    broadcast from rank 0 all the same, so all processes standardise identically.
    """
    mean, scale = gene_statistics(X)
    if dist is not None:
        mean, scale = dist.broadcast(mean), dist.broadcast(scale)
    return mean, scale


def check_warm_genes(estimator, n_genes, names) -> None:
    """Refuse a warm fit on other genes than the fitted ones (count, names and order)."""
    if n_genes is None:  # not a 2-d table: validate_data names the problem
        return
    fix = (
        "A warm fit continues the fitted network, whose weights are per gene: pass the "
        "fitted genes in their order (X[clf.feature_names_in_], or tgem.align_genes(X, "
        "clf)) or set warm_start=False to train anew."
    )
    fitted = getattr(estimator, "feature_names_in_", None)
    if n_genes != estimator.n_features_in_:
        detail = ""
        if fitted is not None and names is not None:
            missing, extra = _gene_difference(fitted, names)
            detail = f" (missing {missing[:5]}, extra {extra[:5]})"
        raise ValueError(
            f"warm_start=True but X has {n_genes} genes while the model was fitted on "
            f"{estimator.n_features_in_}{detail}. {fix}"
        )
    if fitted is None:
        return
    if names is None:
        raise ValueError(
            "warm_start=True but the model was fitted with gene names and X has no names "
            "(e.g. a NumPy array), so its genes cannot be checked. Pass a DataFrame (or "
            f"AnnData) with the fitted genes as columns. {fix}"
        )
    names = np.asarray(names, dtype=object)
    if np.array_equal(names, np.asarray(fitted, dtype=object)):
        return
    missing, extra = _gene_difference(fitted, names)
    if extra:
        raise ValueError(
            f"warm_start=True but X has genes the model was not fitted on, {extra[:5]}, "
            f"and lacks fitted genes {missing[:5]}. {fix}"
        )
    i = int(np.flatnonzero(names != np.asarray(fitted, dtype=object))[0])
    raise ValueError(
        f"warm_start=True but X has the fitted genes in another order (position {i} holds "
        f"{names[i]!r} instead of {fitted[i]!r}); per-gene weights would move to other "
        f"genes. Reorder the columns: X[clf.feature_names_in_]. {fix}"
    )


def fit_input(estimator, X, y, warm: bool):
    """``(X, y)`` checked for ``fit``: a validated array, or an ``.h5ad`` dataset read lazily.

    Array input goes through scikit-learn's ``validate_data`` (which sets ``n_features_in_``
    and ``feature_names_in_`` unless ``warm``); a warm fit's genes are checked first, so a
    refused warm fit leaves the model unchanged.
    """
    if is_h5ad_input(X):
        X, y = h5ad_fit_input(estimator, X, y)
        if warm:
            check_warm_genes(estimator, X.shape[1], X.var_names)
    else:
        _check_columns(X)
        if warm:
            check_warm_genes(estimator, *_genes_of(X))
        if y is not None:
            _check_missing_labels(np.asarray(y, dtype=object))
        X, y = _validate_data(
            estimator,
            X,
            y,
            reset=not warm,
            accept_sparse=["csr", "csc"],
            dtype=[np.float32, np.float64],
            y_numeric=False,
            multi_output=False,
        )
        check_magnitude(X)
        check_log_scale(X, stacklevel=5)
    y = column_or_1d(y, warn=True)
    _check_missing_labels(y)
    check_classification_targets(y)
    return X, y


def predict_input(estimator, X, reset: bool = False):
    """``X`` checked against the fitted genes: a validated array or an ``.h5ad`` dataset."""
    if is_h5ad_input(X):  # streamed from disk batch by batch
        return h5ad_predict_input(estimator, X)
    _check_columns(X)
    kw = dict(
        accept_sparse=["csr", "csc"],
        dtype=[np.float32, np.float64],
        ensure_min_samples=1,
        reset=reset,
    )
    return check_magnitude(_validate_data(estimator, X, **kw))


def split_calibration_cells(
    X, y_enc, weights, sample_weight, fraction: float, seed, warm: bool, previous
):
    """Training part and held-out calibration cells ``(X, y, sample_weight, rows)``.

    ``previous`` is the held-out rows of the fit a ``warm`` fit continues (None if it was
    not calibrated).
    """
    train, held = split_calibration(y_enc, int(y_enc.max()) + 1, float(fraction), seed)
    sw = _check_sample_weight(sample_weight, X, dtype=np.float64)
    if not np.any(sw[held] > 0):
        raise ValueError(
            f"all {len(held)} held-out calibration cells have sample_weight 0, so nothing "
            "is left to calibrate on; give them positive weights or fit with "
            "calibration=None."
        )
    if warm and not np.array_equal(held, previous):
        warnings.warn(
            "warm_start=True with calibration='temperature' holds out other cells than "
            "the previous fit did (it was not calibrated, random_state is not an int, or "
            "X or y changed), so the network may have trained on some of the cells it is "
            "now calibrated on, which makes the calibration over-confident. Fit with an "
            "int random_state on the same X and y, or with warm_start=False.",
            UserWarning,
            stacklevel=4,
        )
    return (  # both sorted: an .h5ad file is read in disk order
        take_rows(X, train),
        y_enc[train],
        weights[train],
        (take_rows(X, held), y_enc[held], sw[held], held),
    )


def split_validation(X, y_enc, weights, fraction: float, seed):
    """Stratified training and validation parts ``(X, y, w, (X_va, y_va, w_va))``."""
    idx = np.arange(X.shape[0])
    try:
        tr, va = train_test_split(idx, test_size=fraction, stratify=y_enc, random_state=int(seed))
    except ValueError as exc:
        warnings.warn(
            f"A stratified validation split is impossible ({exc}); using a random split.",
            UserWarning,
            stacklevel=3,
        )
        tr, va = train_test_split(idx, test_size=fraction, random_state=int(seed))
    if len(tr) == 0 or len(va) == 0:
        raise ValueError(
            f"validation_fraction={fraction} leaves no training or no "
            f"validation sample out of {X.shape[0]}. Use more data or early_stopping=False."
        )
    if is_h5ad_input(X):  # keep disk order for chunked reads
        tr, va = np.sort(tr), np.sort(va)
    return (
        take_rows(X, tr),
        y_enc[tr],
        weights[tr],
        (take_rows(X, va), y_enc[va], weights[va]),
    )
