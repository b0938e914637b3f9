"""scikit-learn's own estimator checks on TGEMClassifier."""

from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from tgem import TGEMClassifier

# A small, fast configuration that still learns the checks' toy problems.
CHECKED = TGEMClassifier(
    n_layers=1,
    n_heads=2,
    learning_rate=1e-2,
    max_epochs=30,
    dropout=0.0,
    random_state=0,
    n_threads=1,
)

# The same without the in-network standardisation (the original's input path).
CHECKED_UNSTANDARDIZED = clone(CHECKED).set_params(standardize=False)

# tgem's defaults, 5 epochs (the defaults study's target: every check at the defaults).
CHECKED_DEFAULTS = TGEMClassifier(max_epochs=5, random_state=0, n_threads=1)

EXPECTED_FAILED = {
    "check_sample_weight_equivalence_on_dense_data": (
        "Mini-batch Adam: a weight of 2 is not the same optimisation path as a repeated row "
        "(batches and the number of steps per epoch differ), so the fitted weights differ."
    ),
    "check_sample_weight_equivalence_on_sparse_data": (
        "Same reason as on dense data: repeated rows change the mini-batches and step count."
    ),
}


#: At the defaults with 5 epochs the network does not fit check_classifiers_train's toy
#: problem (300 points of 3 blobs in 2 dimensions, training accuracy must exceed 0.83): 95
#: Adam steps at learning rate 1e-3 reach 0.65 (10 epochs 0.69, 20 epochs 0.80; even learning
#: rate 1e-2 reaches only 0.81 in 5 epochs). Two genes give the attention and the LayerNorm
#: almost nothing to work with; the small configuration above passes it. Likewise
#: check_class_weight_classifiers (20 Adam steps). Every other check passes at the defaults.
DEFAULTS_FAILED = {
    **EXPECTED_FAILED,
    "check_classifiers_train": (
        "5 epochs at the defaults reach 0.65 training accuracy on the 2-feature blobs "
        "(0.83 required); see tests/test_common.py"
    ),
    "check_class_weight_classifiers": (
        "50 training rows: 5 epochs are 20 Adam steps at learning rate 1e-3, too few to move "
        "more than 87 % of the predictions to the heavily weighted class"
    ),
}


def _expected_failed(estimator):
    return DEFAULTS_FAILED if estimator is CHECKED_DEFAULTS else EXPECTED_FAILED


@parametrize_with_checks(
    [CHECKED, CHECKED_UNSTANDARDIZED, CHECKED_DEFAULTS], expected_failed_checks=_expected_failed
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
