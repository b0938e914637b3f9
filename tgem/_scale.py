"""A warning for input that looks like raw counts rather than log-scale expression."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

__all__ = ["RawCountsWarning", "check_log_scale"]

#: Largest number of values inspected; rows are taken evenly spaced, so the check is cheap
#: and deterministic on any size of data.
_MAX_VALUES = 1_000_000

PREPROCESSING_HINT = (
    "T-GEM expects log-scale expression, e.g. log1p of library-size-normalised counts "
    "(single cell) or log2 intensities/TPM (bulk); see the Preprocessing page of the tgem "
    "documentation (docs/user_guide/preprocessing.rst)."
)


class RawCountsWarning(UserWarning):
    """The input looks like raw counts or unlogged values, not log-scale expression."""


def _sample_values(X) -> np.ndarray:
    n_rows, n_cols = X.shape
    n_take = max(1, min(n_rows, _MAX_VALUES // max(n_cols, 1)))
    rows = np.unique(np.linspace(0, n_rows - 1, n_take).astype(np.intp))
    if sp.issparse(X):
        return np.asarray(sp.csr_matrix(X)[rows].data)
    if hasattr(X, "iloc"):
        X = X.iloc[rows]
        try:
            return X.to_numpy(dtype=np.float64).ravel()
        except (TypeError, ValueError):
            return np.empty(0)
    X = np.asarray(X)
    if X.dtype.kind not in "biuf":
        return np.empty(0)
    return X[rows].ravel()


def check_log_scale(
    X, *, count_threshold: float = 20.0, linear_threshold: float = 1000.0, stacklevel: int = 2
) -> bool:
    """Warn when X looks like raw counts or unlogged values instead of log-scale expression.

    T-GEM's attention multiplies expression values together (``q_i * k_j``), so raw
    counts in the thousands saturate the softmax and the training diverges or learns
    nothing. This check looks at evenly spaced rows (at most a million values), never
    copies the whole of X and never modifies it.

    It warns (:class:`RawCountsWarning`) when the finite values are non-negative and
    either all integers with a maximum above ``count_threshold`` (raw counts), or reach
    above ``linear_threshold`` (normalised but not log-transformed values, e.g. TPM).
    Data with negative values (z-scores, log ratios) never warn.

    Parameters
    ----------
    X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_features)
        Expression data.
    count_threshold : float, default=20.0
        Largest integer value still plausible on a log scale (log1p of a million is 13.8;
        log2 intensities stay below 20).
    linear_threshold : float, default=1000.0
        Largest value plausible on any log scale.
    stacklevel : int, default=2
        Passed to :func:`warnings.warn`, so that the warning points at the caller.

    Returns
    -------
    looks_raw : bool
        True when the warning was issued.

    Examples
    --------
    >>> import numpy as np, warnings
    >>> from tgem._scale import check_log_scale
    >>> counts = np.array([[0, 3, 250], [12, 0, 48]])
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     check_log_scale(counts)
    True
    >>> print(caught[0].message)  # doctest: +ELLIPSIS
    X looks like raw counts (non-negative integers up to 250)...
    >>> check_log_scale(np.log1p(counts))
    False
    """
    if not hasattr(X, "shape") or len(X.shape) != 2 or 0 in X.shape:
        return False
    values = _sample_values(X)
    if values.dtype.kind not in "biuf":
        return False
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if values.size == 0 or values.min() < 0:
        return False
    maximum = float(values.max())
    integers = values.dtype.kind in "biu" or bool(np.all(values == np.round(values)))
    if integers and maximum > count_threshold:
        what = f"raw counts (non-negative integers up to {maximum:.6g})"
    elif maximum > linear_threshold:
        what = f"values that are not log-transformed (non-negative, up to {maximum:.6g})"
    else:
        return False
    warnings.warn(
        f"X looks like {what}. {PREPROCESSING_HINT}", RawCountsWarning, stacklevel=stacklevel
    )
    return True
