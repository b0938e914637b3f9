"""GeneSetSelector: keep the genes of given gene sets (how T-GEM picked its 1708 genes)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, _fit_context
from sklearn.feature_selection import SelectorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from tgem._text import shown
from tgem.datasets import read_gmt

__all__ = ["GeneSetSelector"]

logger = logging.getLogger(__name__)


def resolve_gene_sets(gene_sets) -> dict[str, list[str]]:
    """Turn any accepted ``gene_sets`` value into an ordered ``{name: [genes]}`` dict."""
    if isinstance(gene_sets, str | os.PathLike):
        return read_gmt(gene_sets)
    if isinstance(gene_sets, Mapping):
        resolved = {}
        for name, genes in gene_sets.items():
            genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
            if not genes:
                raise ValueError(
                    f"gene set {name!r} is empty; remove it or give it at least one gene."
                )
            resolved[str(name)] = list(dict.fromkeys(genes))
        if not resolved:
            raise ValueError(
                "gene_sets is an empty mapping; pass at least one gene set "
                "(e.g. {'T cells': ['CD3E', 'CD3D']}) or a GMT file."
            )
        return resolved
    if isinstance(gene_sets, set | frozenset):
        gene_sets = sorted(map(str, gene_sets))
    genes = [str(g) for g in np.asarray(gene_sets, dtype=object).ravel()]
    if not genes:
        raise ValueError(
            "gene_sets holds no gene; pass a list of gene names, a mapping of gene-set names "
            "to genes, or the path of a GMT file."
        )
    return {"genes": list(dict.fromkeys(genes))}


def gene_names_of(X, feature_names, owner: str) -> np.ndarray:
    """The gene names of ``X``: its DataFrame columns, or ``feature_names`` for arrays."""
    columns = getattr(X, "columns", None)
    if columns is not None:
        names = np.asarray([str(c) for c in columns], dtype=object)
        if feature_names is not None and list(map(str, feature_names)) != list(names):
            raise ValueError(
                f"{owner} got both a DataFrame and feature_names, and they disagree; pass "
                "feature_names=None to use the DataFrame's columns."
            )
        return names
    if feature_names is None:
        raise ValueError(
            f"{owner} needs gene names to match genes: pass X as a pandas DataFrame whose "
            "columns are the genes, or pass feature_names=<the gene of each column>."
        )
    names = np.asarray([str(n) for n in feature_names], dtype=object)
    n_columns = X.shape[1] if hasattr(X, "shape") and len(X.shape) == 2 else None
    if n_columns is not None and len(names) != n_columns:
        raise ValueError(
            f"feature_names has {len(names)} names but X has {n_columns} columns; pass one "
            "name per column of X."
        )
    return names


class GeneSetSelector(SelectorMixin, BaseEstimator):
    """Keep the columns (genes) of X that belong to the given gene sets.

    The original T-GEM trained on the union of 24 pathway gene sets (1708 genes); this
    transformer makes that selection a pipeline step. Genes are matched by name, exactly
    (case-sensitive), and the selected columns keep the order they have in X, so the
    output order is stable whatever the order of the gene sets. Genes of the sets that are
    not in X are reported in ``missing_genes_`` and in one logged warning.

    Parameters
    ----------
    gene_sets : mapping of str to list of str, list of str, or path
        The genes to keep: a mapping of gene-set names to genes (as returned by
        :func:`tgem.datasets.read_gmt`), a flat list of gene names, or the path of a GMT
        file (read at ``fit``). Empty sets are refused.
    feature_names : array-like of str, optional
        The gene of each column of X, for X given as an array (NumPy or SciPy sparse).
        Leave None for a DataFrame: its columns are used.

    Attributes
    ----------
    gene_sets_ : dict of str to list of str
        The gene sets used.
    support_ : ndarray of shape (`n_features_in_`,) of bool
        Which input columns are kept.
    genes_ : ndarray of str
        The kept genes, in the order of X's columns.
    missing_genes_ : ndarray of str
        Genes of the gene sets that are not in X, in gene-set order.
    coverage_ : DataFrame
        Per gene set: ``n_genes``, ``n_found`` (in X) and ``fraction_found``.
    n_features_in_ : int
        Number of columns seen in ``fit``.
    feature_names_in_ : ndarray of str
        Column names seen in ``fit`` (only for DataFrames).

    See Also
    --------
    tgem.datasets.read_gmt : Read gene sets from a GMT file.
    tgem.align_genes : Reorder a new data set's genes to a fitted model's genes.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from tgem._gene_sets import GeneSetSelector
    >>> X = pd.DataFrame(np.arange(8.0).reshape(2, 4), columns=["CD3E", "LYZ", "CD79A", "NKG7"])
    >>> selector = GeneSetSelector({"B": ["CD79A", "MS4A1"], "T": ["CD3E"]}).fit(X)
    >>> selector.get_feature_names_out().tolist()
    ['CD3E', 'CD79A']
    >>> selector.missing_genes_.tolist()
    ['MS4A1']
    >>> selector.transform(X)
    array([[0., 2.],
           [4., 6.]])

    With a NumPy array, give the gene names of its columns:

    >>> selector = GeneSetSelector(["NKG7", "LYZ"], feature_names=X.columns).fit(X.to_numpy())
    >>> selector.get_feature_names_out().tolist()
    ['LYZ', 'NKG7']
    """

    _parameter_constraints: dict = {
        "gene_sets": [Mapping, "array-like", set, frozenset, str, os.PathLike],
        "feature_names": ["array-like", None],
    }

    def __init__(self, gene_sets, *, feature_names=None):
        self.gene_sets = gene_sets
        self.feature_names = feature_names

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.input_tags.sparse = True
        tags.requires_fit = True
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Find the columns of X that belong to the gene sets.

        Parameters
        ----------
        X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_features)
            Expression data; its values are not used, only its gene names.
        y : None
            Ignored.

        Returns
        -------
        self : GeneSetSelector
            The fitted selector.
        """
        names = gene_names_of(X, self.feature_names, type(self).__name__)
        validate_data(
            self, X, accept_sparse=("csr", "csc"), dtype=None, ensure_all_finite=False, reset=True
        )
        self.gene_sets_ = resolve_gene_sets(self.gene_sets)
        wanted = list(dict.fromkeys(g for genes in self.gene_sets_.values() for g in genes))
        present = pd.Index(names)
        support = present.isin(wanted)
        if not support.any():
            raise ValueError(
                f"none of the {len(wanted)} genes of the gene sets is among the "
                f"{len(names)} gene names of X (X has e.g. {shown(names, 3)}; the sets have "
                f"e.g. {shown(wanted, 3)}). Use the same kind of identifiers (gene symbols "
                "or Ensembl ids) and the same case in both."
            )
        kept = present[support]
        if kept.has_duplicates:
            duplicated = kept[kept.duplicated()].unique()
            raise ValueError(
                f"X has {len(duplicated)} selected gene(s) in more than one column "
                f"({shown(duplicated)}); make gene names unique, e.g. average duplicated "
                "columns with X.T.groupby(level=0).mean().T."
            )
        found = set(kept)
        self.support_ = np.asarray(support, dtype=bool)
        self.genes_ = np.asarray(list(kept), dtype=object)
        self.missing_genes_ = np.asarray([g for g in wanted if g not in found], dtype=object)
        self.coverage_ = pd.DataFrame(
            {
                "n_genes": [len(genes) for genes in self.gene_sets_.values()],
                "n_found": [sum(g in found for g in genes) for genes in self.gene_sets_.values()],
            },
            index=pd.Index(list(self.gene_sets_), name="gene_set"),
        )
        self.coverage_["fraction_found"] = self.coverage_["n_found"] / self.coverage_["n_genes"]
        if len(self.missing_genes_):
            logger.warning(
                "GeneSetSelector: %d of the %d genes of the gene sets are not in X and are "
                "left out (%s); see missing_genes_ and coverage_.",
                len(self.missing_genes_),
                len(wanted),
                shown(self.missing_genes_),
            )
        return self

    def _get_support_mask(self):
        check_is_fitted(self, "support_")
        return self.support_

    def get_feature_names_out(self, input_features=None):
        """Names of the kept genes.

        Parameters
        ----------
        input_features : array-like of str, optional
            Input names, checked against the names seen in ``fit`` when those exist.

        Returns
        -------
        feature_names_out : ndarray of str
            The kept genes, in the order of X's columns.
        """
        check_is_fitted(self, "support_")
        if input_features is None:
            return self.genes_.copy()
        return super().get_feature_names_out(input_features)
