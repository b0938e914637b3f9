"""Tests of the annotation benchmarks: the conformal rule, the figures, the .h5ad writer."""

from pathlib import Path

import numpy as np
import pytest

from tests._benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


bench = load_benchmark("bench_annotate")


def _proba(rng, n, k):
    p = rng.dirichlet(np.full(k, 0.5), size=n)
    return p / p.sum(axis=1, keepdims=True)


def _pvalue_by_hand(p_row, ref_proba, ref_y):
    """Plain formulation: the share of the predicted class's reference cells that the model
    was at most as sure of, with the conformal +1 for the new cell."""
    c = int(np.argmax(p_row))
    a = 1.0 - p_row[c]
    ref = [1.0 - q[c] for q, t in zip(ref_proba, ref_y, strict=True) if t == c]
    return (1 + sum(r >= a for r in ref)) / (len(ref) + 1)


def test_conformal_class_pvalues_match_the_plain_formulation():
    rng = np.random.default_rng(0)
    cal, cal_y = _proba(rng, 60, 4), rng.integers(0, 4, size=60)
    new = _proba(rng, 40, 4)
    got = bench.conformal_class_pvalues(new, cal, cal_y)
    want = [_pvalue_by_hand(p, cal, cal_y) for p in new]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    assert ((got > 0) & (got <= 1)).all()


def test_calibration_pvalues_leave_the_cells_own_score_out():
    rng = np.random.default_rng(1)
    cal, cal_y = _proba(rng, 50, 3), rng.integers(0, 3, size=50)
    right = np.argmax(cal, axis=1) == cal_y
    assert right.any() and not right.all()  # both branches: own class predicted, or another
    got = bench.conformal_class_pvalues(cal, cal, cal_y, own_y=cal_y)
    for i in range(len(cal)):
        others = np.delete(np.arange(len(cal)), i)
        assert got[i] == pytest.approx(_pvalue_by_hand(cal[i], cal[others], cal_y[others]))


def test_conformal_rule_is_not_a_max_probability_cut_off():
    # two classes with very different confidence on their own cells: the same max
    # probability is unremarkable for one and the least confident for the other
    cal = np.array([[0.99, 0.01]] * 9 + [[0.6, 0.4]] * 9 + [[0.01, 0.99]])
    cal[9:18] = cal[9:18][:, ::-1]  # class 1 cells at p = 0.6
    cal_y = np.array([0] * 9 + [1] * 10)
    new = np.array([[0.9, 0.1], [0.1, 0.9]])  # same max probability, different classes
    p = bench.conformal_class_pvalues(new, cal, cal_y)
    assert p[0] == pytest.approx(1 / 10) and p[1] == pytest.approx(10 / 11)


def _record(rng, n_cal=200, n_test=100, n_unseen=50, k=3):
    classes = ["a", "b", "c"][:k]

    def part(n, labels):
        proba = _proba(rng, n, k)
        return {
            "labels": labels,
            "proba": proba.tolist(),
            "scores": {
                "max_proba": proba.max(axis=1).tolist(),
                "energy": rng.normal(size=n).tolist(),
            },
        }

    rec = {
        "classes": classes,
        "cal": part(n_cal, list(rng.choice(classes, n_cal))),
        "test": part(n_test, list(rng.choice(classes, n_test))),
        "unseen": part(n_unseen, ["Mouse"] * (n_unseen // 2) + ["Unknown"] * (n_unseen // 2)),
        "thresholds_api": {},
    }
    return rec


def test_every_rule_rejects_at_most_five_percent_of_calibration_cells():
    rng = np.random.default_rng(2)
    rec = _record(rng)
    neighbors = {p: rng.normal(size=n) for p, n in (("cal", 200), ("test", 100), ("unseen", 50))}
    rows = bench.figures(rec, {"mouse": ["Mouse"], "both": ["Mouse", "Unknown"]}, neighbors)
    assert [r["rule"] for r in rows] == list(bench.ALL_RULES)
    for r in rows:
        assert r["cal_rejected"] <= 0.05
        assert 0 <= r["auroc_mouse"] <= 1 and r["n_mouse"] == 25 and r["n_both"] == 50
        # the threshold is the floor(0.05 n)-th smallest calibration score
        s = bench.rule_scores(rec, neighbors)[r["rule"]]["cal"]
        assert r["threshold"] == np.sort(s)[int(0.05 * len(s))]


def test_auroc_is_one_when_unseen_cells_score_lowest():
    rng = np.random.default_rng(3)
    rec = _record(rng)
    rec["unseen"]["scores"]["energy"] = (np.full(50, -100.0)).tolist()
    rows = {r["rule"]: r for r in bench.figures(rec, {"both": ["Mouse", "Unknown"]})}
    assert rows["energy"]["auroc_both"] == 1.0
    assert rows["energy"]["unassigned_both"] == 1.0


def test_pbmc_h5ad_holds_the_drawn_source_cells(tmp_path):
    anndata = pytest.importorskip("anndata")
    pytest.importorskip("h5py")
    mem = load_benchmark("bench_annotate_memory")
    from tgem.datasets import load_pbmc68k

    path = tmp_path / "cells.h5ad"
    meta = mem.write_pbmc_h5ad(path, 300, seed=4)
    X, y = load_pbmc68k(return_X_y=True, as_frame=True)
    pick = np.random.default_rng(4).integers(0, len(X), size=300)
    adata = anndata.read_h5ad(path, backed="r")
    assert adata.shape == (300, X.shape[1]) and list(adata.var_names) == list(X.columns)
    np.testing.assert_array_equal(adata.X[:].toarray(), X.to_numpy(dtype=np.float32)[pick])
    np.testing.assert_array_equal(adata.obs["cell_type"].astype(str), np.asarray(y)[pick])
    assert meta["nnz"] == int((X.to_numpy()[pick] != 0).sum())


def test_novelty_scores_single_out_a_distant_cluster_at_the_calibration_threshold():
    novelty = load_benchmark("bench_novelty")
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3.0, size=(3, 60))
    y = np.repeat(np.array(["a", "b", "c"]), 200)
    X = np.abs(centres[np.searchsorted(["a", "b", "c"], y)] + rng.normal(size=(600, 60)))
    far = np.abs(rng.normal(loc=12.0, size=(80, 60)))  # a type unlike any training cell
    X, y = np.vstack([X, far]), np.r_[y, np.full(80, "Mouse")]
    train, cal, test, unseen = load_benchmark("bench_annotate").split(y, ("Mouse",), 0)
    s = novelty.scores(X, y, train)
    assert set(s) >= {"mahalanobis", "10-NN distance, 50 PCs", "10-NN cosine distance"}
    r = novelty.figures(s["10-NN distance, 50 PCs"], y, cal, test, unseen)
    assert r["auroc_Mouse"] == pytest.approx(1.0) and r["unassigned_Mouse"] == 1.0
    # the threshold rejects at most 5 % of the calibration cells it was fitted on
    threshold = r["threshold"]
    assert np.mean(s["10-NN distance, 50 PCs"][cal] > threshold) <= 0.05
