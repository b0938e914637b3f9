"""Bundled data sets: real gene-expression data that ships inside the package."""

from __future__ import annotations

from importlib import resources

import numpy as np
from sklearn.utils import Bunch

__all__ = ["load_pbmc68k"]

_DATA = "tgem.datasets.data"
_DESCR = "tgem.datasets.descr"


def _read_descr(name: str) -> str:
    return resources.files(_DESCR).joinpath(name).read_text(encoding="utf-8")


def load_pbmc68k(*, return_X_y: bool = False, as_frame: bool = False):
    """Load the bundled single-cell PBMC data: 700 cells, 765 genes, 10 cell types.

    A subset of 10x Genomics' "Fresh 68k PBMCs" (Zheng et al. 2017) as distributed with
    scanpy (BSD-3-Clause), already log-normalised (``log1p`` of library-size-normalised
    counts). It ships inside tgem, so it loads offline. See ``DESCR`` for the full
    description, provenance and licence notice.

    =================   ==============
    Classes                         10
    Samples (cells)                700
    Features (genes)               765
    Values              float32, 0-6.5
    =================   ==============

    Parameters
    ----------
    return_X_y : bool, default=False
        If True, return ``(data, target)`` instead of a Bunch.
    as_frame : bool, default=False
        If True, ``data`` is a :class:`pandas.DataFrame` (cells x genes, indexed by the
        cell barcodes) and ``target`` a :class:`pandas.Series` named ``"cell_type"``;
        the Bunch also gets ``frame``, the two joined.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the attributes:

        data : ndarray of shape (700, 765), float32, or DataFrame
            Log-normalised expression, one row per cell.
        target : ndarray of shape (700,) of str, or Series
            The cell type of each cell, as names (not integer codes), so that a fitted
            classifier's ``classes_`` and its per-class tables are readable directly.
        feature_names : ndarray of shape (765,) of str
            Gene symbols, in column order.
        target_names : ndarray of shape (10,) of str
            The sorted cell-type names (the order of a classifier's ``classes_``).
        sample_names : ndarray of shape (700,) of str
            The cell barcodes.
        frame : DataFrame of shape (700, 766)
            Only when ``as_frame=True``: ``data`` with a ``cell_type`` column.
        DESCR : str
            Description, provenance and licence notice.

    (data, target) : tuple if ``return_X_y`` is True
        The arrays (or frames) described above.

    See Also
    --------
    tgem.datasets.read_expression_table : Read your own CSV/TSV expression table.
    tgem.datasets.read_h5ad : Read an AnnData file.

    Notes
    -----
    The arrays are created anew at each call: modifying them never changes what the next
    call returns.

    References
    ----------
    .. [1] Zheng, G. X. Y. et al. (2017). Massively parallel digital transcriptional
       profiling of single cells. Nature Communications 8, 14049.

    Examples
    --------
    >>> from tgem.datasets import load_pbmc68k
    >>> pbmc = load_pbmc68k()
    >>> pbmc.data.shape
    (700, 765)
    >>> list(pbmc.feature_names[:3])
    ['HES4', 'TNFRSF4', 'SSU72']
    >>> len(pbmc.target_names)
    10
    >>> X, y = load_pbmc68k(return_X_y=True, as_frame=True)
    >>> y.value_counts().head(2)
    cell_type
    Dendritic         240
    CD14+ Monocyte    129
    Name: count, dtype: int64
    """
    source = resources.files(_DATA).joinpath("pbmc68k_reduced.npz")
    with source.open("rb") as fh, np.load(fh) as npz:
        data = np.ascontiguousarray(npz["X"], dtype=np.float32)
        feature_names = npz["features"].astype(str).astype(object)
        sample_names = npz["samples"].astype(str).astype(object)
        target = npz["y_cell_type"].astype(str).astype(object)
    target_names = np.array(sorted(set(target)), dtype=object)
    frame = None
    if as_frame:
        import pandas as pd

        index = pd.Index(sample_names, name="cell")
        data = pd.DataFrame(data, index=index, columns=pd.Index(feature_names, name="gene"))
        target = pd.Series(target, index=index, name="cell_type")
        frame = data.join(target)
    if return_X_y:
        return data, target
    return Bunch(
        data=data,
        target=target,
        frame=frame,
        feature_names=feature_names,
        target_names=target_names,
        sample_names=sample_names,
        DESCR=_read_descr("pbmc68k.rst"),
    )
