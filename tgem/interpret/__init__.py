"""Gene attributions of a fitted T-GEM model, per-class gene rankings and the ablation study.

* :func:`attribute` — one verb for the original's six attribution methods (Integrated
  Gradients, its SmoothGrad-squared and VarGrad noise tunnels, Guided Backprop and its noise
  tunnels), memory-bounded and reproducible, for any target.
* :func:`gene_ranking` — per class, the mean and median attribution of each gene over the
  class's samples, ranked (the original's "gene importance rank for each cancer");
  :func:`write_rnk` exports each class as a GSEA pre-ranked ``.rnk`` file.
* :func:`ablation_study` — per class, the accuracy drop when the class's top-ranked genes are
  set to 0, next to the same number of random genes.
* :func:`training_importances` — what ``TGEMClassifier.feature_importances_`` returns.

Attributions explain the target's **log-probability** (the network's output), as in the
original, which applied captum to the log-softmax output.

Attributions and baselines are in the units of ``X`` as passed to the classifier, one value
per input gene. The ``"zeros"`` baseline is an input of zeros in those units (zero
expression on log-normalised data), also for a model fitted with ``standardize=True``: its
per-gene standardisation is the network's first operation, so the path from the baseline
to ``x`` runs through the standardised values ``(0 - mean) / scale`` to ``(x - mean) /
scale`` and the gradients include the ``1 / scale`` factors. To ask "compared with average
expression" pass ``baseline="mean"``.
"""

# Besides __all__, MIN_PER_CLASS, stratified_subsample, ALIASES and MEMORY_BUDGET stay
# importable from here, as before the package was split (the CLI, tests, benchmarks).
from tgem.interpret._ablation import GRIDS, ablation_study
from tgem.interpret._attribute import attribute
from tgem.interpret._importances import MIN_PER_CLASS as MIN_PER_CLASS
from tgem.interpret._importances import stratified_subsample as stratified_subsample
from tgem.interpret._importances import training_importances
from tgem.interpret._ranking import gene_ranking, write_rnk
from tgem.interpret._resolve import ALIASES as ALIASES
from tgem.interpret._resolve import MEMORY_BUDGET as MEMORY_BUDGET
from tgem.interpret._resolve import METHODS

__all__ = [
    "METHODS",
    "GRIDS",
    "attribute",
    "gene_ranking",
    "write_rnk",
    "ablation_study",
    "training_importances",
]
