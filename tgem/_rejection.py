"""Rejection of cells of unseen types: scores, thresholds and labels with "unassigned".

:func:`rejection_scores` scores each sample under a rule (``"max_proba"``, ``"energy"``,
``"neighbors"``, ``"combined"``; higher means more confident),
:func:`fit_rejection_threshold` fits a rule's threshold on cells the model did not train on,
and :func:`predict_with_rejection` labels samples below it ``unassigned``.
``TGEMClassifier.predict`` itself never rejects (scikit-learn's contract); :func:`tgem.annotate`
applies the same rules to an AnnData object.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from tgem._calibration import (
    RULES,
    captured_logits,
    combined_scores,
    energy,
    rejection_threshold,
)
from tgem._h5ad import H5ADDataset, is_h5ad_input

__all__ = ["fit_rejection_threshold", "predict_with_rejection", "rejection_scores"]

#: Threshold of the max-probability rule when none is given.
DEFAULT_MAX_PROBA_THRESHOLD = 0.5


def _check_rule(rule) -> str:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}.")
    return rule


def _resolve_threshold(threshold, rule: str, model) -> tuple[float, str]:
    """The threshold to use and where it came from: "given", "calibration" or "default".

    Without a given threshold, a model fitted with ``calibration="temperature"`` supplies
    the one fitted on its held-out cells (``rejection_thresholds_``).
    """
    if threshold is not None:
        return _check_threshold(threshold, rule), "given"
    fitted = getattr(model, "rejection_thresholds_", None) or {}
    if rule in fitted:
        return _check_threshold(fitted[rule], rule), "calibration"
    return _check_threshold(None, rule), "default"


def _check_threshold(threshold, rule: str) -> float:
    """The threshold as a float, in the range of the rule's score."""
    if threshold is None:
        if rule == "max_proba":
            return DEFAULT_MAX_PROBA_THRESHOLD
        raise ValueError(
            f"rule={rule!r} has no default threshold (its scale depends on the model and the "
            "data) and the model holds no fitted one; got threshold=None. Pass "
            f"threshold=tgem.fit_rejection_threshold(model, X_cal, y_cal, rule={rule!r}) with "
            "cells the model did not train on, or fit the model with "
            "calibration='temperature'."
        )
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a real number; got {threshold!r}.")
    threshold = float(threshold)
    if rule in ("max_proba", "combined") and not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"threshold for rule={rule!r} is a probability in [0, 1]; got {threshold!r}. "
            "Pass e.g. 0.05, or 0 to reject nothing."
        )
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite; got {threshold!r}.")
    return threshold


def _check_unassigned(unassigned, classes) -> str:
    if not isinstance(unassigned, str) or not unassigned:
        raise TypeError(f"unassigned must be a non-empty str; got {unassigned!r}.")
    if unassigned in {str(c) for c in classes}:
        raise ValueError(
            f"unassigned={unassigned!r} is one of the model's classes; pass another label, "
            "e.g. unassigned='tgem_unassigned'."
        )
    return unassigned


def _proba_and_score(model, X, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and each row's confidence score under ``rule``."""
    if rule in ("neighbors", "combined"):
        _reference(model, rule)  # before predicting: a model without one fails at once
    logits: list[np.ndarray] = []
    with captured_logits(model, logits):
        proba = model.predict_proba(X)
    if rule == "max_proba":
        return proba, proba.max(axis=1)
    if rule == "neighbors":
        return proba, _neighbor_scores(model, X)
    logits = np.concatenate(logits) if logits else np.empty((0, proba.shape[1]))
    if logits.shape != proba.shape:  # e.g. a batch rerun after running out of memory
        raise RuntimeError(
            f"collected logits of shape {logits.shape} for probabilities of shape "
            f"{proba.shape}; rerun with a smaller predict_batch_size."
        )
    if rule == "combined":
        own = {"energy": energy(logits), "neighbors": _neighbor_scores(model, X)}
        return proba, combined_scores(own, model.calibration_scores_)
    return proba, energy(logits)


def _reference(model, rule: str = "neighbors"):
    reference = getattr(model, "neighbor_reference_", None)
    if reference is None or (rule == "combined" and not hasattr(model, "calibration_scores_")):
        raise ValueError(
            f"rule={rule!r} measures the distance to the model's training cells, and this "
            "model holds no reference of them (fit builds one with "
            "calibration='temperature'; tgem before 0.2 never did). Refit with "
            "TGEMClassifier(calibration='temperature'), or pick rule='max_proba' or 'energy'."
        )
    return reference


def _neighbor_scores(model, X) -> np.ndarray:
    """The ``"neighbors"`` scores of the rows of ``X`` (already validated by predicting)."""
    reference = _reference(model, "neighbors")
    if is_h5ad_input(X) and not isinstance(X, H5ADDataset):
        raise TypeError(
            "rule='neighbors' takes an array, a sparse matrix, a DataFrame or a "
            f"tgem.H5ADDataset; got {type(X).__name__}. Pass tgem.H5ADDataset(path), or "
            "annotate an AnnData with tgem.annotate(adata, model, reject='neighbors')."
        )
    return reference.scores(X, block_rows=model.predict_batch_size)  # blocks, as predicting


def rejection_scores(model, X, *, rule: str = "max_proba") -> np.ndarray:
    """Confidence score of each sample under a rejection rule (higher: more confident).

    Parameters
    ----------
    model : TGEMClassifier
        A fitted classifier.
    X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_genes)
        Samples, with the model's genes.
    rule : {"max_proba", "energy", "neighbors", "combined"}, default="max_proba"
        ``"max_proba"``: the largest class probability. ``"energy"``: the negative free
        energy, ``logsumexp`` of the network's logits (before the softmax), which keeps
        the overall magnitude that the softmax normalises away (Liu et al. 2020).
        ``"neighbors"``: minus the mean distance to the 10 nearest training cells in the
        first 50 principal components of the standardised genes
        (``model.neighbor_reference_``, built by ``fit`` with
        ``calibration="temperature"``); it does not depend on the network. ``"combined"``:
        the smaller of the energy's and the neighbours' p-values against the model's
        held-out cells (``calibration_scores_``), so that a cell is rejected when either
        finds it atypical; in the project's measurements it separated cells of another
        organism and types left out of training best overall. Both need a model fitted
        with ``calibration="temperature"``.

    Returns
    -------
    scores : ndarray of shape (n_samples,)
    """
    return _proba_and_score(model, X, _check_rule(rule))[1]


def predict_with_rejection(
    model, X, *, threshold=None, rule: str = "max_proba", unassigned: str = "unassigned"
) -> np.ndarray:
    """Predicted labels, with ``unassigned`` for samples whose score is below a threshold.

    Parameters
    ----------
    model : TGEMClassifier
        A fitted classifier.
    X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_genes)
        Samples, with the model's genes (never modified).
    threshold : float, optional
        Samples with a score (see :func:`rejection_scores`) strictly below it are
        unassigned. ``rule="max_proba"``: a probability in [0, 1]; ``"combined"``: a
        p-value in [0, 1]. ``rule="energy"`` and ``"neighbors"`` (minus a distance): any
        finite number. When not given: the
        threshold fitted on the model's held-out cells (``model.rejection_thresholds_[rule]``,
        for a model fitted with ``calibration="temperature"``), else 0.5 for
        ``"max_proba"``, while ``"energy"`` then requires one; fit it with
        :func:`fit_rejection_threshold` on cells the model did not train on.
    rule : {"max_proba", "energy", "neighbors", "combined"}, default="max_proba"
        The confidence score.
    unassigned : str, default="unassigned"
        The label of rejected samples; must not be one of the model's classes.

    Returns
    -------
    labels : ndarray of shape (n_samples,), object
        ``model.predict(X)`` where the score reaches the threshold, ``unassigned``
        elsewhere.

    Examples
    --------
    >>> import tgem
    >>> from tgem.datasets import load_pbmc68k
    >>> X, y = load_pbmc68k(return_X_y=True)
    >>> model = tgem.TGEMClassifier(max_epochs=2, random_state=0).fit(X[:300], y[:300])
    >>> labels = tgem.predict_with_rejection(model, X[300:310], threshold=1.0)
    >>> set(labels)
    {'unassigned'}
    """
    rule = _check_rule(rule)
    threshold, _ = _resolve_threshold(threshold, rule, model)
    unassigned = _check_unassigned(unassigned, model.classes_)
    proba, score = _proba_and_score(model, X, rule)
    labels = model.classes_[np.argmax(proba, axis=1)].astype(object)
    labels[score < threshold] = unassigned
    return labels


def fit_rejection_threshold(
    model, X_cal, y_cal, *, rule: str = "max_proba", target_rejection: float = 0.05
) -> float:
    """The threshold that rejects at most a given share of calibration cells of seen types.

    Use cells the model did not train on (e.g. a held-out share of the training data): on
    its own training cells a model is over-confident and the threshold would be too high.

    Parameters
    ----------
    model : TGEMClassifier
        A fitted classifier.
    X_cal : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_genes)
        Calibration cells, not used in training.
    y_cal : array-like of shape (n_samples,)
        Their labels. Cells of types the model does not know are ignored.
    rule : {"max_proba", "energy", "neighbors", "combined"}, default="max_proba"
        The confidence score (see :func:`rejection_scores`).
    target_rejection : float in [0, 1), default=0.05
        The largest share of the calibration cells that the threshold may reject.

    Returns
    -------
    threshold : float
        The ``floor(target_rejection * n)``-th smallest score: scores strictly below it are
        rejected, which is at most that many calibration cells.
    """
    rule = _check_rule(rule)
    if isinstance(target_rejection, bool) or not isinstance(target_rejection, numbers.Real):
        raise TypeError(f"target_rejection must be a real number; got {target_rejection!r}.")
    if not 0.0 <= target_rejection < 1.0:
        raise ValueError(
            f"target_rejection is a share of cells in [0, 1); got {target_rejection!r}. "
            "Pass e.g. 0.05 to reject at most 5% of the calibration cells."
        )
    y_cal = np.asarray(y_cal)
    scores = rejection_scores(model, X_cal, rule=rule)
    if len(y_cal) != len(scores):
        raise ValueError(
            f"X_cal has {len(scores)} rows but y_cal has {len(y_cal)} labels; pass one label "
            "per calibration cell."
        )
    seen = np.isin(y_cal, model.classes_)
    if not seen.any():
        raise ValueError(
            "none of the calibration labels is one of the model's classes "
            f"{list(model.classes_)[:5]}; pass labelled cells of the types the model knows."
        )
    return rejection_threshold(scores[seen], target_rejection)
