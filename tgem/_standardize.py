"""Per-gene mean and scale of a training matrix, streamed by row blocks (``standardize=True``).

:func:`gene_statistics` reads the matrix one block of rows at a time, as float64, and merges
the blocks' exact (two-pass) means and sums of squared deviations with Chan, Golub and
LeVeque's pairwise update, which is numerically safe for any number of rows. A dense array is
sliced, a scipy sparse matrix and an out-of-core :class:`tgem.H5ADDataset` are densified one
block at a time, so the memory needed is one block (about :data:`BLOCK_ELEMENTS` values)
whatever the size of the data, and all three kinds of input give bit-identical statistics for
the same values. The variance is the population variance (``ddof=0``), as in scikit-learn's
``StandardScaler``.

Genes whose values are all equal in the training data (zero variance) get scale 1 and their
exact value as mean, so they enter the network as exact zeros (scikit-learn's rule for
constant features).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["BLOCK_ELEMENTS", "gene_statistics"]

#: Values (rows x genes) densified at once while computing the statistics (32 MiB of float64).
BLOCK_ELEMENTS = 1 << 22


def _row_blocks(X, block_rows: int):
    """Consecutive row blocks of ``X`` as float64 dense arrays (one block in memory at a time)."""
    n = X.shape[0]
    if sp.issparse(X) and X.format not in ("csr", "csc"):
        X = X.tocsr()  # COO and friends cannot be sliced by rows
    for start in range(0, n, block_rows):
        block = X[start : min(n, start + block_rows)]
        if sp.issparse(block):
            if not block.has_canonical_format:
                block = block.copy()
                block.sum_duplicates()  # duplicated entries add up, as toarray() does
            block = block.toarray()
        # C order always: sums over a Fortran-ordered block (CSC rows densify that way) would
        # add in another order and differ in the last bits
        yield np.ascontiguousarray(block, dtype=np.float64)


def gene_statistics(X, block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and scale (standard deviation, ``ddof=0``) of ``X``, in float64.

    Parameters
    ----------
    X : ndarray, scipy sparse matrix or H5ADDataset of shape (n_samples, n_genes)
        The training matrix; anything sliceable by rows (``X[a:b]``) whose slices are dense
        arrays or scipy sparse matrices. It is never modified nor densified whole.
    block_rows : int, optional
        Rows read at once; by default as many as fit in :data:`BLOCK_ELEMENTS` values.

    Returns
    -------
    mean, scale : ndarray of shape (n_genes,), float64
        ``scale`` is 1 for genes with zero variance (all values equal), whose ``mean`` is
        then that value exactly.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> X = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0], [4.0, 1.0, 1.0]])
    >>> mean, scale = gene_statistics(X)
    >>> mean.tolist(), np.round(scale, 4).tolist()
    ([2.0, 1.0, 1.0], [1.633, 1.0, 0.8165])
    >>> [np.array_equal(a, b) for a, b in zip(gene_statistics(sp.csr_matrix(X)), (mean, scale))]
    [True, True]
    """
    n, g = X.shape
    if n < 1:
        raise ValueError(f"X has {n} rows; per-gene statistics need at least one sample.")
    if block_rows is None:
        block_rows = max(1, BLOCK_ELEMENTS // max(g, 1))
    count = 0
    mean = np.zeros(g, dtype=np.float64)
    m2 = np.zeros(g, dtype=np.float64)  # sum of squared deviations from the mean
    low = np.full(g, np.inf)
    high = np.full(g, -np.inf)
    for block in _row_blocks(X, block_rows):
        b = block.shape[0]
        block_mean = block.sum(axis=0) / b
        block_m2 = np.square(block - block_mean).sum(axis=0)
        total = count + b
        delta = block_mean - mean
        mean += delta * (b / total)
        m2 += block_m2 + np.square(delta) * (count * b / total)
        count = total
        np.minimum(low, block.min(axis=0), out=low)
        np.maximum(high, block.max(axis=0), out=high)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise ValueError(
            "X holds NaN or infinite values; per-gene statistics need finite expression. "
            "Remove or impute them before fitting."
        )
    scale = np.sqrt(m2 / count)
    constant = low == high
    mean[constant] = low[constant]
    scale[constant] = 1.0
    return mean, scale
