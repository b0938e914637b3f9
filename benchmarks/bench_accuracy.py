"""Accuracy and cost of T-GEM against standard classifiers under repeated stratified CV.

Data (real, from ``../shared/data``; see its README):

* ``pbmc``: 700 PBMC single cells x 765 genes, 10 cell types (log1p normalised counts).
* ``citeseq`` (only when named with ``--datasets``): 8,617 CITE-seq CBMC cells x 500 genes,
  13 labels, log1p of the counts scaled to 10,000 per cell.
* ``all_mol_biol`` / ``all_bt``: 128 ALL patients x 12,625 probes (RMA log2), molecular
  subtype / B-T lineage stage, restricted to classes with at least 5 samples; the 2,000 most
  variable probes are selected *inside* every pipeline (fitted on the training fold only).

Models, each a Pipeline with the preprocessing it needs (``TopVariance`` first on ALL):

* ``tgem``: ``TGEMClassifier`` with the library's current defaults on the log-scale expression.
* ``tgem_original``: the published configuration, ``TGEMClassifier.original()`` (tgem 0.1's
  defaults); the ``tgem_*`` variants below change it by what their names say.
* ``tgem_tuned``: ``TGEMClassifier`` tuned by an inner stratified 3-fold ``GridSearchCV``
  (accuracy) over ``n_heads`` in {1, 3, 5} x ``activation`` in {"leakyrelu", None}.
* ``random_forest``: ``RandomForestClassifier(n_estimators=500)``.
* ``logistic_regression``: ``StandardScaler`` + L2 ``LogisticRegression``, ``C`` tuned by an
  inner stratified 3-fold ``GridSearchCV`` over 10^-4 .. 10^0.
* ``mlp``: ``StandardScaler`` + ``MLPClassifier(hidden_layer_sizes=(256,))``.
* ``hist_gradient_boosting``: ``HistGradientBoostingClassifier``.

Every model sees the same folds (``RepeatedStratifiedKFold`` with a fixed seed). Per fold the
script records accuracy, balanced accuracy, macro-F1, MCC, ROC-AUC one-vs-rest (macro, and the
micro average over the binarised labels the T-GEM paper reports), fit and predict time, and the
host the fit ran on (CPU model, native kernel instruction set, torch threads, 1-minute load
average before and after), so that a table built from folds fitted on different machines or
beside other work says so under its fit-time column; each fold's record is cached as JSON (keyed
by data set, model configuration and fold indices) so an interrupted run resumes where it
stopped. T-GEM is compared with each baseline fold by fold with the Nadeau-Bengio corrected
resampled t-test. A second table gives T-GEM's training time per epoch against the number of
genes, measured on synthetic data of that width.

Outputs (``--results-dir``, default ``benchmarks/results``): ``accuracy.md``,
``accuracy.json``, ``accuracy_folds.png`` and the per-fold cache in ``cache/``.

Run the full protocol (hours on 2 CPU cores) with::

    python benchmarks/bench_accuracy.py

and the CI smoke run (one small data set, 2 folds, 2 epochs; about a minute) with::

    python benchmarks/bench_accuracy.py --quick

Options cut the protocol for a run by hand (``--n-repeats``, ``--datasets``, ``--models``,
``--tgem-max-epochs``, ``--grid-max-epochs``); whatever was run is written into the outputs.
``--shard I/N`` splits the folds between N runs (processes or machines) that share the
results folder; a last run without it builds the full table from the cache::

    python benchmarks/bench_accuracy.py --datasets pbmc --shard 0/2 --tag part0 &
    python benchmarks/bench_accuracy.py --datasets pbmc --shard 1/2 --tag part1
    python benchmarks/bench_accuracy.py --datasets pbmc

The thread count is part of T-GEM's configuration and so of the cache key: shards must use
the ``--threads`` of the final run, or their folds are fitted again.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import SelectorMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    log_loss,
    matthews_corrcoef,
    roc_auc_score,
)
from sklearn.model_selection import GridSearchCV, RepeatedStratifiedKFold, StratifiedKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler, label_binarize
from sklearn.utils.validation import check_is_fitted, validate_data

logger = logging.getLogger("bench_accuracy")

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE.parents[0].parent / "shared" / "data"
RESULTS_DIR = HERE / "results"

METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "mcc", "roc_auc_ovr_macro", "roc_auc_micro")
MODELS = (
    "tgem",
    "tgem_original",
    "tgem_tuned",
    "random_forest",
    "logistic_regression",
    "mlp",
    "hist_gradient_boosting",
)
#: T-GEM variants for the investigation of the defaults (run with ``--models``):
#: name -> (StandardScaler in front?, TGEMClassifier parameters changed from the defaults).
VARIANTS = {
    "tgem_scaled": (True, {}),
    "tgem_lr1e-3": (False, {"learning_rate": 1e-3}),
    "tgem_scaled_lr1e-3": (True, {"learning_rate": 1e-3}),
    "tgem_scaled_lr1e-3_es": (True, {"learning_rate": 1e-3, "early_stopping": True}),
    # the defaults study's screen (issue 26): regularisation on top of the standardised recipe
    "tgem_scaled_lr1e-3_wd1e-2": (True, {"learning_rate": 1e-3, "weight_decay": 1e-2}),
    "tgem_scaled_lr1e-3_do0.1": (True, {"learning_rate": 1e-3, "dropout": 0.1}),
    # attention that starts sharper (query and key weights x10 at initialisation), and the
    # ablation with uniform attention (x0: scores stay 0, so A_ij = 1/G for j != i throughout)
    "tgem_scaled_lr1e-3_qk10": (True, {"learning_rate": 1e-3, "qk_init_scale": 10.0}),
    "tgem_scaled_lr1e-3_uniform": (True, {"learning_rate": 1e-3, "qk_init_scale": 0.0}),
    # early stopping's ablation (early_stopping="auto" turns it on for CITE-seq's folds)
    "tgem_scaled_lr1e-3_es_uniform": (
        True,
        {"learning_rate": 1e-3, "early_stopping": True, "qk_init_scale": 0.0},
    ),
    # the candidate defaults: standardisation inside the estimator (no scaler in front), the
    # screen's best recipe, and its uniform-attention ablation on the same folds
    "tgem_std_lr1e-3_wd1e-2": (
        False,
        {"standardize": True, "learning_rate": 1e-3, "weight_decay": 1e-2},
    ),
    "tgem_std_lr1e-3_wd1e-2_uniform": (
        False,
        {"standardize": True, "learning_rate": 1e-3, "weight_decay": 1e-2, "qk_init_scale": 0.0},
    ),
}
DATASETS = ("all_mol_biol", "all_bt", "pbmc")
#: Data sets run only when named with ``--datasets`` (hours of T-GEM fits each).
EXTRA_DATASETS = ("citeseq",)
#: Per-cell total the CITE-seq counts are scaled to before log1p (scanpy's usual 1e4).
CITESEQ_TARGET_SUM = 1e4
TIMING_GENES = (765, 1708, 5000, 12625, 22283, 60000)
TGEM_GRID = {"n_heads": [1, 3, 5], "activation": ["leakyrelu", None]}
LR_GRID = {"C": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]}
#: Version of the cached fold records; bump when their meaning changes.
CACHE_VERSION = 1


# --------------------------------------------------------------------------- preprocessing
class TopVariance(SelectorMixin, BaseEstimator):
    """Keep the ``k`` columns with the largest variance in the data seen by ``fit``.

    Inside a Pipeline the variances come from the training fold only, so the selection
    never sees the test samples. Ties are broken by column order.

    Parameters
    ----------
    k : int, default=2000
        Number of columns kept (all of them when ``X`` has fewer).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0., 1., 5.], [0., 3., 1.], [0., 2., 9.]])
    >>> TopVariance(k=2).fit(X).get_support()
    array([False,  True,  True])
    """

    def __init__(self, k: int = 2000):
        self.k = k

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=[np.float64, np.float32])
        if not (isinstance(self.k, int | np.integer) and self.k >= 1):
            raise ValueError(
                f"TopVariance needs k >= 1 (an int); got k={self.k!r}. "
                "Pass the number of columns to keep."
            )
        self.variances_ = X.var(axis=0, dtype=np.float64)
        order = np.argsort(-self.variances_, kind="stable")
        self.selected_ = np.sort(order[: min(self.k, X.shape[1])])
        return self

    def _get_support_mask(self):
        check_is_fitted(self, "selected_")
        mask = np.zeros(self.n_features_in_, dtype=bool)
        mask[self.selected_] = True
        return mask


# --------------------------------------------------------------------------- data
@dataclass
class Dataset:
    """One classification task: rows, labels and the number of top-variance genes used."""

    name: str
    X: np.ndarray
    y: np.ndarray
    top_k: int | None
    description: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.X.shape


def _min_class(X, y, min_count: int):
    labels, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, labels[counts >= min_count])
    return X[keep], y[keep], sorted(labels[counts < min_count].tolist())


def load_dataset(name: str, data_dir: Path = DATA_DIR, *, top_k: int = 2000) -> Dataset:
    """Load one of :data:`DATASETS` from ``data_dir`` (the shared real data)."""
    if name == "pbmc":
        with np.load(data_dir / "pbmc68k_reduced.npz", allow_pickle=False) as d:
            X, y = d["X"], d["y_cell_type"].astype(str)
        return Dataset(
            name, X, y, None, "PBMC 68k reduced: 10 cell types, 765 genes, log1p normalised counts"
        )
    if name in ("all_mol_biol", "all_bt"):
        column = {"all_mol_biol": "y_mol_biol", "all_bt": "y_BT"}[name]
        with np.load(data_dir / "all_leukemia.npz", allow_pickle=False) as d:
            X, y = d["X"], d[column].astype(str)
        X, y, dropped = _min_class(X, y, 5)
        return Dataset(
            name,
            X,
            y,
            top_k,
            f"ALL leukaemia, {column} (classes with >= 5 samples; dropped "
            f"{dropped}), RMA log2, top {top_k} variance probes of 12625 per fold",
        )
    if name == "citeseq":
        with np.load(data_dir / "citeseq_cbmc.npz", allow_pickle=False) as d:
            counts, y = d["X"].astype(np.float64), d["y_cell_type"].astype(str)
        # per-cell normalisation needs no fitting, so doing it before the folds leaks nothing
        totals = counts.sum(axis=1, keepdims=True)
        X = np.log1p(counts / np.maximum(totals, 1.0) * CITESEQ_TARGET_SUM).astype(np.float32)
        return Dataset(
            name,
            X,
            y,
            None,
            f"CITE-seq CBMC: {len(np.unique(y))} labels (Mouse and Unknown included), 500 genes, "
            f"log1p of counts scaled to {CITESEQ_TARGET_SUM:g} per cell",
        )
    raise ValueError(f"unknown data set {name!r}; choose from {DATASETS + EXTRA_DATASETS}.")


# --------------------------------------------------------------------------- models
@dataclass
class Settings:
    """Everything that shapes the models of one run (and so the cache key)."""

    seed: int = 0
    threads: int = 2
    tgem_params: dict = field(default_factory=dict)
    grid_params: dict = field(default_factory=dict)
    grid_folds: int = 3
    rf_trees: int = 500
    hgb_max_iter: int = 100
    mlp_max_iter: int = 500


def _tgem(settings: Settings, extra: dict, *, original: bool = True):
    """A TGEMClassifier of this run: the original's configuration (``TGEMClassifier.original``)
    changed by ``extra``, or with ``original=False`` the library's current defaults. The
    variants are defined on the original so that their meaning (and cache keys) never move
    with the defaults."""
    from tgem import TGEMClassifier

    params = {
        "random_state": settings.seed,
        "n_threads": settings.threads,
        **settings.tgem_params,
        **extra,
    }
    return TGEMClassifier.original(**params) if original else TGEMClassifier(**params)


def _inner_cv(settings: Settings) -> StratifiedKFold:
    return StratifiedKFold(settings.grid_folds, shuffle=True, random_state=settings.seed)


def make_model(name: str, dataset: Dataset, settings: Settings):
    """The Pipeline of model ``name`` for ``dataset`` (unfitted)."""
    seed = settings.seed
    head = [("top_variance", TopVariance(dataset.top_k))] if dataset.top_k else []
    if name == "tgem":  # the library's defaults, whatever they are
        return Pipeline(head + [("clf", _tgem(settings, {}, original=False))])
    if name == "tgem_original":  # the published configuration
        return Pipeline(head + [("clf", _tgem(settings, {}))])
    if name in VARIANTS:
        scaled, params = VARIANTS[name]
        scale = [("scale", StandardScaler())] if scaled else []
        return Pipeline(head + scale + [("clf", _tgem(settings, params))])
    if name == "tgem_tuned":
        inner = Pipeline(head + [("clf", _tgem(settings, settings.grid_params))])
        full = Pipeline(head + [("clf", _tgem(settings, {}))])
        grid = {f"clf__{k}": v for k, v in TGEM_GRID.items()}
        return _TunedT(inner, grid, _inner_cv(settings), full)
    if name == "random_forest":
        clf = RandomForestClassifier(n_estimators=settings.rf_trees, random_state=seed, n_jobs=1)
        return Pipeline(head + [("clf", clf)])
    if name == "logistic_regression":
        pipe = Pipeline(
            head + [("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=5000))]
        )
        grid = {f"clf__{k}": v for k, v in LR_GRID.items()}
        return GridSearchCV(pipe, grid, cv=_inner_cv(settings), scoring="accuracy", n_jobs=1)
    if name == "mlp":
        clf = MLPClassifier(
            hidden_layer_sizes=(256,), max_iter=settings.mlp_max_iter, random_state=seed
        )
        return Pipeline(head + [("scale", StandardScaler()), ("clf", clf)])
    if name == "hist_gradient_boosting":
        clf = HistGradientBoostingClassifier(max_iter=settings.hgb_max_iter, random_state=seed)
        return Pipeline(head + [("clf", clf)])
    raise ValueError(f"unknown model {name!r}; choose from {MODELS + tuple(VARIANTS)}.")


class _TunedT(GridSearchCV):
    """GridSearchCV whose inner fits may be cheaper than the final refit.

    The inner search runs on ``estimator`` (which may carry cut-down settings such as fewer
    ``max_epochs``); the refit on the whole training fold is ``refit_estimator`` (the full
    settings) with the best grid point.
    """

    def __init__(self, estimator, param_grid, cv, refit_estimator):
        super().__init__(estimator, param_grid, cv=cv, scoring="accuracy", n_jobs=1, refit=False)
        self.refit_estimator = refit_estimator

    def fit(self, X, y=None, **params):
        super().fit(X, y, **params)
        best = clone(self.refit_estimator).set_params(**self.best_params_)
        t0 = time.perf_counter()
        self.best_estimator_ = best.fit(X, y, **params)
        self.refit_time_ = time.perf_counter() - t0
        return self

    @property
    def classes_(self):
        return self.best_estimator_.classes_

    def predict_proba(self, X):
        return self.best_estimator_.predict_proba(X)

    def predict(self, X):
        return self.best_estimator_.predict(X)


@contextlib.contextmanager
def _v01_defaults():
    """``TGEMClassifier``'s constructor defaults set to tgem 0.1's for the duration: the
    estimators' reprs inside a Pipeline's ``steps`` list only the parameters that differ from
    the defaults, so a key must be written against fixed defaults to survive their change."""
    from tgem import TGEMClassifier
    from tgem._presets import ORIGINAL_PARAMS, V01_VALUES

    kwdefaults = TGEMClassifier.__init__.__kwdefaults__
    saved = dict(kwdefaults)
    kwdefaults.update({k: v for k, v in {**ORIGINAL_PARAMS, **V01_VALUES}.items() if k in saved})
    try:
        yield
    finally:
        kwdefaults.clear()
        kwdefaults.update(saved)


def model_key(model) -> str:
    """A stable text description of an estimator's configuration (for the cache key).

    Parameters added to ``TGEMClassifier`` after tgem 0.1 are left out while they hold the value
    that behaves as 0.1 did (``tgem._presets.V01_VALUES``), so folds cached before they existed
    keep their keys; nested estimators' reprs are written against tgem 0.1's defaults, so the
    keys do not move when the library's defaults do.
    """
    with _v01_defaults():
        return _model_key(model)


def _model_key(model) -> str:
    from tgem._presets import V01_VALUES

    params = {
        k: v
        for k, v in model.get_params(deep=True).items()
        if not (k.rsplit("__", 1)[-1] in V01_VALUES and v == V01_VALUES[k.rsplit("__", 1)[-1]])
    }
    flat = {
        k: (
            v
            if isinstance(v, str | int | float | bool | type(None) | list | tuple | dict)
            else type(v).__name__
        )
        for k, v in sorted(params.items())
    }
    return json.dumps(flat, sort_keys=True, default=repr)


# --------------------------------------------------------------------------- metrics
def fold_metrics(y_true, proba: np.ndarray, classes) -> dict:
    """Accuracy, balanced accuracy, macro-F1, MCC and ROC-AUC (OvR macro and micro).

    ``proba`` columns follow ``classes``. The micro ROC-AUC pools every (sample, class) pair
    of the one-hot labels, as in the T-GEM paper.

    Examples
    --------
    >>> import numpy as np
    >>> m = fold_metrics(["a", "b", "c"], np.eye(3), ["a", "b", "c"])
    >>> m["accuracy"], m["roc_auc_micro"]
    (1.0, 1.0)
    """
    classes = np.asarray(classes)
    y_true = np.asarray(y_true)
    y_pred = classes[np.argmax(proba, axis=1)]
    onehot = label_binarize(y_true, classes=classes)
    if len(classes) == 2:
        onehot = np.column_stack([1 - onehot[:, 0], onehot[:, 0]])
        macro = roc_auc_score(onehot[:, 1], proba[:, 1])
    elif np.isin(classes, y_true).all():
        macro = roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=classes)
    else:
        macro = math.nan  # a class absent from the test fold: OvR AUC undefined
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "f1_macro": float(
            f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)
        ),
        "mcc": float(matthews_corrcoef(y_true, y_pred)),
        "roc_auc_ovr_macro": float(macro),
        "roc_auc_micro": float(roc_auc_score(onehot.ravel(), proba.ravel())),
        "log_loss": float(log_loss(y_true, proba, labels=classes)),
    }


def nadeau_bengio(diffs: Sequence[float], n_train: int, n_test: int) -> dict:
    """Nadeau-Bengio corrected resampled t-test of fold-wise score differences.

    The variance of the mean difference over J = repeats x folds resamples is inflated from
    ``s^2 / J`` to ``(1 / J + n_test / n_train) * s^2`` to account for overlapping training
    sets (Nadeau & Bengio, Machine Learning 52, 2003); df = J - 1, two-sided p-value.

    Parameters
    ----------
    diffs : sequence of float
        Score of model A minus score of model B on each fold (same folds).
    n_train, n_test : int
        Training and test set sizes of one fold.

    Returns
    -------
    dict
        ``mean``, ``t``, ``df`` and ``p`` (``t``/``p`` are NaN with fewer than 2 folds).

    Examples
    --------
    >>> r = nadeau_bengio([0.1, 0.2, 0.0, 0.1, 0.1], n_train=80, n_test=20)
    >>> round(r["t"], 4), r["df"]
    (2.1082, 4)
    """
    d = np.asarray(diffs, dtype=np.float64)
    j = d.size
    mean = float(d.mean()) if j else math.nan
    if j < 2:
        return {"mean": mean, "t": math.nan, "df": max(j - 1, 0), "p": math.nan}
    # identical differences have zero variance (computed, it would be rounding noise)
    var = 0.0 if np.ptp(d) == 0.0 else float(d.var(ddof=1))
    se = math.sqrt((1.0 / j + n_test / n_train) * var)
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0.0 else 0.0
    else:
        t = mean / se
        p = float(2.0 * stats.t.sf(abs(t), df=j - 1))
    return {"mean": mean, "t": float(t), "df": j - 1, "p": p}


# --------------------------------------------------------------------------- CV with cache
def split_indices(y, n_splits: int, n_repeats: int, seed: int) -> list[tuple]:
    """``(repeat, fold, train_idx, test_idx)`` for every fold, the same for every model."""
    cv = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed)
    out = []
    for i, (tr, te) in enumerate(cv.split(np.zeros(len(y)), y)):
        out.append((i // n_splits, i % n_splits, tr, te))
    return out


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _cache_path(cache_file: Path, key: str) -> Path:
    """Where the record of ``key`` lives: ``cache_file``, unless that holds another
    configuration's record of the same model name and fold (e.g. other ``max_epochs``), in
    which case ``<stem>.<key prefix>.json`` beside it, so that both stay cached."""
    if cache_file.exists() and json.loads(cache_file.read_text()).get("key") != key:
        return cache_file.with_name(f"{cache_file.stem}.{key[:8]}.json")
    return cache_file


def run_fold(
    model,
    dataset: Dataset,
    train,
    test,
    cache_file: Path | None,
    key: str,
    *,
    cached_only: bool = False,
) -> dict | None:
    """Fit ``model`` on the training rows, score the test rows; cached in ``cache_file``.

    With ``cached_only`` nothing is fitted: the cached record, or None when there is none.
    """
    if cache_file is not None:
        cache_file = _cache_path(cache_file, key)
    if cache_file is not None and cache_file.exists():
        record = json.loads(cache_file.read_text())
        if record.get("key") == key:
            record["cached"] = True
            return record
    if cached_only:
        return None
    est = clone(model)
    load_before = os.getloadavg()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        est.fit(dataset.X[train], dataset.y[train])
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        proba = est.predict_proba(dataset.X[test])
        predict_s = time.perf_counter() - t0
    record = {
        "key": key,
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "fit_s": fit_s,
        "predict_s": predict_s,
        **fold_metrics(dataset.y[test], proba, est.classes_),
        **_details(est),
        **_entropy(est, dataset.X[test]),
        "host": host(load_before),
    }
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=_json_default))
        os.replace(tmp, cache_file)
    record["cached"] = False
    return record


def _details(est) -> dict:
    """Chosen hyper-parameters and T-GEM training facts of a fitted model."""
    out = {}
    if hasattr(est, "best_params_"):
        out["best_params"] = {k: v for k, v in est.best_params_.items()}
        est = est.best_estimator_
    last = est.steps[-1][1] if isinstance(est, Pipeline) else est
    if hasattr(last, "history_"):
        durations = [h["duration_s"] for h in last.history_]
        out["tgem"] = {
            "epochs": int(last.n_iter_),
            "backend": last.attention_backend_,
            "epoch_s_median": float(np.median(durations)),
            "final_train_loss": float(last.history_[-1]["train_loss"]),
            "final_train_accuracy": float(last.history_[-1]["train_accuracy"]),
        }
    return out


#: Test cells whose attention entropy is measured per fold (the first ones of the fold).
ENTROPY_CELLS = 256


def _entropy(est, X_test) -> dict:
    """T-GEM's attention entropy per layer on the fold's test cells: mean over heads, query
    genes and the first ``ENTROPY_CELLS`` cells, and how far that lies below uniform attention
    (``log G``; nats). Empty for the other models."""
    if hasattr(est, "best_estimator_"):
        est = est.best_estimator_
    if not isinstance(est, Pipeline) or not hasattr(est.steps[-1][1], "module_"):
        return {}
    from tgem.attention import attention_entropy

    X = est[:-1].transform(X_test[:ENTROPY_CELLS]) if len(est.steps) > 1 else X_test[:ENTROPY_CELLS]
    per_head = attention_entropy(est.steps[-1][1], X)  # (layers, heads)
    per_layer = np.asarray(per_head, dtype=np.float64).mean(axis=1)
    uniform = math.log(X.shape[1])
    return {
        "entropy_per_layer": per_layer.tolist(),
        "entropy_below_uniform_per_layer": (uniform - per_layer).tolist(),
    }


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return repr(value)


def run_cv(
    datasets: Sequence[Dataset],
    models: Sequence[str],
    settings: Settings,
    *,
    n_splits: int,
    n_repeats: int,
    cache_dir: Path | None,
    max_folds: int | None = None,
    shard: tuple[int, int] | None = None,
    cached_only: bool = False,
    model_factory: Callable = make_model,
) -> dict:
    """Every model on every data set and fold; returns ``{dataset: {model: [records]}}``.

    A model given as ``"name@ds1+ds2"`` runs on those data sets only. ``shard=(i, n)`` runs
    only the folds whose position in the repeated CV (after ``max_folds``) is ``i`` modulo
    ``n``, so that ``n`` processes or machines sharing the cache folder fill it together.
    ``cached_only`` fits nothing: folds without a cached record are left out of the result.
    """
    if shard is not None:
        _check_shard(shard)
    results: dict = {}
    for ds in datasets:
        folds = split_indices(ds.y, n_splits, n_repeats, settings.seed)
        if max_folds is not None:
            folds = folds[:max_folds]
        if shard is not None:
            folds = folds[shard[0] :: shard[1]]
        results[ds.name] = {}
        for spec in models:
            name, _, where = spec.partition("@")
            if where and ds.name not in where.split("+"):
                continue
            model = model_factory(name, ds, settings)
            config = model_key(model)
            records = []
            for repeat, fold, tr, te in folds:
                key = _digest(
                    CACHE_VERSION, ds.name, ds.X.shape, config, tr.tobytes(), te.tobytes()
                )
                cache_file = (
                    None
                    if cache_dir is None
                    else cache_dir / ds.name / name / f"r{repeat}_f{fold}.json"
                )
                rec = run_fold(model, ds, tr, te, cache_file, key, cached_only=cached_only)
                if rec is None:  # cached_only and not banked: left out, and said
                    logger.info("%s %s r%d f%d: not cached", ds.name, name, repeat, fold)
                    continue
                rec.update(repeat=repeat, fold=fold)
                logger.info(
                    "%s %s r%d f%d: acc %.3f bacc %.3f fit %.1fs%s",
                    ds.name,
                    name,
                    repeat,
                    fold,
                    rec["accuracy"],
                    rec["balanced_accuracy"],
                    rec["fit_s"],
                    " (cached)" if rec["cached"] else "",
                )
                records.append(rec)
            results[ds.name][name] = records
    return results


# --------------------------------------------------------------------------- summaries
def summarise(results: dict, reference: str = "tgem") -> dict:
    """Mean/std of every metric and time per model, and paired tests.

    Each T-GEM model (name starting with ``reference``) is tested against every baseline and
    against ``reference``; each other T-GEM model against those listed before it.
    """
    summary: dict = {}
    for ds, by_model in results.items():
        table = {}
        for name, recs in by_model.items():
            row = {"n_folds": len(recs)}
            for m in (*METRICS, "fit_s", "predict_s"):
                vals = np.array([r[m] for r in recs], dtype=np.float64)
                row[m] = {
                    "mean": float(np.nanmean(vals)) if len(vals) else math.nan,
                    "std": float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else math.nan,
                }
            table[name] = row
        paired = {}
        refs = [r for r in by_model if r.startswith(reference)]
        pairs = [(r, b) for r in refs for b in by_model if not b.startswith(reference)]
        pairs += [(r, reference) for r in refs if r != reference and reference in by_model]
        # and each later T-GEM variant against each earlier one (the order of --models), so
        # that e.g. tgem_scaled_lr1e-3 vs tgem_scaled isolates the learning rate
        variants = [r for r in refs if r != reference]
        pairs += [(a, b) for i, a in enumerate(variants) for b in variants[:i]]
        for ref, name in pairs:
            a = {(r["repeat"], r["fold"]): r for r in by_model[ref]}
            b = {(r["repeat"], r["fold"]): r for r in by_model[name]}
            common = sorted(set(a) & set(b))
            if not common:
                continue
            n_train = int(np.mean([a[k]["n_train"] for k in common]))
            n_test = int(np.mean([a[k]["n_test"] for k in common]))
            paired[f"{ref} vs {name}"] = {
                m: nadeau_bengio([a[k][m] - b[k][m] for k in common], n_train, n_test)
                for m in ("accuracy", "balanced_accuracy", "f1_macro")
            }
        summary[ds] = {"models": table, "paired": paired}
    return summary


def verdict(test: dict, alpha: float = 0.05) -> str:
    """``win``/``loss`` where the corrected test rejects equality at ``alpha``, else ``tie``."""
    if not np.isfinite(test["p"]) or test["p"] >= alpha:
        return "tie"
    return "win" if test["mean"] > 0 else "loss"


# --------------------------------------------------------------------------- epoch timing
def epoch_timing(
    genes: Sequence[int],
    *,
    n_samples: int = 1000,
    batch_size: int = 16,
    steps: int = 2,
    threads: int = 2,
    seed: int = 0,
    max_pairs_per_step: float = 5e8,
    cache_dir: Path | None = None,
) -> list:
    """Seconds per training epoch of default T-GEM against the number of genes.

    Synthetic log-scale data of each width (the cost depends on the shape only). For each
    width a few optimisation steps (forward, backward, Adam) are timed after one warm-up
    step with ``attention_backend="auto"`` (the backend it runs at each width is recorded);
    where that is a dense kernel, the batch is shrunk for wide inputs so one step stays
    affordable (``batch x genes^2 <= max_pairs_per_step``; the tree code needs no such
    shrinking), and the epoch time for ``n_samples``
    samples is extrapolated linearly in the number of samples (the cost per sample is
    independent of the batch once the batch amortises the per-step overhead).
    """
    import torch

    from tgem._kernels import resolve_backend
    from tgem._model import TGEMNet

    rows = []
    for g in genes:
        backend = resolve_backend("auto", "cpu", genes=g).name
        b = batch_size
        if "tree" not in backend:  # dense: quadratic in the genes
            b = int(max(1, min(batch_size, max_pairs_per_step // (g * g))))
        key = _digest(CACHE_VERSION, "epoch", g, b, steps, threads, torch.__version__, backend)
        cache_file = None if cache_dir is None else cache_dir / "epoch_time" / f"g{g}.json"
        if cache_file is not None and cache_file.exists():
            rec = json.loads(cache_file.read_text())
            if rec.get("key") == key:
                rows.append(rec)
                continue
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            gen = torch.Generator().manual_seed(seed)
            net = TGEMNet(
                n_genes=g,
                n_classes=10,
                n_layers=3,
                n_heads=5,
                activation="leakyrelu",
                dropout=0.3,
                shared_norm=True,
                attention_backend="auto",
                generator=gen,
            )
            opt = torch.optim.Adam(net.parameters(), lr=1e-4)
            x = torch.rand(b, g, generator=gen) * 4.0
            target = torch.randint(0, 10, (b,), generator=gen)
            times = []
            for i in range(steps + 1):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.nll_loss(net(x), target)
                loss.backward()
                opt.step()
                if i:
                    times.append(time.perf_counter() - t0)
            backend = net.backend(x).name
        finally:
            torch.set_num_threads(before)
        per_sample = float(np.min(times)) / b
        rec = {
            "key": key,
            "genes": g,
            "batch": b,
            "steps_timed": steps,
            "step_s_min": float(np.min(times)),
            "s_per_sample": per_sample,
            "epoch_s_per_1000_samples": per_sample * 1000,
            "backend": backend,
            "threads": threads,
        }
        logger.info("epoch timing: %d genes, batch %d: %.3f s/step", g, b, rec["step_s_min"])
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(rec, indent=1))
        rows.append(rec)
    return rows


# --------------------------------------------------------------------------- reporting
def _cpu_model() -> str:
    """The CPU model, from the benchmarks' one /proc/cpuinfo reader."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_attention import cpu_model

    return cpu_model()


def _native_isa() -> str | None:
    """The instruction-set path the native attention kernel runs, or None without it."""
    from tgem._kernels import _native

    if _native._disabled():
        return None
    return _native._active_isa()[0]


def host(load_before: float | None = None) -> dict:
    """What a fold's fit time depends on besides the model: CPU, cores, kernel path,
    torch threads, load.

    The 1-minute load average is read before the fit and after it; the fit's own busy
    threads add about their number, so a value above the core count means threads waited
    for a core (see :func:`fit_time_notes`).
    """
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "native_isa": _native_isa(),
        "torch_threads": torch.get_num_threads(),
        "load_1min_before": None if load_before is None else round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def fit_time_notes(results: dict, threads: int | None) -> dict:
    """Per data set and model, why its fit-time column is not one machine's measurement.

    Returns ``{dataset: {model: note}}`` for models whose folds were fitted on more than one
    kind of host (CPU model, native kernel path or torch threads, where recorded), include
    folds without a host record (cached by an older version of this script), or ran where the
    1-minute load average after the fit exceeded by more than one the larger of ``threads``
    and the fold's recorded core count (more runnable threads than cores: other work
    delayed the fit). Folds of parallel single-threaded shards (``--shard``) on as many
    cores as shards are therefore not flagged as loaded, but their thread count marks them
    as another kind of host than folds fitted with more threads.
    """
    base = threads or os.cpu_count() or 1
    notes: dict = {}
    for ds, by_model in results.items():
        for name, recs in by_model.items():
            hosts: dict = {}
            missing = loaded = 0
            worst = 0.0
            for r in recs:
                h = r.get("host")
                if h is None:
                    missing += 1
                    continue
                kind = f"{h['cpu']} / {h['native_isa'] or 'no native kernel'}"
                if h.get("torch_threads") is not None:
                    kind += f" / {h['torch_threads']} thread(s)"
                hosts[kind] = hosts.get(kind, 0) + 1
                busy = max(base, h.get("cores") or 0) + 1.0
                if h.get("load_1min_after") is not None and h["load_1min_after"] > busy:
                    loaded += 1
                    worst = max(worst, busy)
            parts = []
            if len(hosts) > 1 or (hosts and missing):
                parts.append("hosts: " + ", ".join(f"{k} ({n})" for k, n in hosts.items()))
            if missing and (hosts or len(recs) > missing):
                parts.append(
                    f"{missing} fold(s) without a host record (cached before hosts were recorded)"
                )
            if loaded:
                parts.append(f"{loaded} fold(s) fitted under a 1-min load above {worst:g}")
            if parts:
                notes.setdefault(ds, {})[name] = "; ".join(parts)
    return notes


def machine() -> dict:
    """Cores, CPU model (from /proc/cpuinfo), versions and the date."""
    import sklearn
    import torch

    import tgem
    from tgem._kernels import resolve_backend

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "native_isa": _native_isa(),
        "python": sys.version.split()[0],
        "tgem": tgem.__version__,
        "torch": torch.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "attention_backend_auto_cpu": resolve_backend("auto", "cpu").name,
        "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
    }


def _pm(cell: dict, digits: int = 3) -> str:
    if not np.isfinite(cell["mean"]):
        return "n/a"
    if not np.isfinite(cell["std"]):
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def at_a_glance(summary: dict, reference: str = "tgem") -> list[str]:
    """Markdown lines comparing the data sets side by side (empty for fewer than two).

    One table of mean accuracy per model and data set, and one of the paired verdicts of
    every T-GEM model (a name starting with ``reference``) against the baselines, counted
    as wins / ties / losses on accuracy.
    """
    blocks = {ds: block for ds, block in summary.items() if block["models"]}
    if len(blocks) < 2:
        return []
    names = list(dict.fromkeys(n for block in blocks.values() for n in block["models"]))
    head = "| model | " + " | ".join(blocks) + " |"
    rule = "|---|" + "---|" * len(blocks)
    lines = [
        "## At a glance",
        "",
        "Mean accuracy ± std over the folds of each data set:",
        "",
        head,
        rule,
    ]
    for name in names:
        cells = [
            _pm(block["models"][name]["accuracy"]) if name in block["models"] else "-"
            for block in blocks.values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    refs = [n for n in names if n.startswith(reference)]
    if refs:
        lines += [
            "",
            "Paired accuracy against the baselines (p < 0.05), as wins / ties / "
            "losses of the T-GEM model:",
            "",
            head,
            rule,
        ]
        for ref in refs:
            cells = []
            for block in blocks.values():
                verdicts = [
                    verdict(tests["accuracy"])
                    for comp, tests in block["paired"].items()
                    if comp.startswith(f"{ref} vs ")
                    and not comp.split(" vs ", 1)[1].startswith(reference)
                ]
                cells.append(
                    " / ".join(str(verdicts.count(v)) for v in ("win", "tie", "loss"))
                    if verdicts
                    else "-"
                )
            lines.append(f"| {ref} | " + " | ".join(cells) + " |")
    return lines + [""]


def to_markdown(summary: dict, timing: list, meta: dict) -> str:
    """The results as markdown tables."""
    lines = [
        "# T-GEM vs baselines: cross-validated accuracy and cost",
        "",
        f"Generated by `{meta['command']}` on {meta['machine']['date']} "
        f"({meta['machine']['cpu']}, {meta['machine']['cores']} cores; tgem "
        f"{meta['machine']['tgem']}, torch {meta['machine']['torch']}, scikit-learn "
        f"{meta['machine']['scikit-learn']}; attention backend "
        f"{meta['machine']['attention_backend_auto_cpu']}; load average 1/5/15 min at "
        f"the end: {meta['machine']['load_average_1_5_15min']}).",
        "",
        f"Protocol: {meta['protocol']}",
        "",
    ]
    lines += at_a_glance(summary)
    for ds, block in summary.items():
        if not block["models"]:
            continue
        lines += [
            f"## {ds}",
            "",
            meta["datasets"].get(ds, ""),
            "",
            "| model | folds | accuracy | balanced acc. | macro-F1 | MCC | "
            "ROC-AUC OvR macro | ROC-AUC micro | fit s | predict s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in block["models"].items():
            cells = [_pm(row[m]) for m in METRICS]
            lines.append(
                f"| {name} | {row['n_folds']} | "
                + " | ".join(cells)
                + f" | {_pm(row['fit_s'], 1)} | {_pm(row['predict_s'], 2)} |"
            )
        notes = meta.get("fit_time_notes", {}).get(ds, {})
        if notes:
            lines += [
                "",
                "Fit times not measured on one quiet machine (compare them with care):",
                "",
            ]
            lines += [f"- {name}: {note}" for name, note in notes.items()]
        if block["paired"]:
            lines += [
                "",
                "Paired comparison (fold-wise difference A minus B over the same "
                "folds; Nadeau-Bengio corrected t-test, two-sided; verdict for A at "
                "p < 0.05):",
                "",
                "| A vs B | Δ accuracy | p | Δ balanced acc. | p | Δ macro-F1 | p "
                "| verdict (accuracy) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for comp, tests in block["paired"].items():
                cells = []
                for m in ("accuracy", "balanced_accuracy", "f1_macro"):
                    cells += [f"{tests[m]['mean']:+.3f}", f"{tests[m]['p']:.3f}"]
                lines.append(
                    f"| {comp} | " + " | ".join(cells) + f" | {verdict(tests['accuracy'])} |"
                )
        lines.append("")
    if timing:
        lines += [
            "## T-GEM training time per epoch vs number of genes",
            "",
            "Default architecture (3 layers, 5 heads), synthetic data of each width "
            "(the cost depends on the shape only); the faster of 2 optimisation "
            "steps (forward, backward, Adam) after a warm-up step; the epoch time is "
            "extrapolated linearly to 1,000 samples from the time per sample. On a "
            "machine shared with other work (see the load average above) these are "
            "upper bounds.",
            "",
            "| genes | batch timed | s / step (best of 2) | ms / sample "
            "| s / epoch (1,000 samples) "
            "| backend |",
            "|---|---|---|---|---|---|",
        ]
        for r in timing:
            lines.append(
                f"| {r['genes']} | {r['batch']} | {r['step_s_min']:.3f} | "
                f"{1000 * r['s_per_sample']:.1f} | "
                f"{r['epoch_s_per_1000_samples']:.1f} | {r['backend']} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_folds(results: dict, path: Path) -> Path | None:
    """Per-fold accuracy of every model, one panel per data set (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning('matplotlib is missing; no figure (pip install "tgem[plot]")')
        return None
    results = {ds: by for ds, by in results.items() if by}
    if not results:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (ds, by_model) in zip(axes[0], results.items(), strict=True):
        names = list(by_model)
        for i, name in enumerate(names):
            acc = np.array([r["accuracy"] for r in by_model[name]])
            ax.scatter(
                i + rng.uniform(-0.12, 0.12, acc.size),
                acc,
                s=18,
                alpha=0.7,
                color="C3" if name.startswith("tgem") else "C0",
            )
            if acc.size:
                ax.hlines(acc.mean(), i - 0.3, i + 0.3, color="k", lw=1.5)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_title(ds)
        ax.set_ylabel("accuracy per fold")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: all_mol_biol with 200 probes, 2 folds, 2 epochs, "
        "small baselines, narrow timing table; writes to a temporary folder "
        "unless --results-dir is given",
    )
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated; NAME@DS1+DS2 runs NAME on those data sets only; "
        f"also available: {', '.join(VARIANTS)}",
    )
    p.add_argument("--n-splits", type=int, default=5)
    p.add_argument("--n-repeats", type=int, default=3)
    p.add_argument(
        "--max-folds",
        type=int,
        default=None,
        help="run only the first N folds of the repeated CV of each data set",
    )
    p.add_argument(
        "--shard",
        type=_parse_shard,
        default=None,
        metavar="I/N",
        help="run only every N-th fold starting at fold I (0-based), e.g. 0/2 "
        "and 1/2 in two processes or machines sharing --results-dir; "
        "then rerun without it to build the full table from the cache",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for T-GEM")
    p.add_argument("--top-k", type=int, default=2000, help="top-variance probes for ALL")
    p.add_argument(
        "--tgem-max-epochs",
        type=int,
        default=None,
        help="override max_epochs of every T-GEM fit (default: the library's)",
    )
    p.add_argument(
        "--tgem-param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override any TGEMClassifier parameter (JSON value), repeatable",
    )
    p.add_argument(
        "--grid-max-epochs",
        type=int,
        default=None,
        help="max_epochs of the inner grid-search fits of tgem_tuned only "
        "(the refit keeps the full epochs)",
    )
    p.add_argument(
        "--timing-genes",
        default=",".join(map(str, TIMING_GENES)),
        help="widths of the epoch-time table; empty to skip it",
    )
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--tag", default="accuracy", help="file stem of the outputs")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    return p


def _check_shard(shard) -> tuple[int, int]:
    """``shard`` if it is ``(i, n)`` with ``0 <= i < n``; a ValueError naming the fix if not."""
    ok = (
        isinstance(shard, tuple)
        and len(shard) == 2
        and all(isinstance(v, int) for v in shard)
        and 0 <= shard[0] < shard[1]
    )
    if not ok:
        raise ValueError(
            f"shard must be (i, n) with 0 <= i < n, got {shard!r}; "
            "e.g. (0, 2) and (1, 2) split the folds between two runs"
        )
    return shard


def _parse_shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` as ``(I, N)``; an argparse usage error otherwise."""
    i, _, n = text.partition("/")
    try:
        return _check_shard((int(i), int(n)))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected I/N with 0 <= I < N (e.g. 0/2), got {text!r}"
        ) from None


def _parse_tgem_params(items) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--tgem-param expects NAME=VALUE, got {item!r}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    tgem_params = _parse_tgem_params(args.tgem_param)
    if args.tgem_max_epochs is not None:
        tgem_params["max_epochs"] = args.tgem_max_epochs
    settings = Settings(seed=args.seed, threads=args.threads, tgem_params=tgem_params)
    datasets = [d for d in args.datasets.split(",") if d]
    models = [m for m in args.models.split(",") if m]
    n_splits, n_repeats, top_k = args.n_splits, args.n_repeats, args.top_k
    timing_genes = [int(g) for g in args.timing_genes.split(",") if g.strip()]
    results_dir = args.results_dir
    if args.quick:
        datasets, n_splits, n_repeats, top_k = ["all_mol_biol"], 2, 1, 200
        settings.tgem_params = {"max_epochs": 2, **tgem_params}
        settings.grid_params = {"max_epochs": 1}
        settings.grid_folds, settings.rf_trees = 2, 50
        settings.hgb_max_iter, settings.mlp_max_iter = 10, 50
        timing_genes = [100, 300]
        if results_dir is None:
            results_dir = Path(tempfile.mkdtemp(prefix="tgem_bench_quick_"))
    if args.grid_max_epochs is not None:
        settings.grid_params["max_epochs"] = args.grid_max_epochs
    results_dir = results_dir or RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = results_dir / "cache"

    loaded = [load_dataset(d, args.data_dir, top_k=top_k) for d in datasets]
    t0 = time.perf_counter()
    results = run_cv(
        loaded,
        models,
        settings,
        n_splits=n_splits,
        n_repeats=n_repeats,
        cache_dir=cache_dir,
        max_folds=args.max_folds,
        shard=args.shard,
    )
    cv_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    timing = (
        epoch_timing(timing_genes, threads=args.threads, seed=args.seed, cache_dir=cache_dir)
        if timing_genes
        else []
    )
    timing_s = time.perf_counter() - t0
    summary = summarise(results)
    folds = (
        n_splits * n_repeats
        if args.max_folds is None
        else min(args.max_folds, n_splits * n_repeats)
    )
    if args.shard is not None:
        folds = len(range(args.shard[0], folds, args.shard[1]))
    protocol = (
        f"{n_repeats} x stratified {n_splits}-fold CV (seed {args.seed}; "
        f"{folds} fold(s) run per data set"
        + (
            ""
            if args.shard is None
            else f", shard {args.shard[0]}/{args.shard[1]}: every {args.shard[1]}-th fold "
            f"from fold {args.shard[0]}"
        )
        + "), same folds for every model; "
        f"T-GEM parameters overridden: {settings.tgem_params or 'none'}; "
        f"inner grid-search overrides: {settings.grid_params or 'none'}; "
        f"inner folds {settings.grid_folds}; RF trees {settings.rf_trees}; "
        f"HGB max_iter {settings.hgb_max_iter}; MLP max_iter "
        f"{settings.mlp_max_iter}; torch threads {args.threads}, n_jobs=1."
    )
    meta = {
        "command": "python benchmarks/bench_accuracy.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "protocol": protocol,
        "datasets": {
            d.name: f"{d.description}; {d.shape[0]} samples, {len(np.unique(d.y))} classes."
            for d in loaded
        },
        "fit_time_notes": fit_time_notes(results, args.threads),
        "wall_s": {"cv": cv_s, "timing": timing_s},
    }
    stem = results_dir / args.tag
    payload = {
        "meta": meta,
        "summary": summary,
        "epoch_timing": timing,
        "folds": {
            ds: {
                m: [{k: v for k, v in r.items() if k not in ("key", "cached")} for r in recs]
                for m, recs in by.items()
            }
            for ds, by in results.items()
        },
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=_json_default))
    md = to_markdown(summary, timing, meta)
    stem.with_suffix(".md").write_text(md)
    plot_folds(results, results_dir / f"{args.tag}_folds.png")
    sys.stdout.write(md + "\n")
    logger.info("results in %s (CV %.0f s, timing %.0f s)", results_dir, cv_s, timing_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
