"""Stratified subsampling, and the private training sample ``feature_importances_`` needs.

The bottom layer of the package: it imports nothing from tgem (see docs/architecture.rst).
Every stratified subsample in tgem comes from :func:`stratified_subsample`: the rows that
``TGEMClassifier.feature_importances_`` attributes (taken at ``fit``, see
:class:`TrainingSample`) and the rows the command-line interface attributes or analyses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MIN_PER_CLASS", "TrainingSample", "stratified_subsample"]

#: Rows per class that :func:`stratified_subsample` keeps by default where the class has them.
MIN_PER_CLASS = 20


def stratified_subsample(
    y, n_samples: int, rng: np.random.Generator, *, min_per_class: int = MIN_PER_CLASS
) -> np.ndarray:
    """Sorted row indices: about ``n_samples`` rows stratified by class.

    Each class first gets ``min_per_class`` rows (all of its rows when it has fewer), so the
    result may hold more than ``n_samples`` rows; the rest is shared in proportion to the rows
    each class has left (largest remainders). With ``min_per_class=0`` exactly
    ``n_samples`` rows are returned, in proportion to the class sizes. Rows are drawn without
    replacement from ``rng``; with ``n_samples >= len(y)`` every row is returned.

    Parameters
    ----------
    y : array-like of shape (n_rows,)
        Class labels or class indices.
    n_samples : int
        Rows wanted.
    rng : numpy.random.Generator
        The only source of randomness.
    min_per_class : int, default=MIN_PER_CLASS
        Rows each class keeps where it has them.

    Returns
    -------
    ndarray of int64, sorted

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([0] * 90 + [1] * 10)
    >>> idx = stratified_subsample(y, 30, np.random.default_rng(0))
    >>> len(idx), int((y[idx] == 1).sum())
    (30, 10)
    >>> len(stratified_subsample(y, 30, np.random.default_rng(0), min_per_class=0))
    30
    """
    y = np.asarray(y)
    classes, y_index, counts = np.unique(y, return_inverse=True, return_counts=True)
    if n_samples >= len(y):
        return np.arange(len(y))
    alloc = np.minimum(counts, min_per_class)
    left = n_samples - alloc.sum()
    if left > 0:
        room = counts - alloc
        share = left * room / room.sum()
        extra = np.floor(share).astype(int)
        rest = left - extra.sum()
        order = np.argsort(-(share - extra), kind="stable")
        extra[order[:rest]] += 1
        alloc += np.minimum(extra, room)
    chosen = [
        rng.choice(np.flatnonzero(y_index == c), size=a, replace=False) for c, a in enumerate(alloc)
    ]
    return np.sort(np.concatenate(chosen))


@dataclass(frozen=True, eq=False)
class TrainingSample:
    """What ``feature_importances_`` and ``baseline="mean"`` need of the training data.

    ``fit`` takes it (:meth:`take`) and the estimator keeps it in memory only: pickles and
    model files never hold it, so a loaded model has the importances it was saved with and
    no training rows. Its arrays are private copies that nothing modifies.

    Attributes
    ----------
    X : ndarray or scipy sparse matrix of shape (n_rows, n_genes)
        A copy of the stratified rows (dense rows for an ``.h5ad`` input).
    y : ndarray of shape (n_rows,)
        Their class indices.
    mean : ndarray of shape (n_genes,)
        The per-gene mean of all the training rows (float64), the ``"mean"`` baseline.
    """

    X: object
    y: np.ndarray
    mean: np.ndarray

    @classmethod
    def take(cls, X, y_enc, n_samples: int, seed: int) -> TrainingSample:
        """Copy the stratified rows of ``X`` (:func:`stratified_subsample`) and its mean.

        ``seed`` seeds the subsample's generator.

        Examples
        --------
        >>> import numpy as np
        >>> X = np.arange(200.0).reshape(100, 2)
        >>> sample = TrainingSample.take(X, np.repeat([0, 1], 50), 60, seed=0)
        >>> sample.X.shape, sample.mean.tolist(), np.shares_memory(sample.X, X)
        ((60, 2), [99.0, 100.0], False)
        """
        y_enc = np.asarray(y_enc)
        idx = stratified_subsample(y_enc, int(n_samples), np.random.default_rng(seed))
        rows = X[idx]  # fancy indexing copies (an .h5ad dataset reads the rows)
        mean = np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
        return cls(X=rows, y=y_enc[idx].astype(np.int64), mean=mean)

    def __deepcopy__(self, memo):  # never modified: deep copies of an estimator share it
        return self

    def __reduce__(self):
        raise TypeError(
            "the training sample of feature_importances_ is never pickled (it holds training "
            "rows); TGEMClassifier.__getstate__ leaves it out."
        )
