"""Align a data set's genes to the genes a model was fitted on, by name."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tgem._gene_sets import gene_names_of
from tgem._text import shown

__all__ = ["GeneAlignment", "align_genes"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneAlignment:
    """What :func:`align_genes` did: which genes matched, were missing or were extra.

    Attributes
    ----------
    n_genes : int
        Number of genes expected (the model's genes).
    n_matched : int
        Expected genes found in the data.
    missing : tuple of str
        Expected genes absent from the data (filled with ``fill_value``), in model order.
    extra : tuple of str
        Genes of the data that the model does not use (dropped), in data order.
    reordered : bool
        Whether the matched columns had to be put in another order.
    fill_value : float or None
        The value given to the missing genes, None when nothing was filled.
    """

    n_genes: int
    n_matched: int
    missing: tuple[str, ...]
    extra: tuple[str, ...]
    reordered: bool
    fill_value: float | None

    @property
    def is_exact(self) -> bool:
        """True when the data already had exactly the expected genes in the expected order."""
        return not self.missing and not self.extra and not self.reordered

    def __str__(self) -> str:
        text = f"{self.n_matched} of {self.n_genes} genes matched"
        if self.missing:
            text += f"; {len(self.missing)} missing, filled with {self.fill_value}"
        if self.extra:
            text += f"; {len(self.extra)} extra dropped"
        if self.reordered:
            text += "; columns reordered"
        return text


def _expected_genes(genes) -> list[str]:
    names = getattr(genes, "feature_names_in_", None)
    if names is None and hasattr(genes, "fit") and not isinstance(genes, Sequence):
        raise ValueError(
            f"{type(genes).__name__} has no feature_names_in_: it was not fitted on a "
            "DataFrame, so its genes are unknown. Pass the list of its genes instead."
        )
    names = genes if names is None else names
    names = [str(g) for g in np.asarray(names, dtype=object).ravel()]
    if not names:
        raise ValueError("genes is empty; pass the genes the model was fitted on.")
    duplicated = pd.Index(names)[pd.Index(names).duplicated()].unique()
    if len(duplicated):
        raise ValueError(
            f"genes names {len(duplicated)} gene(s) twice ({shown(duplicated)}); "
            "pass each gene once."
        )
    return names


def align_genes(X, genes, *, feature_names=None, fill_value: float | None = None):
    """Reorder the columns of X to the given genes, by name.

    Single-cell and bulk data sets rarely list their genes in the same order, and a
    model only sees column positions. This puts X's columns in the order of ``genes``
    (typically a fitted model's ``feature_names_in_``), drops the genes the model does not
    use and, only when ``fill_value`` is given, adds the missing ones with that value.

    Parameters
    ----------
    X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_features)
        The data. X itself is never modified.
    genes : array-like of str, or a fitted estimator
        The expected genes in order, or an estimator fitted on a DataFrame (its
        ``feature_names_in_`` are used).
    feature_names : array-like of str, optional
        The gene of each column of X when X is an array; None for a DataFrame.
    fill_value : float, optional
        Value for the expected genes that X lacks. When None (the default) missing genes
        are an error, because a silently filled gene changes predictions. For log-scale
        expression, 0 means "not detected". Sparse X accepts only ``fill_value=0``.

    Returns
    -------
    X_aligned : ndarray, sparse CSR matrix or DataFrame of shape (n_samples, len(genes))
        The same type as X (a new object; DataFrames keep their index).
    alignment : GeneAlignment
        What was matched, missing (and filled) and extra (and dropped).

    Raises
    ------
    ValueError
        If genes are missing and ``fill_value`` is None (the message lists them), if no
        gene matches, if X names a gene twice, or if X is an array without
        ``feature_names``.

    See Also
    --------
    tgem.GeneSetSelector : Select genes of gene sets in a pipeline.

    Examples
    --------
    >>> import pandas as pd
    >>> from tgem._alignment import align_genes
    >>> new = pd.DataFrame([[1.0, 2.0, 3.0]], columns=["LYZ", "CD3E", "XIST"])
    >>> X, report = align_genes(new, ["CD3E", "LYZ", "NKG7"], fill_value=0.0)
    >>> X
       CD3E  LYZ  NKG7
    0   2.0  1.0   0.0
    >>> report.missing, report.extra
    (('NKG7',), ('XIST',))
    >>> print(report)
    2 of 3 genes matched; 1 missing, filled with 0.0; 1 extra dropped; columns reordered
    """
    expected = _expected_genes(genes)
    names = gene_names_of(X, feature_names, "align_genes")
    present = pd.Index(names)
    if present.has_duplicates:
        duplicated = present[present.duplicated()].unique()
        raise ValueError(
            f"X names {len(duplicated)} gene(s) in more than one column ({shown(duplicated)});"
            " make gene names unique first, e.g. average duplicated columns with "
            "X.T.groupby(level=0).mean().T."
        )
    index = present.get_indexer(expected)
    found = index >= 0
    missing = tuple(g for g, ok in zip(expected, found, strict=True) if not ok)
    expected_set = set(expected)
    extra = tuple(n for n in names if n not in expected_set)
    if not found.any():
        raise ValueError(
            f"none of the {len(expected)} expected genes is among the {len(names)} gene names "
            f"of X (X has e.g. {shown(names, 3)}; expected e.g. {shown(expected, 3)}). Use "
            "the same identifiers (gene symbols or Ensembl ids) and case as the model."
        )
    if missing and fill_value is None:
        raise ValueError(
            f"X lacks {len(missing)} of the {len(expected)} genes the model was fitted on: "
            f"{shown(missing, 20)}. Add those columns, or pass fill_value (e.g. 0.0, 'not "
            "detected' for log-scale data) to fill them, knowing it changes predictions."
        )
    matched = index[found]
    reordered = bool(np.any(np.diff(matched) < 0))
    alignment = GeneAlignment(
        n_genes=len(expected),
        n_matched=int(found.sum()),
        missing=missing,
        extra=extra,
        reordered=reordered,
        fill_value=fill_value if missing else None,
    )
    if not alignment.is_exact:
        logger.info("align_genes: %s.", alignment)
    return _take_columns(X, index, found, expected, fill_value), alignment


def _take_columns(X, index, found, expected, fill_value):
    if isinstance(X, pd.DataFrame):
        out = X.iloc[:, index[found]].copy()
        out.columns = pd.Index(np.asarray(expected, dtype=object)[found])
        if not found.all():
            out = out.reindex(columns=expected, fill_value=fill_value)
        return out
    if sp.issparse(X):
        if not found.all() and fill_value != 0:
            raise ValueError(
                f"sparse X can only be filled with 0, got fill_value={fill_value!r}; pass "
                "fill_value=0 or a dense X."
            )
        X = sp.csc_matrix(X)
        taken = X[:, np.where(found, index, 0)]
        if not found.all():
            taken = taken @ sp.diags(found.astype(taken.dtype))
        return sp.csr_matrix(taken)
    X = np.asarray(X)
    dtype = X.dtype
    if not found.all():
        dtype = np.result_type(X.dtype, np.min_scalar_type(fill_value))
    out = np.empty((X.shape[0], len(expected)), dtype=dtype)
    out[:, found] = X[:, index[found]]
    if not found.all():
        out[:, ~found] = fill_value
    return out
