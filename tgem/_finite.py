"""Finite inputs in, finite results out: the range of values tgem accepts, and its checks.

``MAX_ABS_VALUE`` bounds every input that goes through the network (``X`` in ``fit`` and
``predict``, ``.h5ad`` rows as they are read, baselines): :func:`check_magnitude` refuses more.

:mod:`tgem.interpret` and :mod:`tgem.attention` check the arrays they are given besides ``X``
(baselines, attributions to rank) with :func:`check_finite_input` before any work, and what
they return with :func:`check_finite_result` at the end, so that a NaN or an infinity is an
error that names the array, where it is and what to do, never a silent NaN in a ranking.
"""

from __future__ import annotations

import numpy as np
import torch

#: Largest |value| accepted in an input that goes through the network: T-GEM multiplies pairs
#: of values in float32, and every backend stays finite up to here (tests/test_numeric_range.py).
MAX_ABS_VALUE = 1e15


def check_magnitude(X):
    """Refuse values whose pairwise products would overflow float32; returns ``X``."""
    import scipy.sparse as sp

    data = X.data if sp.issparse(X) else X
    if isinstance(data, np.ndarray) and data.size:
        peak = max(abs(float(np.max(data))), abs(float(np.min(data))))
        if peak > MAX_ABS_VALUE:
            raise ValueError(
                f"X contains values as large as {peak:.3g} in absolute value; T-GEM multiplies "
                f"pairs of values in float32, so |X| must stay below {MAX_ABS_VALUE:g}. "
                "Log-transform the data (e.g. np.log1p of normalised counts) or scale it."
            )
    return X


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _first_bad(bad: np.ndarray, axes: tuple[str, ...] = ("sample", "gene")) -> str:
    """Where the first True of ``bad`` is, as 'sample i, gene j' (names of the last axes)."""
    where = [int(i) for i in np.argwhere(bad)[0]]
    if 2 <= len(where) <= len(axes):
        return ", ".join(f"{name} {i}" for name, i in zip(axes[-len(where) :], where))
    return f"index {tuple(where) if len(where) != 1 else where[0]}"


def check_finite_input(values, what: str, fix: str, *, limit: float | None = MAX_ABS_VALUE):
    """Raise ``ValueError`` when ``values`` hold NaN, infinities or ``|values| > limit``.

    Parameters
    ----------
    values : array-like or torch.Tensor
        Not modified.
    what : str
        The array's name in the message, e.g. ``"baseline"``.
    fix : str
        What the caller should pass instead (ends the message).
    limit : float or None
        Largest accepted absolute value (``X``'s limit by default); None checks only for
        NaN and infinities.

    Examples
    --------
    >>> check_finite_input([0.0, 1.0], "baseline", "pass finite numbers.")
    >>> check_finite_input([0.0, float("nan")], "baseline", "pass finite.")
    Traceback (most recent call last):
    ...
    ValueError: baseline holds 1 NaN or infinite value(s) (first at index 1: nan); pass finite.
    """
    arr = _as_numpy(values)
    if arr.size == 0 or arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(
            f"{what} holds {int(bad.sum())} NaN or infinite value(s) (first at "
            f"{_first_bad(bad)}: {float(arr[bad].ravel()[0])!r}); {fix}"
        )
    if limit is not None:
        peak = float(np.abs(arr).max())
        if peak > limit:
            big = np.abs(arr) > limit
            raise ValueError(
                f"{what} holds values as large as {peak:.3g} in absolute value (first at "
                f"{_first_bad(big)}); tgem accepts |values| <= {limit:g}, as for X. {fix}"
            )


def check_finite_result(values, what: str, fix: str, axes: tuple[str, ...] = ("sample", "gene")):
    """Return ``values`` when they are all finite; otherwise raise ``FloatingPointError``.

    Parameters
    ----------
    values : array-like or torch.Tensor
        A result about to be returned (not modified).
    what : str
        What it is, e.g. ``"attribute(method='integrated_gradients')'s attributions"``.
    fix : str
        What the caller can do (ends the message).
    axes : tuple of str
        Names of the last axes, for the position of the first bad value in the message.

    Examples
    --------
    >>> check_finite_result(np.ones(2), "the scores", "scale X.")
    array([1., 1.])
    >>> check_finite_result(np.array([[1.0, np.inf]]), "the scores", "scale X.")
    Traceback (most recent call last):
    ...
    FloatingPointError: the scores are not finite: 1 value(s) NaN or infinite (first at ...
    """
    arr = _as_numpy(values)
    if arr.size and arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise FloatingPointError(
                f"{what} are not finite: {int(bad.sum())} value(s) NaN or infinite (first at "
                f"{_first_bad(bad, axes)}: {float(arr[bad].ravel()[0])!r}); {fix}"
            )
    return values


#: The advice of result errors: what makes the network's numbers overflow and what helps.
RESULT_FIX = (
    "the network's numbers overflowed for these inputs. Scale or log-transform X (the model "
    "is meant for log-expression of a few units)."
)
