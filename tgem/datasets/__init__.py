"""Bundled real data and readers for gene-expression files.

- :func:`load_pbmc68k`: single-cell PBMC data bundled with tgem (700 cells, 765 genes,
  10 cell types), loads offline.
- :func:`read_gmt`: gene sets from a GMT file (for :class:`tgem.GeneSetSelector`).
- :func:`read_expression_table`: CSV/TSV tables, genes as columns or rows, with labels.
- :func:`read_h5ad`: AnnData files (optional extra: ``pip install "tgem[anndata]"``).
- :func:`match_genes`: find a model's genes among a data set's gene names across symbols,
  Ensembl ids, version suffixes, case and aliases (:class:`GeneMatch` is its report).
"""

from tgem.datasets._base import load_pbmc68k
from tgem.datasets._gene_ids import GeneMatch, match_genes
from tgem.datasets._readers import read_expression_table, read_gmt, read_h5ad

__all__ = [
    "GeneMatch",
    "load_pbmc68k",
    "match_genes",
    "read_expression_table",
    "read_gmt",
    "read_h5ad",
]
