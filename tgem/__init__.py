"""tgem: T-GEM (Transformer for Gene Expression Modeling) as a scikit-learn estimator."""

from tgem._classifier import TGEMClassifier
from tgem._versions import show_versions, versions

__version__ = "0.1.0"

__all__ = ["TGEMClassifier", "show_versions", "versions", "__version__"]
