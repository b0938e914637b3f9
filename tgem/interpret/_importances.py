"""``TGEMClassifier.feature_importances_``: Integrated Gradients on a stratified subsample."""

from __future__ import annotations

import logging
import time

import numpy as np
from sklearn.exceptions import NotFittedError

from tgem._finite import RESULT_FIX, check_finite_result
from tgem._sampling import MIN_PER_CLASS, stratified_subsample  # noqa: F401 - old import path
from tgem.interpret._attribute import Options, run, warn_unconverged
from tgem.interpret._ig import Evaluator
from tgem.interpret._resolve import _batch_rows, _fitted_module, _training_mean

logger = logging.getLogger("tgem.interpret")

#: Quadrature of the importances: the adaptive rule from this many nodes, to this tolerance.
N_STEPS = 50
TOL = 1e-3


def training_importances(clf) -> np.ndarray:
    """Gene importances of a fitted classifier from Integrated Gradients on training data.

    The stratified subsample of the training rows that ``fit`` copied
    (``clf.importance_n_samples``, at least 20 per class where the class has them, drawn from
    ``clf.random_state``; see :class:`tgem._sampling.TrainingSample`) is attributed with
    :func:`attribute` (target: the true class; baseline ``clf.importance_baseline``:
    "zeros" or the training mean; adaptive quadrature, 50 steps). The mean absolute
    attribution of each gene, normalised to sum to 1, is returned. This is what
    ``TGEMClassifier.feature_importances_`` computes (once, then cached).

    Parameters
    ----------
    clf : TGEMClassifier
        Fitted in this session (the subsample is kept in memory only, never saved).

    Returns
    -------
    ndarray of shape (`n_features_in_`,)
        Non-negative, summing to 1 (all zeros if every attribution is 0).

    Examples
    --------
    >>> import numpy as np
    >>> from tgem import TGEMClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(60, 5)).astype(np.float32)
    >>> y = np.where(X[:, 0] > 0, "up", "down")
    >>> clf = TGEMClassifier(n_layers=1, n_heads=2, learning_rate=1e-2, max_epochs=10,
    ...                      importance_n_samples=30, n_threads=1, random_state=0).fit(X, y)
    >>> imp = clf.feature_importances_
    >>> imp.shape, round(float(imp.sum()), 6), bool(np.all(imp >= 0))
    ((5,), 1.0, True)
    """
    module = _fitted_module(clf)
    sample = clf.__dict__.get("_training_sample")
    if sample is None:
        raise NotFittedError(
            "feature_importances_ was not computed before this model was saved or pickled, "
            "and the training data is not kept in model files. Refit the model (or compute "
            "feature_importances_ before saving), or use tgem.interpret.attribute on data "
            "you have."
        )
    X, y_enc = sample.X, sample.y  # the stratified rows fit copied (tgem._sampling)
    n_rows = X.shape[0]
    baseline = (
        _training_mean(clf).astype(np.float32)[None, :]
        if clf.importance_baseline == "mean"
        else np.zeros((1, X.shape[1]), dtype=np.float32)
    )
    n_steps = N_STEPS
    batch_rows = _batch_rows(clf, module, None)
    logger.info(
        "computing feature_importances_: Integrated Gradients on %d training samples x %d "
        "genes, %d classes, %d steps (at least %d gradient evaluations; adaptive refinement "
        "adds some)",
        n_rows,
        X.shape[1],
        len(clf.classes_),
        n_steps,
        n_rows * n_steps,
    )
    t0 = time.perf_counter()
    reported = []

    def on_chunk(done):
        if not reported and done < n_rows:
            elapsed = time.perf_counter() - t0
            reported.append(done)
            logger.info(
                "feature_importances_: %d/%d samples in %.1f s, about %.0f s left",
                done,
                n_rows,
                elapsed,
                elapsed * (n_rows - done) / done,
            )

    options = Options(base="ig", n_steps=n_steps, quadrature="adaptive", tol=TOL, need_delta=False)
    attr, delta, converged = run(
        Evaluator(module, batch_rows),
        X,
        y_enc,
        baseline,
        options,
        clf.n_threads,
        clf.verbose,
        on_chunk=on_chunk,
    )
    check_finite_result(attr, "feature_importances_'s attributions", RESULT_FIX)
    warn_unconverged(converged, delta, TOL)
    imp = np.abs(attr).mean(0)
    total = imp.sum()
    logger.info("feature_importances_ computed in %.1f s", time.perf_counter() - t0)
    return imp / total if total > 0 else imp
