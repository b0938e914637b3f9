"""``TGEMClassifier.feature_importances_``: Integrated Gradients on a stratified subsample."""

from __future__ import annotations

import logging
import time

import numpy as np
from sklearn.exceptions import NotFittedError

from tgem._finite import RESULT_FIX, check_finite_result
from tgem._runtime import draw_seed
from tgem.interpret._attribute import Options, run, warn_unconverged
from tgem.interpret._ig import Evaluator
from tgem.interpret._resolve import _batch_rows, _fitted_module, _training_mean

logger = logging.getLogger("tgem.interpret")

#: Quadrature of the importances: the adaptive rule from this many nodes, to this tolerance.
N_STEPS = 50
TOL = 1e-3

#: Samples per class that the stratified subsample keeps where the class has them.
MIN_PER_CLASS = 20


def stratified_subsample(y_enc: np.ndarray, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: about ``n_samples`` rows stratified by class, at least
    ``MIN_PER_CLASS`` of each class that has them (so possibly more than ``n_samples``)."""
    classes, counts = np.unique(y_enc, return_counts=True)
    if n_samples >= len(y_enc):
        return np.arange(len(y_enc))
    alloc = np.minimum(counts, MIN_PER_CLASS)
    left = n_samples - alloc.sum()
    if left > 0:
        room = counts - alloc
        share = left * room / room.sum()
        extra = np.floor(share).astype(int)
        rest = left - extra.sum()
        order = np.argsort(-(share - extra), kind="stable")
        extra[order[:rest]] += 1
        alloc += np.minimum(extra, room)
    chosen = [
        rng.choice(np.flatnonzero(y_enc == c), size=a, replace=False)
        for c, a in zip(classes, alloc)
    ]
    return np.sort(np.concatenate(chosen))


def training_importances(clf) -> np.ndarray:
    """Gene importances of a fitted classifier from Integrated Gradients on training data.

    A stratified subsample of the training rows (``clf.importance_n_samples``, at least 20
    per class where the class has them, drawn from ``clf.random_state``) is attributed with
    :func:`attribute` (target: the true class; baseline ``clf.importance_baseline``:
    "zeros" or the training mean; adaptive quadrature, 50 steps). The mean absolute
    attribution of each gene, normalised to sum to 1, is returned. This is what
    ``TGEMClassifier.feature_importances_`` computes (once, then cached).

    Parameters
    ----------
    clf : TGEMClassifier
        Fitted in this session (the training rows are kept in memory only, never saved).

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
    data = getattr(clf, "_fit_data", None)
    if data is None:
        raise NotFittedError(
            "feature_importances_ was not computed before this model was saved or pickled, "
            "and the training data is not kept in model files. Refit the model (or compute "
            "feature_importances_ before saving), or use tgem.interpret.attribute on data "
            "you have."
        )
    X, y_enc = data
    rng = np.random.default_rng(draw_seed(clf.random_state))
    idx = stratified_subsample(np.asarray(y_enc), int(clf.importance_n_samples), rng)
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
        len(idx),
        X.shape[1],
        len(clf.classes_),
        n_steps,
        len(idx) * n_steps,
    )
    t0 = time.perf_counter()
    reported = []

    def on_chunk(done):
        if not reported and done < len(idx):
            elapsed = time.perf_counter() - t0
            reported.append(done)
            logger.info(
                "feature_importances_: %d/%d samples in %.1f s, about %.0f s left",
                done,
                len(idx),
                elapsed,
                elapsed * (len(idx) - done) / done,
            )

    options = Options(base="ig", n_steps=n_steps, quadrature="adaptive", tol=TOL, need_delta=False)
    attr, delta, converged = run(
        Evaluator(module, batch_rows),
        X[idx],
        np.asarray(y_enc)[idx].astype(np.int64),
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
