"""tgem: T-GEM (Transformer for Gene Expression Modeling) as a scikit-learn estimator.

``TGEMClassifier`` is the model; :mod:`tgem.interpret` attributes its predictions to genes,
:mod:`tgem.attention` analyses its attention, :mod:`tgem.datasets` loads and selects data,
and :mod:`tgem.plotting` draws the figures (optional ``plot`` extra).
"""

import os

# The one change `import tgem` makes to the process: passive OpenMP waiting, unless the user
# set OMP_WAIT_POLICY or opted out with TGEM_SET_OMP_WAIT_POLICY=0. Why, and what it does:
# docs/install.rst, "What import tgem does to the process".
if os.environ.get("TGEM_SET_OMP_WAIT_POLICY", "1") != "0":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tgem._alignment import GeneAlignment, align_genes
from tgem._annotate import annotate
from tgem._classifier import TGEMClassifier
from tgem._gene_sets import GeneSetSelector
from tgem._h5ad import H5ADDataset
from tgem._io import load
from tgem._rejection import fit_rejection_threshold, predict_with_rejection, rejection_scores
from tgem._scale import RawCountsWarning, check_log_scale
from tgem._version import __version__
from tgem._versions import show_versions, versions

__all__ = [
    "TGEMClassifier",
    "GeneSetSelector",
    "GeneAlignment",
    "H5ADDataset",
    "RawCountsWarning",
    "align_genes",
    "annotate",
    "fit_rejection_threshold",
    "predict_with_rejection",
    "rejection_scores",
    "check_log_scale",
    "load",
    "show_versions",
    "versions",
    "__version__",
]
