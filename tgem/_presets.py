"""Named parameter sets of :class:`tgem.TGEMClassifier`: the original's, and tgem 0.1's values.

``ORIGINAL_PARAMS`` is the configuration of Zhang et al. (2022) written out in full, so that
:meth:`TGEMClassifier.original <tgem.TGEMClassifier.original>` does not depend on the
constructor's defaults (which may change). ``V01_VALUES`` holds, for every parameter added
after tgem 0.1, the value that reproduces 0.1's behaviour: model files of format version 1
and pickles written by 0.1 lack these parameters, and are given these values when loaded
(never the current defaults).
"""

from __future__ import annotations

#: The original T-GEM's model and training configuration (every parameter it fixes).
ORIGINAL_PARAMS: dict = {
    "n_layers": 3,
    "n_heads": 5,
    "activation": "leakyrelu",
    "dropout": 0.3,
    "shared_norm": True,
    "learning_rate": 1e-4,
    "batch_size": 16,
    "max_epochs": 50,
    "weight_decay": 0.0,
    "early_stopping": False,
    "class_weight": None,
    "standardize": False,
    "qk_init_scale": 1.0,
    "importance_baseline": "zeros",
    "calibration": None,
    "tree_tolerance": None,
}

#: Values of the parameters added after tgem 0.1 that behave as 0.1 did.
V01_VALUES: dict = {
    "standardize": False,
    "qk_init_scale": 1.0,
    "calibration": None,
    "calibration_fraction": 0.1,
    "tree_tolerance": None,
}

#: Per model-file format version: the values of parameters such files may lack.
#: A parameter added after a version's files were written behaves there as it did in 0.1.
FILE_VERSION_VALUES: dict[int, dict] = {1: V01_VALUES, 2: V01_VALUES, 3: V01_VALUES}

#: ``early_stopping="auto"`` turns early stopping on from this many training samples (the
#: rows ``fit`` receives). The defaults study (issue 26) measured early stopping +0.5 points
#: on 8,617 CITE-seq cells (6,893 per training fold) and -4.3 points on 700 PBMC cells
#: (560), where a 10 % validation split of 56 cells stops the fit too early; 5,000 samples
#: hold out 500 validation cells at the default ``validation_fraction``. The threshold lies
#: between the two measured sizes; it was reasoned, not tuned.
AUTO_EARLY_STOPPING_MIN_SAMPLES = 5000


def uses_early_stopping(early_stopping, n_samples: int) -> bool:
    """Whether a fit on ``n_samples`` rows stops early under the ``early_stopping`` parameter.

    Examples
    --------
    >>> uses_early_stopping("auto", 700), uses_early_stopping("auto", 8617)
    (False, True)
    >>> uses_early_stopping(True, 10)
    True
    """
    if isinstance(early_stopping, str):  # "auto" (the parameter's constraint checks it)
        return n_samples >= AUTO_EARLY_STOPPING_MIN_SAMPLES
    return bool(early_stopping)
