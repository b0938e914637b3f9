"""tgem: T-GEM (Transformer for Gene Expression Modeling) as a scikit-learn estimator.

``TGEMClassifier`` is the model; :mod:`tgem.interpret` attributes its predictions to genes,
:mod:`tgem.attention` analyses its attention, :mod:`tgem.datasets` loads and selects data,
and :mod:`tgem.plotting` draws the figures (optional ``plot`` extra).
"""

from tgem._alignment import GeneAlignment, align_genes
from tgem._classifier import TGEMClassifier
from tgem._gene_sets import GeneSetSelector
from tgem._h5ad import H5ADDataset
from tgem._io import load
from tgem._scale import RawCountsWarning, check_log_scale
from tgem._versions import show_versions, versions

__version__ = "0.1.0"

__all__ = [
    "TGEMClassifier", "GeneSetSelector", "GeneAlignment", "H5ADDataset", "RawCountsWarning",
    "align_genes", "check_log_scale", "load", "show_versions", "versions", "__version__",
]
