"""Calibration on held-out cells: temperature scaling, rejection thresholds, conformal sets."""

import io
import json
import math
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
import sklearn
import torch
from scipy.special import log_softmax, softmax
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

import tgem
from tests.test_io import _rebuild, _to_bytes
from tgem import TGEMClassifier, load
from tgem._calibration import (
    TARGET_REJECTION,
    TEMPERATURE_BOUNDS,
    captured_logits,
    conformal_quantile,
    conformity_scores,
    expected_calibration_error,
    fit_temperature,
    prediction_sets,
    split_calibration,
)
from tgem.exceptions import ModelFileError

FAST = dict(n_layers=1, n_heads=2, max_epochs=3, batch_size=16, learning_rate=1e-2, n_threads=1)


def _data(n=150, genes=6, n_classes=3, seed=0, shift=1.5):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, genes)).astype(np.float32)
    y = np.array(["a", "b", "c", "d"][:n_classes])[np.arange(n) % n_classes]
    X[np.arange(n), np.arange(n) % n_classes] += shift
    return X, y


@pytest.fixture(scope="module")
def calibrated():
    X, y = _data()
    clf = TGEMClassifier(
        calibration="temperature", calibration_fraction=0.2, random_state=0, **FAST
    )
    return clf.fit(X, y), X, y


def _logits(model, X) -> np.ndarray:
    store: list = []
    with captured_logits(model, store):
        model.predict_proba(X)
    return np.concatenate(store)


# ------------------------------------------------------------------ temperature
def test_fit_temperature_equals_a_grid_search_of_the_nll():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(300, 4)) * 3
    y = rng.integers(0, 4, size=300)
    y[:150] = np.argmax(z[:150], axis=1)  # half predictable: an interior optimum
    T, before, after, at_bound = fit_temperature(z, y)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 20001))
    nll = [-np.mean(log_softmax(z / t, axis=1)[np.arange(300), y]) for t in grid]
    assert T == pytest.approx(grid[int(np.argmin(nll))], rel=1e-3)
    assert min(nll) - 1e-12 > after - 1e-8 and after <= min(nll) + 1e-12 and after <= before
    assert before == pytest.approx(-np.mean(log_softmax(z, axis=1)[np.arange(300), y]))
    assert not at_bound


def test_fit_temperature_recovers_the_temperature_that_drew_the_labels():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(20000, 5)) * 4
    p = softmax(z / 2.5, axis=1)
    y = (p.cumsum(axis=1) > rng.random((20000, 1))).argmax(axis=1)
    T, *_ = fit_temperature(z, y)
    assert T == pytest.approx(2.5, rel=0.05)


def test_fit_temperature_weights_and_constant_shifts():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(200, 3)) * 2
    y = rng.integers(0, 3, size=200)
    w = rng.integers(0, 3, size=200).astype(float)
    repeated = np.repeat(np.arange(200), w.astype(int))
    assert fit_temperature(z, y, w)[0] == pytest.approx(
        fit_temperature(z[repeated], y[repeated])[0]
    )
    # log-probabilities give the temperature of the logits
    assert fit_temperature(log_softmax(z, axis=1), y)[0] == pytest.approx(fit_temperature(z, y)[0])


def test_separable_held_out_cells_end_on_the_bound_and_say_so():
    z = np.array([[5.0, 0.0], [0.0, 5.0]] * 10)
    T, _, _, at_bound = fit_temperature(z, np.array([0, 1] * 10))
    assert at_bound and T == pytest.approx(TEMPERATURE_BOUNDS[0])


def test_predict_proba_is_the_softmax_of_the_logits_over_the_temperature(calibrated):
    clf, X, _ = calibrated
    T = clf.temperature_
    assert T != 1.0 and TEMPERATURE_BOUNDS[0] <= T <= TEMPERATURE_BOUNDS[1]
    want = softmax(_logits(clf, X) / T, axis=1)
    np.testing.assert_allclose(clf.predict_proba(X), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(X)), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(X).sum(axis=1), 1.0, atol=1e-12)


def test_predict_is_unchanged_by_the_temperature(calibrated):
    clf, X, y = calibrated
    raw = clf.classes_[np.argmax(_logits(clf, X), axis=1)]
    assert np.array_equal(clf.predict(X), raw)
    assert clf.score(X, y) == np.mean(raw == y)


def test_extreme_temperatures_give_finite_probabilities(calibrated):
    clf, X, _ = calibrated
    model = pickle.loads(pickle.dumps(clf))
    for T in TEMPERATURE_BOUNDS:
        model.temperature_ = T
        p = model.predict_proba(X)
        assert np.isfinite(p).all() and np.allclose(p.sum(axis=1), 1.0)


# ------------------------------------------------------------------ the hold-out
def test_split_is_stratified_and_holds_every_class_on_both_sides():
    y = np.repeat([0, 1, 2], [100, 10, 2])
    train, cal = split_calibration(y, 3, 0.1, seed=0)
    assert np.array_equal(np.sort(np.r_[train, cal]), np.arange(len(y)))
    assert np.bincount(y[cal]).tolist() == [10, 1, 1]
    assert np.bincount(y[train]).tolist() == [90, 9, 1]
    train2, cal2 = split_calibration(y, 3, 0.1, seed=0)
    assert np.array_equal(cal, cal2)


def test_a_class_with_one_cell_is_refused_with_the_fix():
    X, y = _data(n=31)
    y[-1] = "lonely"
    with pytest.raises(ValueError, match=r"at least 2 cells per class.*calibration=None"):
        TGEMClassifier(calibration="temperature", **FAST).fit(X, y)


@pytest.mark.parametrize(
    "params",
    [
        dict(calibration="platt"),
        dict(calibration="temperature", calibration_fraction=0.0),
        dict(calibration="temperature", calibration_fraction=1.0),
    ],
)
def test_invalid_calibration_parameters_are_refused(params):
    X, y = _data(n=30)
    with pytest.raises(InvalidParameterError):
        TGEMClassifier(**params, **FAST).fit(X, y)


def test_the_network_never_trains_on_the_held_out_cells():
    # the same seeds train the same network on exactly the cells that were not held out
    # (standardize=False: with it, the gene statistics come from all of X, as documented)
    X, y = _data()
    fast = {**FAST, "standardize": False}
    held = TGEMClassifier(calibration="temperature", random_state=0, **fast).fit(X, y)
    kept = np.setdiff1d(np.arange(len(y)), held.calibration_indices_)
    plain = TGEMClassifier(random_state=0, **fast).fit(X[kept], y[kept])
    for key, value in plain.module_.state_dict().items():
        assert torch.equal(held.module_.state_dict()[key], value), key
    assert held.calibration_report_["n_train"] == len(kept)


@pytest.mark.filterwarnings("ignore:calibration. the temperature")  # 3 epochs: maybe T = 100
def test_early_stopping_validates_on_the_cells_left_after_the_hold_out():
    X, y = _data(n=200)
    clf = TGEMClassifier(
        calibration="temperature", early_stopping=True, validation_fraction=0.25, random_state=0
    )
    clf.set_params(**FAST).fit(X, y)
    n_left = 200 - len(clf.calibration_indices_)  # early stopping validates on a quarter
    assert clf.calibration_report_["n_train"] == n_left - math.ceil(0.25 * n_left)
    assert np.isfinite([h["valid_loss"] for h in clf.history_]).all()


def test_without_calibration_nothing_is_held_out_and_the_temperature_is_one():
    X, y = _data()
    clf = TGEMClassifier(random_state=0, **FAST).fit(X, y)
    assert clf.temperature_ == 1.0
    for name in ("rejection_thresholds_", "calibration_report_", "conformal_scores_"):
        assert not hasattr(clf, name)
    with pytest.raises(NotFittedError, match="calibration='temperature'"):
        clf.predict_set(X)


# ------------------------------------------------------------------ report and thresholds
def test_report_and_thresholds_are_those_of_the_held_out_cells(calibrated):
    clf, X, y = calibrated
    rows = clf.calibration_indices_
    report = clf.calibration_report_
    assert report["n_calibration"] == len(rows) == len(clf.conformal_scores_)
    assert report["temperature"] == clf.temperature_
    assert report["target_rejection"] == TARGET_REJECTION == 0.05
    assert report["accuracy"] == pytest.approx(clf.score(X[rows], y[rows]), abs=1e-12)
    assert report["nll_after"] <= report["nll_before"]
    y_idx = np.searchsorted(clf.classes_, y[rows])
    proba = clf.predict_proba(X[rows])
    assert report["nll_after"] == pytest.approx(
        -np.mean(np.log(proba[np.arange(len(rows)), y_idx]))
    )
    assert report["ece_after"] == pytest.approx(expected_calibration_error(y_idx, proba))
    for rule in ("max_proba", "energy"):
        want = tgem.fit_rejection_threshold(clf, X[rows], y[rows], rule=rule)
        assert clf.rejection_thresholds_[rule] == want
    np.testing.assert_array_equal(clf.conformal_scores_, conformity_scores(proba, y_idx))


def test_rejection_uses_the_fitted_thresholds_by_default(calibrated):
    clf, X, _ = calibrated
    for rule in ("max_proba", "energy"):
        given = clf.rejection_thresholds_[rule]
        np.testing.assert_array_equal(
            tgem.predict_with_rejection(clf, X, rule=rule),
            tgem.predict_with_rejection(clf, X, rule=rule, threshold=given),
        )
    # without calibration: 0.5 for max_proba, and energy needs a threshold
    plain = pickle.loads(pickle.dumps(clf))
    del plain.rejection_thresholds_
    np.testing.assert_array_equal(
        tgem.predict_with_rejection(plain, X), tgem.predict_with_rejection(plain, X, threshold=0.5)
    )
    with pytest.raises(ValueError, match="calibration='temperature'"):
        tgem.predict_with_rejection(plain, X, rule="energy")


def test_annotate_records_the_fitted_threshold_and_its_source(calibrated, tmp_path):
    anndata = pytest.importorskip("anndata")
    clf, X, y = calibrated
    frame = pd.DataFrame(X, columns=[f"g{j}" for j in range(X.shape[1])])
    model = clone(clf).set_params(max_epochs=2).fit(frame, y)
    adata = anndata.AnnData(frame)
    tgem.annotate(adata, model, reject="energy")
    rejection = adata.uns["tgem"]["rejection"]
    assert rejection["threshold"] == model.rejection_thresholds_["energy"]
    assert rejection["threshold_source"] == "calibration"
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = anndata.read_h5ad(tmp_path / "a.h5ad").uns["tgem"]["rejection"]
    assert back["threshold_source"] == "calibration"
    tgem.annotate(adata, model, threshold=0.2)
    assert adata.uns["tgem"]["rejection"]["threshold_source"] == "given"


# ------------------------------------------------------------------ conformal sets
def test_conformal_quantile_rank_is_exact():
    scores = np.arange(1.0, 20.0)  # n = 19
    assert conformal_quantile(scores, 0.1) == 18.0  # ceil(20 * 0.9) = 18, not 19
    assert conformal_quantile(scores, 0.05) == 19.0
    assert conformal_quantile(scores, 0.01) == math.inf
    with pytest.raises(ValueError, match="alpha"):
        conformal_quantile(scores, 1.0)


@pytest.mark.parametrize("n_cal, alpha", [(19, 0.1), (50, 0.2), (99, 0.05)])
def test_split_conformal_sets_have_the_guaranteed_marginal_coverage(n_cal, alpha):
    # a fixed, imperfect classifier on exchangeable cells: over random calibration draws
    # the coverage is exactly k / (n + 1) with k = ceil((n + 1)(1 - alpha)) >= 1 - alpha
    rng = np.random.default_rng(0)
    n_pool, n_classes, repeats = n_cal + 200, 4, 3000
    hits = []
    for _ in range(repeats):
        proba = rng.dirichlet(np.ones(n_classes), size=n_pool)
        y = (proba.cumsum(axis=1) > rng.random((n_pool, 1))).argmax(axis=1)
        y[rng.random(n_pool) < 0.2] = rng.integers(0, n_classes)  # some label noise
        cal, test = np.arange(n_cal), np.arange(n_cal, n_pool)
        q = conformal_quantile(conformity_scores(proba[cal], y[cal]), alpha)
        sets = prediction_sets(proba[test], q)
        hits.append(sets[np.arange(len(test)), y[test]].mean())
    coverage = np.mean(hits)
    k = math.ceil((n_cal + 1) * (1 - alpha) - 1e-9)
    se = np.std(hits) / np.sqrt(repeats)
    assert coverage >= 1 - alpha - 4 * se
    assert coverage == pytest.approx(k / (n_cal + 1), abs=4 * se)


def test_predict_set_covers_the_calibration_cells_and_empty_means_low_confidence(calibrated):
    clf, X, y = calibrated
    rows = clf.calibration_indices_
    n = len(rows)
    y_idx = np.searchsorted(clf.classes_, y[rows])
    for alpha in (0.1, 0.3):
        sets = clf.predict_set(X[rows], alpha=alpha)
        covered = sets[np.arange(n), y_idx].mean()
        assert covered >= math.ceil((n + 1) * (1 - alpha) - 1e-9) / n - 1e-12
        q = conformal_quantile(clf.conformal_scores_, alpha)
        empty = ~sets.any(axis=1)
        np.testing.assert_array_equal(empty, 1.0 - clf.predict_proba(X[rows]).max(axis=1) > q)
    assert clf.predict_set(X, alpha=1e-6).all()  # alpha below 1 / (n + 1): every class
    with pytest.raises(ValueError, match="alpha"):
        clf.predict_set(X, alpha=0.0)
    with pytest.raises(TypeError, match="alpha"):
        clf.predict_set(X, alpha="0.1")


def test_predict_set_covers_new_cells_of_the_bundled_pbmc_data():
    from sklearn.model_selection import train_test_split

    from tgem.datasets import load_pbmc68k

    X, y = load_pbmc68k(return_X_y=True)
    train, test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)
    clf = TGEMClassifier(
        calibration="temperature",
        calibration_fraction=0.3,
        standardize=True,
        max_epochs=4,
        learning_rate=1e-3,
        n_threads=1,
        random_state=0,
    ).fit(X[train], y[train])
    sets = clf.predict_set(X[test], alpha=0.1)
    covered = sets[np.arange(len(test)), np.searchsorted(clf.classes_, y[test])].mean()
    # the guarantee is 0.9 on average over draws; 210 test cells: 3 standard errors below
    assert covered >= 0.9 - 3 * math.sqrt(0.09 / len(test))


# ------------------------------------------------------------------ sample weights, warm start
def test_zero_weight_cells_are_left_out_of_the_calibration():
    X, y = _data()
    w = np.ones(len(y))
    w[::4] = 0.0
    clf = TGEMClassifier(calibration="temperature", random_state=0, **FAST)
    clf.fit(X, y, sample_weight=w)
    positive = int(np.sum(w[clf.calibration_indices_] > 0))
    assert clf.calibration_report_["n_calibration"] == positive < len(clf.calibration_indices_)
    w_none = np.ones(len(y))
    w_none[clf.calibration_indices_] = 0.0
    with pytest.raises(ValueError, match="sample_weight 0"):
        clone(clf).fit(X, y, sample_weight=w_none)


def test_warm_fits_recalibrate_and_warn_when_the_hold_out_changes():
    X, y = _data()
    clf = TGEMClassifier(warm_start=True, random_state=0, **FAST).fit(X, y)
    with pytest.warns(UserWarning, match="over-confident"):
        clf.set_params(calibration="temperature").fit(X, y)  # it trained on all cells
    first = clf.calibration_indices_
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf.fit(X, y)  # an int random_state: the same cells again
    assert np.array_equal(clf.calibration_indices_, first)
    clf.set_params(calibration=None).fit(X, y)
    assert clf.temperature_ == 1.0 and not hasattr(clf, "rejection_thresholds_")


def test_h5ad_input_holds_out_the_same_cells_as_an_array(tmp_path):
    anndata = pytest.importorskip("anndata")
    X, y = _data()
    names = [f"g{j}" for j in range(X.shape[1])]
    path = tmp_path / "cells.h5ad"
    adata = anndata.AnnData(
        X, obs=pd.DataFrame({"label": y}, index=[f"c{i}" for i in range(len(y))])
    )
    adata.var_names = names
    adata.write_h5ad(path)
    params = dict(calibration="temperature", random_state=0, **FAST)
    # one-row chunks: the epochs visit the rows in the same order as in memory
    disk = TGEMClassifier(**params).fit(tgem.H5ADDataset(path, chunk_size=1), "label")
    memory = TGEMClassifier(**params).fit(pd.DataFrame(X, columns=names), y)
    assert np.array_equal(disk.calibration_indices_, memory.calibration_indices_)
    assert disk.temperature_ == pytest.approx(memory.temperature_, rel=1e-5)
    assert disk.rejection_thresholds_ == pytest.approx(memory.rejection_thresholds_, rel=1e-5)


def test_dask_predictions_use_the_temperature(calibrated):
    pytest.importorskip("dask")
    import dask.array as da

    from tgem import dask as tdask

    clf, X, _ = calibrated
    P = tdask.predict_proba(clf, da.from_array(X, chunks=(40, -1)), client=None)
    np.testing.assert_allclose(P.compute(scheduler="sync"), clf.predict_proba(X), atol=1e-12)


def _ddp_calibration(rank, init_file, out_dir, X, y):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mine = X if rank == 0 else X * 3 + 1  # rank 1 holds other values: it keeps rank 0's
        clf = TGEMClassifier(calibration="temperature", random_state=0, **FAST).fit(mine, y)
        report = clf.calibration_report_
        values = [clf.temperature_, *clf.rejection_thresholds_.values(), report["nll_after"]]
        reference = clf.neighbor_reference_.arrays().values()
        np.save(
            f"{out_dir}/rank{rank}.npy",
            np.concatenate([values, clf.conformal_scores_, *(a.ravel() for a in reference)]),
        )
    finally:
        tdist.destroy_process_group()


def test_every_ddp_process_keeps_rank_zeros_calibration(tmp_path):
    import torch.multiprocessing as mp

    X, y = _data(n=60)
    mp.spawn(
        _ddp_calibration, args=(str(tmp_path / "rdv"), str(tmp_path), X, y), nprocs=2, join=True
    )
    assert np.array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))


# ------------------------------------------------------------------ model files and pickles
def test_model_files_keep_the_calibration_and_predict_bit_for_bit(calibrated, tmp_path):
    clf, X, _ = calibrated
    clf.save(tmp_path / "m.tgem")
    loaded = load(tmp_path / "m.tgem")
    assert loaded.temperature_ == clf.temperature_
    assert loaded.rejection_thresholds_ == clf.rejection_thresholds_
    assert loaded.calibration_report_ == clf.calibration_report_
    np.testing.assert_array_equal(loaded.conformal_scores_, clf.conformal_scores_)
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict_set(X), clf.predict_set(X))
    assert not hasattr(loaded, "calibration_indices_")  # rows of the training data stay home


def test_uncalibrated_models_write_null_and_format_1_files_load_at_temperature_one():
    X, y = _data(n=40)
    clf = TGEMClassifier(random_state=0, **FAST).fit(X, y)
    data = _to_bytes(clf)
    import zipfile

    header = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("tgem.json"))
    assert header["format_version"] == 3 and header["fitted"]["calibration"] is None

    def as_version_1(h):
        h["format_version"] = 1
        del h["fitted"]["calibration"]
        for name in ("calibration", "calibration_fraction"):
            del h["params"][name]

    old = load(io.BytesIO(_rebuild(data, header=as_version_1)))
    assert old.temperature_ == 1.0 and old.calibration is None
    assert not hasattr(old, "rejection_thresholds_")
    np.testing.assert_array_equal(old.predict_proba(X), clf.predict_proba(X))


def test_the_files_written_by_tgem_0_1_load_uncalibrated():
    from pathlib import Path

    model = load(Path(__file__).parent / "fixtures" / "compat_0.1" / "model.tgem")
    assert model.temperature_ == 1.0 and model.calibration is None
    assert model.calibration_fraction == 0.1 and not hasattr(model, "conformal_scores_")


def _calibration(h):
    return h["fitted"]["calibration"]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: _calibration(h).update(temperature_=-1.0), "temperature_"),
        (lambda h: _calibration(h).update(temperature_=1e300), "temperature_"),
        (lambda h: _calibration(h).update(temperature_="NaN"), "temperature_"),
        (lambda h: _calibration(h).update(temperature_=True), "temperature_"),
        (lambda h: _calibration(h).update(extra=1), "keys"),
        (lambda h: _calibration(h)["rejection_thresholds_"].pop("energy"), "rejection_thr"),
        (lambda h: _calibration(h)["rejection_thresholds_"].update(max_proba=2.0), "probab"),
        (lambda h: _calibration(h)["rejection_thresholds_"].update(energy="Infinity"), "finite"),
        (lambda h: _calibration(h)["rejection_thresholds_"].update(energy=[1]), "finite"),
        (lambda h: _calibration(h)["calibration_report_"].update(n_calibration=-1), "n_calib"),
        (lambda h: _calibration(h)["calibration_report_"].update(n_calibration=3), "conformal"),
        (lambda h: _calibration(h)["calibration_report_"].update(accuracy="x"), "accuracy"),
        (lambda h: _calibration(h)["calibration_report_"].update(nll_after="NaN"), "nll_after"),
        (lambda h: _calibration(h)["calibration_report_"].pop("ece_after"), "report"),
        (lambda h: _calibration(h)["calibration_report_"].update(temperature=3.0), "match"),
        (lambda h: h["fitted"].pop("calibration"), "calibration"),
        (lambda h: h["fitted"].update(calibration=None), "but no calibration"),
        (lambda h: h["fitted"].update(calibration=[1.0]), "mapping"),
    ],
)
def test_a_tampered_calibration_is_refused(calibrated, edit, match):
    clf, _, _ = calibrated
    with pytest.raises(ModelFileError, match=match):
        load(io.BytesIO(_rebuild(_to_bytes(clf), header=edit)))


@pytest.mark.parametrize(
    "scores, match",
    [
        (lambda s: s[::-1], "sorted"),
        (lambda s: s - 2.0, r"\[0, 1\]"),
        (lambda s: np.where(np.arange(len(s)) == 0, np.nan, s), r"\[0, 1\]"),
        (lambda s: s[:, None], "conformal"),
    ],
)
def test_tampered_conformal_scores_are_refused(calibrated, scores, match):
    clf, _, _ = calibrated
    model = pickle.loads(pickle.dumps(clf))
    model.conformal_scores_ = scores(model.conformal_scores_.copy())
    with pytest.raises(ModelFileError, match=match):
        load(io.BytesIO(_to_bytes(model)))


def test_a_calibration_without_its_scores_is_refused(calibrated):
    clf, _, _ = calibrated

    def drop(items):
        del items["attributes/conformal_scores_.npy"]

    def manifest(h):
        h["arrays"] = [a for a in h["arrays"] if "conformal" not in a["name"]]

    with pytest.raises(ModelFileError, match="conformal scores"):
        load(io.BytesIO(_rebuild(_to_bytes(clf), header=manifest, entries=drop)))


def test_pickles_keep_the_calibration_and_old_pickles_get_temperature_one(calibrated):
    clf, X, _ = calibrated
    back = pickle.loads(pickle.dumps(clf))
    assert back.temperature_ == clf.temperature_
    np.testing.assert_array_equal(back.predict_set(X), clf.predict_set(X))
    state = clf.__getstate__()
    for name in ("temperature_", "rejection_thresholds_", "calibration_report_"):
        state.pop(name)
    old = TGEMClassifier.__new__(TGEMClassifier)
    old.__setstate__(state)
    assert old.temperature_ == 1.0
    np.testing.assert_allclose(old.predict_proba(X), softmax(_logits(clf, X), axis=1), atol=1e-6)


# ------------------------------------------------------------------ scikit-learn's calibration
#: CalibratedClassifierCV's methods in every scikit-learn that tgem supports (>= 1.6);
#: "temperature" arrived in 1.8.
METHODS = ["sigmoid", "isotonic"] + (
    ["temperature"] if tuple(map(int, sklearn.__version__.split(".")[:2])) >= (1, 8) else []
)


@pytest.mark.parametrize("method", METHODS)
def test_calibrated_classifier_cv_wraps_tgem(method):
    X, y = _data(n=120)
    cal = CalibratedClassifierCV(TGEMClassifier(random_state=0, **FAST), method=method, cv=2)
    cal.fit(X, y)
    proba = cal.predict_proba(X)
    assert proba.shape == (120, 3) and np.allclose(proba.sum(axis=1), 1.0)
    assert list(cal.classes_) == ["a", "b", "c"] and set(cal.predict(X)) <= {"a", "b", "c"}


def test_calibrated_classifier_cv_on_a_fitted_model_with_frozen_estimator():
    from sklearn.frozen import FrozenEstimator

    X, y = _data(n=120)
    model = TGEMClassifier(random_state=0, **FAST).fit(X[:80], y[:80])
    cal = CalibratedClassifierCV(FrozenEstimator(model), method="sigmoid").fit(X[80:], y[80:])
    assert np.allclose(cal.predict_proba(X).sum(axis=1), 1.0)
