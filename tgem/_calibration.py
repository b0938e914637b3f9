"""Calibration on held-out cells: temperature scaling, rejection thresholds, conformal sets.

``TGEMClassifier(calibration="temperature")`` holds out a stratified share of the training
cells in ``fit`` (:func:`split_calibration`), trains on the rest and, on the held-out cells,
fits

* a temperature ``T`` (:func:`fit_temperature`): the probabilities become
  ``softmax(logits / T)``, with ``T`` minimising the held-out negative log-likelihood
  (Guo et al. 2017, "On calibration of modern neural networks");
* a rejection threshold per rule (:data:`RULES`) that rejects at most
  :data:`TARGET_REJECTION` of the held-out cells (:func:`rejection_threshold`);
* the conformity scores of split-conformal prediction sets (:func:`conformal_quantile`,
  :func:`prediction_sets`; Vovk et al. 2005, Angelopoulos & Bates 2021).

Everything here works on NumPy arrays of log-probabilities and logits, computed in float64.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from fractions import Fraction

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

__all__ = [
    "MODEL_RULES",
    "RULES",
    "TARGET_REJECTION",
    "TEMPERATURE_BOUNDS",
    "calibrate",
    "combined_scores",
    "conformal_quantile",
    "expected_calibration_error",
    "fit_temperature",
    "prediction_sets",
    "proba_at",
    "split_calibration",
]

#: Rejection rules: the score of each cell, higher meaning more confident. ``"neighbors"``
#: needs the model's reference of training cells (:mod:`tgem._novelty`), ``"combined"`` that
#: and the held-out cells' scores (:func:`combined_scores`).
RULES = ("max_proba", "energy", "neighbors", "combined")
#: The rules ``"combined"`` joins.
COMBINED_RULES = ("energy", "neighbors")
#: The rules every calibrated model has a threshold for (format-2 files hold only these).
MODEL_RULES = ("max_proba", "energy")

#: Share of the held-out calibration cells that the fitted rejection thresholds reject.
TARGET_REJECTION = 0.05

#: The temperature is searched in this interval (log-uniformly); a fit that ends on a bound
#: is reported (``calibration_report_["temperature_at_bound"]``).
TEMPERATURE_BOUNDS = (1e-2, 1e2)

#: Bins of the expected calibration error in the calibration report.
ECE_BINS = 15


# ------------------------------------------------------------------ the hold-out
def split_calibration(
    y_enc: np.ndarray, n_classes: int, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of the rows into training and calibration rows (both sorted).

    Each class ``c`` with ``n_c`` cells gives ``round(fraction * n_c)`` cells to the
    calibration part, at least one and at most ``n_c - 1``, so both parts hold every class.

    Raises
    ------
    ValueError
        If a class has fewer than two cells.
    """
    counts = np.bincount(y_enc, minlength=n_classes)
    few = np.flatnonzero(counts < 2)
    if len(few):
        raise ValueError(
            f"calibration='temperature' holds out a stratified share of every class, which "
            f"needs at least 2 cells per class (one to train on, one to calibrate on); "
            f"{len(few)} class(es) have fewer (class indices {few[:5].tolist()} with "
            f"{counts[few[:5]].tolist()} cell(s)). Pass more cells of those classes, drop them, "
            "or fit with calibration=None."
        )
    rng = np.random.default_rng(seed)
    held = []
    for c in range(n_classes):
        rows = np.flatnonzero(y_enc == c)
        n_cal = min(len(rows) - 1, max(1, math.floor(fraction * len(rows) + 0.5)))
        held.append(rng.permutation(rows)[:n_cal])
    cal = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(len(y_enc)), cal, assume_unique=True)
    return train, cal


# ------------------------------------------------------------------ temperature
def _nll(log_proba: np.ndarray, y: np.ndarray, weights: np.ndarray, temperature: float) -> float:
    z = log_proba / temperature
    per_row = logsumexp(z, axis=1) - z[np.arange(len(y)), y]
    return float(np.sum(weights * per_row) / np.sum(weights))


def fit_temperature(
    log_proba: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None
) -> tuple[float, float, float, bool]:
    """The temperature minimising the weighted mean negative log-likelihood of ``y``.

    ``log_proba`` may be logits or log-probabilities (the softmax of ``z / T`` does not change
    when a constant is added to a row of ``z``). The NLL is convex in ``1 / T``, hence
    unimodal in ``log T``, which is searched by bounded Brent's method over
    :data:`TEMPERATURE_BOUNDS`; ``T = 1`` and both bounds are candidates too, so the held-out
    NLL never rises.

    Returns
    -------
    temperature, nll_before, nll_after, at_bound
        ``nll_before`` at ``T = 1``; ``at_bound``: the minimum lies on a bound of the search
        (e.g. every held-out cell is classified correctly and the NLL falls towards ``T = 0``).
    """
    z = np.asarray(log_proba, dtype=np.float64)
    y = np.asarray(y)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: _nll(z, y, w, math.exp(log_t)),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-7},
    )
    candidates = [1.0, *TEMPERATURE_BOUNDS, math.exp(float(result.x))]
    losses = [_nll(z, y, w, t) for t in candidates]
    best = int(np.argmin(losses))
    temperature = candidates[best]
    at_bound = math.isclose(temperature, TEMPERATURE_BOUNDS[0], rel_tol=1e-4) or math.isclose(
        temperature, TEMPERATURE_BOUNDS[1], rel_tol=1e-4
    )
    return temperature, losses[0], losses[best], at_bound


def scale_log_proba(log_proba: np.ndarray, temperature: float) -> np.ndarray:
    """Normalised log-probabilities of ``softmax(log_proba / temperature)``."""
    z = np.asarray(log_proba, dtype=np.float64) / temperature
    return z - logsumexp(z, axis=1, keepdims=True)


# ------------------------------------------------------------------ scores
@contextmanager
def captured_logits(model, store: list):
    """Record the output of the network's last linear layer (the logits) batch by batch."""
    handle = model.module_.classifier.register_forward_hook(
        lambda module, inputs, output: store.append(output.detach().double().cpu().numpy())
    )
    try:
        yield
    finally:
        handle.remove()


def energy(logits: np.ndarray) -> np.ndarray:
    """``logsumexp`` of each row of the logits (the negative free energy)."""
    return logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


def combined_scores(scores: dict, held_out: dict, *, own: bool = False) -> np.ndarray:
    """The ``"combined"`` rule's score: the smaller of the energy and neighbours p-values.

    For each rule of :data:`COMBINED_RULES`, a cell's p-value is the share of held-out cells
    (``held_out[rule]``, sorted) that score at most as high, ``(#{s_i <= s} + 1) / (n + 1)``:
    how typical the cell is of cells of the known types, on the same scale for both rules.
    The smaller of the two is the score, so a cell is rejected when either rule finds it
    atypical: the energy flags types the network has not learned, the neighbours' distance
    cells unlike any training cell (``benchmarks/bench_annotate.py`` measures both).
    With ``own=True`` the scored cells are the held-out cells themselves, and each one's own
    score is left out of the count (as a new cell's would be), so that a threshold fitted on
    them rejects new cells of the known types at the same rate.

    Examples
    --------
    >>> held = {"energy": np.array([1.0, 2.0, 3.0]), "neighbors": np.array([-3.0, -2.0, -1.0])}
    >>> combined_scores({"energy": np.array([2.5]), "neighbors": np.array([-5.0])}, held)
    array([0.25])
    """
    out = None
    for rule in COMBINED_RULES:
        ref = np.asarray(held_out[rule], dtype=np.float64)
        s = np.asarray(scores[rule], dtype=np.float64)
        count = np.searchsorted(ref, s, side="right") - (1.0 if own else 0.0)
        p = (count + 1.0) / (len(ref) + 1.0)
        out = p if out is None else np.minimum(out, p)
    return out


def rejection_threshold(scores: np.ndarray, target_rejection: float) -> float:
    """The ``floor(target_rejection * n)``-th smallest score: fewer than that lie below it."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    return float(ordered[int(math.floor(target_rejection * len(ordered)))])


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width confidence bins.

    ``sum_b n_b / n * |accuracy_b - mean confidence_b|`` over the bins ``((b-1)/B, b/B]``
    (confidence 0 falls in the first), where the confidence is the largest probability and
    ``y`` holds the class indices.

    Examples
    --------
    >>> import numpy as np
    >>> proba = np.array([[0.95, 0.05], [0.85, 0.15], [0.35, 0.65]])
    >>> round(expected_calibration_error(np.array([0, 1, 1]), proba, n_bins=10), 6)
    0.416667
    """
    proba = np.asarray(proba, dtype=np.float64)
    confidence = proba.max(axis=1)
    correct = (np.argmax(proba, axis=1) == np.asarray(y)).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    gap = np.bincount(bins, weights=correct - confidence, minlength=n_bins)
    return float(np.sum(np.abs(gap)) / max(len(confidence), 1))


# ------------------------------------------------------------------ conformal sets
def conformity_scores(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Split-conformal scores of the calibration cells, ``1 - p(true class)``, sorted."""
    proba = np.asarray(proba, dtype=np.float64)
    return np.sort(1.0 - proba[np.arange(len(y)), np.asarray(y)])


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number in (0, 1); got {alpha!r}.")
    if not 0.0 < alpha < 1.0:
        raise ValueError(
            f"alpha is the allowed miscoverage, a number in (0, 1); got {alpha!r}. Pass e.g. "
            "alpha=0.1 for sets that hold the true class of at least 90% of the cells."
        )
    return float(alpha)


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest of ``n`` sorted scores (inf beyond n).

    The rank is computed in exact rational arithmetic from the float ``alpha``, so
    ``alpha=0.1`` with ``n = 19`` gives rank 18, not 19 from a rounding error.

    Examples
    --------
    >>> conformal_quantile(np.arange(1.0, 20.0), 0.1)
    18.0
    >>> conformal_quantile(np.arange(1.0, 5.0), 0.1)
    inf
    """
    alpha = check_alpha(alpha)
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - Fraction(alpha)))
    return math.inf if rank > n else float(scores[rank - 1])


def prediction_sets(proba: np.ndarray, quantile: float) -> np.ndarray:
    """Boolean mask of the classes whose score ``1 - p`` is at most ``quantile``."""
    return (1.0 - np.asarray(proba, dtype=np.float64)) <= quantile


def proba_at(log_proba: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities from a network's log-probabilities at ``temperature`` (rows sum to 1)."""
    p = np.exp(log_proba if temperature == 1.0 else scale_log_proba(log_proba, temperature))
    return p / p.sum(axis=1, keepdims=True)


def calibrate(
    raw, logits, y, weights, n_train: int, dist=None, neighbor_scores=None
) -> tuple[dict, bool]:
    """Calibrate on held-out cells: ``(fitted attributes, temperature on a bound)``.

    ``raw`` are the network's log-probabilities of the held-out cells and ``logits`` its
    logits, ``y`` their class indices and ``weights`` their sample weights (cells of weight 0
    are left out). The attributes are ``temperature_``, ``calibration_report_``,
    ``rejection_thresholds_`` and ``conformal_scores_``; ``neighbor_scores``, the held-out
    cells' scores under the ``"neighbors"`` rule, add that rule's threshold, the
    ``"combined"`` rule's and its reference scores (``calibration_scores_``). Under DDP
    (``dist``) every process calibrates and all keep rank 0's result.
    """
    keep = weights > 0
    raw, logits, y, weights = raw[keep], logits[keep], y[keep], weights[keep]
    neighbors = None if neighbor_scores is None else np.asarray(neighbor_scores)[keep]
    held, combined = None, math.nan
    if neighbors is not None:  # the "combined" rule: its reference scores and threshold
        own = dict(zip(COMBINED_RULES, (energy(logits), neighbors), strict=True))
        held = np.stack([np.sort(own[rule]) for rule in COMBINED_RULES])
        combined = rejection_threshold(
            combined_scores(own, dict(zip(COMBINED_RULES, held, strict=True)), own=True),
            TARGET_REJECTION,
        )
    temperature, nll_before, nll_after, at_bound = fit_temperature(raw, y, weights)
    proba = proba_at(raw, temperature)
    before = proba_at(raw, 1.0)
    values = np.array(
        [
            temperature,
            float(at_bound),
            float(np.mean(np.argmax(raw, axis=1) == y)),
            nll_before,
            nll_after,
            expected_calibration_error(y, before),
            expected_calibration_error(y, proba),
            rejection_threshold(proba.max(axis=1), TARGET_REJECTION),
            rejection_threshold(energy(logits), TARGET_REJECTION),
            math.nan if neighbors is None else rejection_threshold(neighbors, TARGET_REJECTION),
            combined,
        ]
    )
    scores = conformity_scores(proba, y)
    if dist is not None:
        values, scores = dist.broadcast(values), dist.broadcast(scores)
        held = None if held is None else dist.broadcast(held)
    report = {
        "n_train": int(n_train),
        "n_calibration": len(scores),
        "temperature": float(values[0]),
        "temperature_at_bound": bool(values[1]),
        "accuracy": float(values[2]),
        "nll_before": float(values[3]),
        "nll_after": float(values[4]),
        "ece_before": float(values[5]),
        "ece_after": float(values[6]),
        "target_rejection": TARGET_REJECTION,
    }
    fitted = {
        "temperature_": float(values[0]),
        "calibration_report_": report,
        "rejection_thresholds_": {"max_proba": float(values[7]), "energy": float(values[8])},
        "conformal_scores_": np.asarray(scores, dtype=np.float64),
    }
    if held is not None:
        fitted["rejection_thresholds_"]["neighbors"] = float(values[9])
        fitted["rejection_thresholds_"]["combined"] = float(values[10])
        pairs = zip(COMBINED_RULES, held, strict=True)
        fitted["calibration_scores_"] = {r: np.asarray(a, dtype=np.float64) for r, a in pairs}
    return fitted, bool(at_bound)
