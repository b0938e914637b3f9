"""Tests of benchmarks/bench_accuracy.py: the statistics, the leak-free selection, the cache."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline

from tests._benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


bench = load_benchmark("bench_accuracy")


def test_nadeau_bengio_matches_hand_computed_values():
    diffs = [0.1, 0.2, 0.0, 0.1, 0.1]
    # mean 0.1, s^2 = 0.02 / 4 = 0.005, correction 1/5 + 20/80 = 0.45
    t_hand = 0.1 / math.sqrt(0.45 * 0.005)
    r = bench.nadeau_bengio(diffs, n_train=80, n_test=20)
    assert r["mean"] == pytest.approx(0.1)
    assert r["t"] == pytest.approx(t_hand, rel=1e-12)
    assert r["t"] == pytest.approx(2.1081851067789, rel=1e-9)
    assert r["df"] == 4
    assert r["p"] == pytest.approx(2 * stats.t.sf(t_hand, 4), rel=1e-12)
    assert 0.10 < r["p"] < 0.11


def test_nadeau_bengio_is_more_conservative_than_the_naive_paired_t_test():
    rng = np.random.default_rng(0)
    diffs = rng.normal(0.02, 0.03, size=15)
    corrected = bench.nadeau_bengio(diffs, n_train=400, n_test=100)
    naive = stats.ttest_1samp(diffs, 0.0)
    assert abs(corrected["t"]) < abs(naive.statistic)
    assert corrected["p"] > naive.pvalue
    # with no overlap correction (n_test -> 0) it reduces to the plain one-sample t-test
    plain = bench.nadeau_bengio(diffs, n_train=10**12, n_test=1)
    assert plain["t"] == pytest.approx(naive.statistic, rel=1e-6)


def test_nadeau_bengio_degenerate_inputs():
    one = bench.nadeau_bengio([0.3], n_train=8, n_test=2)
    assert one["mean"] == pytest.approx(0.3) and math.isnan(one["t"]) and math.isnan(one["p"])
    same = bench.nadeau_bengio([0.1, 0.1, 0.1], n_train=8, n_test=2)
    assert same["t"] == math.inf and same["p"] == 0.0
    zero = bench.nadeau_bengio([0.0, 0.0], n_train=8, n_test=2)
    assert zero["t"] == 0.0 and zero["p"] == 1.0


@pytest.mark.parametrize(
    ("p", "mean", "expected"),
    [(0.01, 0.1, "win"), (0.01, -0.1, "loss"), (0.2, -0.3, "tie"), (math.nan, 0.1, "tie")],
)
def test_verdict(p, mean, expected):
    assert bench.verdict({"p": p, "mean": mean}) == expected


def test_top_variance_uses_the_training_rows_only():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 6)) * np.array([1.0, 5.0, 0.1, 3.0, 0.5, 2.0])
    X_before = X.copy()
    sel = bench.TopVariance(k=3).fit(X[:30])
    np.testing.assert_allclose(sel.variances_, X[:30].var(axis=0))
    expected = np.sort(np.argsort(-X[:30].var(axis=0))[:3])
    np.testing.assert_array_equal(np.flatnonzero(sel.get_support()), expected)
    np.testing.assert_array_equal(sel.transform(X[30:]), X[30:, expected])
    np.testing.assert_array_equal(X, X_before)
    # k larger than the width keeps everything
    assert bench.TopVariance(k=100).fit(X).transform(X).shape == X.shape
    with pytest.raises(ValueError, match="k >= 1"):
        bench.TopVariance(k=0).fit(X)


def test_fold_metrics_known_values():
    classes = np.array(["a", "b", "c"])
    y = np.array(["a", "a", "b", "c"])
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    m = bench.fold_metrics(y, proba, classes)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    # F1: a = 2/3 (P 1, R 1/2), b = 2/3 (P 1/2, R 1), c = 1
    assert m["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    onehot = (y[:, None] == classes).astype(int)
    assert m["roc_auc_micro"] == pytest.approx(roc_auc_score(onehot.ravel(), proba.ravel()))
    per_class = [roc_auc_score(onehot[:, i], proba[:, i]) for i in range(3)]
    assert m["roc_auc_ovr_macro"] == pytest.approx(np.mean(per_class))
    perfect = bench.fold_metrics(y, onehot.astype(float), classes)
    assert all(perfect[k] == pytest.approx(1.0) for k in bench.METRICS)


def _toy_dataset():
    rng = np.random.default_rng(0)
    y = np.repeat(["x", "y", "z"], 12)
    X = rng.normal(size=(36, 10)).astype(np.float32)
    X[:, 0] += (y == "y") * 2.0
    X[:, 1] += (y == "z") * 2.0
    return bench.Dataset("toy", X, y, None, "toy")


def _lr_factory(c):
    def factory(name, dataset, settings):
        return Pipeline([("clf", LogisticRegression(C=c, max_iter=500))])

    return factory


def test_run_cv_uses_the_same_folds_for_every_model_and_resumes_from_cache(tmp_path):
    ds = _toy_dataset()
    settings = bench.Settings(seed=3)
    kwargs = dict(n_splits=3, n_repeats=2, cache_dir=tmp_path)
    first = bench.run_cv([ds], ["m1", "m2"], settings, model_factory=_lr_factory(1.0), **kwargs)[
        "toy"
    ]
    assert [len(first[m]) for m in ("m1", "m2")] == [6, 6]
    assert not any(r["cached"] for r in first["m1"])
    # same model, same folds -> identical scores
    assert [r["accuracy"] for r in first["m1"]] == [r["accuracy"] for r in first["m2"]]
    files = sorted(p.name for p in (tmp_path / "toy" / "m1").iterdir())
    assert files == [f"r{r}_f{f}.json" for r in range(2) for f in range(3)]

    again = bench.run_cv([ds], ["m1"], settings, model_factory=_lr_factory(1.0), **kwargs)["toy"][
        "m1"
    ]
    assert all(r["cached"] for r in again)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in first["m1"]]

    # another configuration must not reuse the cached folds
    changed = bench.run_cv([ds], ["m1"], settings, model_factory=_lr_factory(1e-3), **kwargs)[
        "toy"
    ]["m1"]
    assert not any(r["cached"] for r in changed)
    # ... and both configurations stay cached side by side (the first keeps its file names)
    for c, expected in ((1.0, first["m1"]), (1e-3, changed)):
        back = bench.run_cv([ds], ["m1"], settings, model_factory=_lr_factory(c), **kwargs)["toy"][
            "m1"
        ]
        assert all(r["cached"] for r in back)
        assert [r["accuracy"] for r in back] == [r["accuracy"] for r in expected]
    files = {p.name for p in (tmp_path / "toy" / "m1").iterdir()}
    plain = {f"r{r}_f{f}.json" for r in range(2) for f in range(3)}
    assert plain <= files and len(files - plain) == 6
    assert all(f.count(".") == 2 for f in files - plain)  # r{r}_f{f}.<key prefix>.json

    summary = bench.summarise({"toy": {"tgem": first["m1"], "lr": changed}})
    test = summary["toy"]["paired"]["tgem vs lr"]["accuracy"]
    diffs = [a["accuracy"] - b["accuracy"] for a, b in zip(first["m1"], changed)]
    expected = bench.nadeau_bengio(diffs, n_train=24, n_test=12)
    assert test["mean"] == pytest.approx(expected["mean"])
    assert summary["toy"]["models"]["tgem"]["n_folds"] == 6


def test_folds_record_their_host_and_mixed_or_loaded_fit_times_are_flagged(tmp_path):
    ds = _toy_dataset()
    recs = bench.run_cv(
        [ds],
        ["m1"],
        bench.Settings(seed=3),
        n_splits=3,
        n_repeats=1,
        cache_dir=tmp_path,
        model_factory=_lr_factory(1.0),
    )["toy"]["m1"]
    host = recs[0]["host"]
    assert host["cores"] == os.cpu_count() and host["cpu"]
    assert host["native_isa"] in (None, "scalar", "avx2", "avx512")
    assert host["load_1min_before"] >= 0 and host["load_1min_after"] >= 0
    # one host, and a load bar this run cannot reach however busy the machine is
    assert bench.fit_time_notes({"toy": {"m1": recs}}, threads=10_000) == {}

    def rec(cpu="EPYC", isa="avx2", load=1.0):
        return {"host": {"cpu": cpu, "native_isa": isa, "load_1min_after": load}}

    notes = bench.fit_time_notes(
        {
            "toy": {
                "same": [rec(), rec()],
                "old": [{}, {}],  # all cached before hosts were recorded: nothing to compare
                "mixed": [rec(), rec(isa="avx512"), {}],
                "loaded": [rec(), rec(load=3.5)],
            }
        },
        threads=2,
    )["toy"]
    assert set(notes) == {"mixed", "loaded"}
    assert "EPYC / avx2 (1)" in notes["mixed"] and "EPYC / avx512 (1)" in notes["mixed"]
    assert "1 fold(s) without a host record" in notes["mixed"]
    assert notes["loaded"] == "1 fold(s) fitted under a 1-min load above 3"

    meta = {
        "datasets": {"toy": ""},
        "command": "c",
        "protocol": "p",
        "machine": bench.machine(),
        "fit_time_notes": {"toy": notes},
    }
    summary = bench.summarise(
        {"toy": {"mixed": [dict(r, repeat=0, fold=0, **_scores()) for r in [rec()]]}}
    )
    md = bench.to_markdown(summary, [], meta)
    assert "Fit times not measured on one quiet machine" in md
    assert "- loaded: 1 fold(s) fitted under a 1-min load above 3" in md


def test_shards_split_the_folds_and_together_fill_the_cache(tmp_path):
    ds = _toy_dataset()
    kwargs = dict(n_splits=3, n_repeats=2, cache_dir=tmp_path, model_factory=_lr_factory(1.0))
    settings = bench.Settings(seed=3)
    parts = [
        bench.run_cv([ds], ["m1"], settings, shard=(i, 2), **kwargs)["toy"]["m1"] for i in range(2)
    ]
    assert [(r["repeat"], r["fold"]) for r in parts[0]] == [(0, 0), (0, 2), (1, 1)]
    assert [(r["repeat"], r["fold"]) for r in parts[1]] == [(0, 1), (1, 0), (1, 2)]
    assert not any(r["cached"] for p in parts for r in p)
    assert parts[0][0]["host"]["torch_threads"] >= 1
    whole = bench.run_cv([ds], ["m1"], settings, **kwargs)["toy"]["m1"]
    assert len(whole) == 6 and all(r["cached"] for r in whole)
    by_fold = {(r["repeat"], r["fold"]): r["accuracy"] for p in parts for r in p}
    assert [by_fold[(r["repeat"], r["fold"])] for r in whole] == [r["accuracy"] for r in whole]
    for bad in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="0 <= i < n"):
            bench.run_cv([ds], ["m1"], settings, shard=bad, **kwargs)
    parser = bench.build_parser()
    assert parser.parse_args(["--shard", "1/3"]).shard == (1, 3)
    for bad in ("3/3", "a/2", "1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--shard", bad])


def test_parallel_single_thread_shards_are_not_flagged_as_loaded_but_as_another_host():
    def rec(threads, load, cores=2):
        return {
            "host": {
                "cpu": "EPYC",
                "native_isa": "avx2",
                "cores": cores,
                "torch_threads": threads,
                "load_1min_after": load,
            }
        }

    notes = bench.fit_time_notes(
        {
            "toy": {
                "shards": [rec(1, 2.2), rec(1, 2.9)],  # two 1-thread shards on 2 cores
                "mixed": [rec(2, 2.1), rec(1, 2.2)],
                "oversubscribed": [rec(1, 4.5)],
            }
        },
        threads=1,
    )["toy"]
    assert set(notes) == {"mixed", "oversubscribed"}
    assert "EPYC / avx2 / 2 thread(s) (1)" in notes["mixed"]
    assert "EPYC / avx2 / 1 thread(s) (1)" in notes["mixed"]
    assert notes["oversubscribed"] == "1 fold(s) fitted under a 1-min load above 3"


def _scores():
    return {
        "n_train": 10,
        "n_test": 5,
        "fit_s": 1.0,
        "predict_s": 0.1,
        **{m: 0.5 for m in bench.METRICS},
    }


def _recs(accs):
    """One record per fold with the given accuracies (other metrics fixed)."""
    return [dict(_scores(), repeat=0, fold=i, accuracy=a) for i, a in enumerate(accs)]


def test_at_a_glance_sets_data_sets_side_by_side_and_counts_verdicts():
    noise = np.array([0.01, -0.02, 0.015, -0.01, 0.02, -0.015])
    summary = bench.summarise(
        {
            "ds1": {
                "tgem": _recs(0.5 + noise),
                "tgem_x": _recs(0.9 - noise),
                "rf": _recs(0.9 + noise[::-1]),
            },
            "ds2": {"tgem": _recs(0.7 + noise), "rf": _recs(0.7 - noise)},
        }
    )
    lines = bench.at_a_glance(summary)
    assert lines[0] == "## At a glance"
    assert "| model | ds1 | ds2 |" in lines
    assert "| tgem_x | 0.900 ± 0.017 | - |" in lines
    # tgem loses clearly on ds1 and ties on ds2; tgem_x vs tgem is not a baseline verdict
    assert "| tgem | 0 / 0 / 1 | 0 / 1 / 0 |" in lines
    assert "| tgem_x | 0 / 1 / 0 | - |" in lines
    assert "| rf |" in "\n".join(lines) and lines.count("| model | ds1 | ds2 |") == 2
    assert bench.at_a_glance({"ds1": summary["ds1"]}) == []
    assert set(summary["ds1"]["paired"]) == {"tgem vs rf", "tgem_x vs rf", "tgem_x vs tgem"}
    meta = {"datasets": {}, "command": "c", "protocol": "p", "machine": bench.machine()}
    md = bench.to_markdown(summary, [], meta)
    assert md.index("## At a glance") < md.index("## ds1")


def test_later_tgem_variants_are_paired_with_earlier_ones():
    noise = np.array([0.01, -0.02, 0.015, -0.01, 0.02, -0.015])
    summary = bench.summarise(
        {
            "ds": {
                "tgem": _recs(0.5 + noise),
                "tgem_a": _recs(0.6 + noise),
                "tgem_b": _recs(0.8 + noise[::-1]),
                "rf": _recs(0.7 + noise),
            }
        }
    )
    paired = summary["ds"]["paired"]
    assert "tgem_b vs tgem_a" in paired and "tgem_a vs tgem_b" not in paired
    assert "tgem vs tgem_a" not in paired and len(paired) == 3 + 2 + 1
    assert paired["tgem_b vs tgem_a"]["accuracy"]["mean"] == pytest.approx(0.2)


def test_split_indices_are_stratified_and_reproducible():
    y = np.repeat(["a", "b"], [10, 5])
    a = bench.split_indices(y, 5, 2, seed=0)
    b = bench.split_indices(y, 5, 2, seed=0)
    assert len(a) == 10
    for (ra, fa, tra, tea), (rb, fb, trb, teb) in zip(a, b):
        assert (ra, fa) == (rb, fb)
        np.testing.assert_array_equal(tea, teb)
        assert sorted(np.unique(y[tea], return_counts=True)[1]) == [1, 2]
    for repeat in range(2):
        tests = np.concatenate([te for r, _, _, te in a if r == repeat])
        np.testing.assert_array_equal(np.sort(tests), np.arange(15))


def test_tgem_fold_on_real_all_data_records_training_facts(tmp_path):
    data_dir = ROOT.parent / "shared" / "data"
    ds = bench.load_dataset("all_mol_biol", data_dir, top_k=40)
    assert ds.X.shape == (126, 12625)
    assert set(np.unique(ds.y)) == {"NEG", "BCR/ABL", "ALL1/AF4", "E2A/PBX1"}
    settings = bench.Settings(
        seed=0, threads=2, tgem_params={"max_epochs": 1, "n_layers": 1, "n_heads": 1}
    )
    model = bench.make_model("tgem", ds, settings)
    assert model.named_steps["top_variance"].k == 40
    ((_, _, tr, te),) = bench.split_indices(ds.y, 5, 1, seed=0)[:1]
    rec = bench.run_fold(model, ds, tr, te, tmp_path / "f.json", key="k")
    assert rec["tgem"]["epochs"] == 1
    assert rec["n_train"] + rec["n_test"] == 126
    assert 0.0 <= rec["accuracy"] <= 1.0
    assert json.loads((tmp_path / "f.json").read_text())["key"] == "k"


def test_tuned_tgem_refits_with_full_settings_after_a_cheap_inner_search():
    ds = _toy_dataset()
    settings = bench.Settings(
        seed=0,
        threads=1,
        grid_folds=2,
        tgem_params={"max_epochs": 2, "n_layers": 1},
        grid_params={"max_epochs": 1},
    )
    model = bench.make_model("tgem_tuned", ds, settings)
    model.set_params(param_grid={"clf__n_heads": [1, 2]})
    model.fit(ds.X, ds.y)
    final = model.best_estimator_.named_steps["clf"]
    assert final.n_iter_ == 2
    assert final.n_heads == model.best_params_["clf__n_heads"]
    assert model.predict_proba(ds.X[:3]).shape == (3, 3)
    assert list(model.classes_) == ["x", "y", "z"]


@pytest.mark.slow
def test_quick_mode_writes_markdown_json_and_figure(tmp_path):
    assert bench.main(["--quick", "--results-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "accuracy.json").read_text())
    models = payload["summary"]["all_mol_biol"]["models"]
    assert set(models) == set(bench.MODELS)
    assert all(row["n_folds"] == 2 for row in models.values())
    assert "tgem vs random_forest" in payload["summary"]["all_mol_biol"]["paired"]
    assert (tmp_path / "accuracy_folds.png").stat().st_size > 0
    assert "| tgem |" in (tmp_path / "accuracy.md").read_text()


def test_tgem_variants_change_only_what_their_names_say():
    ds = _toy_dataset()
    settings = bench.Settings(seed=0, tgem_params={"max_epochs": 10})
    base = bench.make_model("tgem_original", ds, settings).named_steps["clf"].get_params()
    for name, (scaled, params) in bench.VARIANTS.items():
        pipe = bench.make_model(name, ds, settings)
        assert ("scale" in pipe.named_steps) == scaled == ("scaled" in name)
        got = pipe.named_steps["clf"].get_params()
        assert {k for k in got if got[k] != base[k]} == set(params)
        assert ("lr1e-3" in name) == (got["learning_rate"] == 1e-3)
        assert ("_es" in name) == got["early_stopping"]
        assert name.endswith("_uniform") == (got["qk_init_scale"] == 0.0)


def test_citeseq_is_log1p_of_counts_scaled_per_cell(data_dir):
    ds = bench.load_dataset("citeseq", data_dir)
    assert ds.shape == (8617, 500) and ds.top_k is None
    assert len(np.unique(ds.y)) == 13 and {"Mouse", "Unknown"} <= set(ds.y)
    with np.load(data_dir / "citeseq_cbmc.npz", allow_pickle=False) as d:
        counts = d["X"][:5].astype(np.float64)
    # every cell sums to the target once the log is undone (cells with no counts stay 0)
    totals = np.expm1(ds.X[:5].astype(np.float64)).sum(axis=1)
    expected = np.where(counts.sum(axis=1) > 0, bench.CITESEQ_TARGET_SUM, 0.0)
    np.testing.assert_allclose(totals, expected, rtol=1e-4)
    assert "citeseq" not in bench.DATASETS  # hours of fits: only when named
    with pytest.raises(ValueError, match="citeseq"):
        bench.load_dataset("no_such_set", data_dir)


def test_model_key_leaves_out_new_parameters_at_their_01_values():
    from sklearn.preprocessing import StandardScaler

    from tgem import TGEMClassifier

    def key(**params):
        return bench.model_key(
            Pipeline([("s", StandardScaler()), ("clf", TGEMClassifier.original(**params))])
        )

    assert "standardize" not in key() and "qk_init_scale" not in key()
    assert '"clf__standardize": true' in key(standardize=True)
    assert '"clf__qk_init_scale": 10.0' in key(qk_init_scale=10.0)
    assert key() != key(qk_init_scale=10.0) and key() == key(qk_init_scale=1.0)


def test_model_key_does_not_move_with_the_defaults(monkeypatch):
    # a key written before the defaults changed (nested reprs list only non-default values)
    from tgem import TGEMClassifier

    def key():
        return bench.model_key(Pipeline([("clf", TGEMClassifier.original(random_state=0))]))

    before = key()
    kwdefaults = TGEMClassifier.__init__.__kwdefaults__
    monkeypatch.setitem(kwdefaults, "dropout", 0.1)
    assert key() == before
    assert kwdefaults["dropout"] == 0.1  # restored to the (patched) defaults afterwards
    assert "TGEMClassifier(random_state=0)" in before
