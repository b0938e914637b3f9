"""Hostile inputs to ``fit``, ``predict`` and ``score``: special values, dtypes, memory
layouts, data frames, degenerate shapes; a property-based test over all of them. Every input
must work or fail with a clear error, and is never modified."""

import io
import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests._reliability import make_clf, make_data, unchanged
from tgem._io import load


# ------------------------------------------------------------------ hostile inputs
@pytest.fixture(scope="module")
def model():
    X, y = make_data(n=24, genes=6, n_classes=3)
    frame = pd.DataFrame(X, columns=[f"G{i}" for i in range(6)])
    return make_clf(max_epochs=1).fit(X, y), make_clf(max_epochs=1).fit(frame, y), X, y


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_in_fit_and_predict(model, value):
    clf, _, X, y = model
    X = X.copy()
    X[2, 3] = value
    with pytest.raises(ValueError, match="NaN|infinity"):
        unchanged(lambda: make_clf().fit(X, y), X, y)
    with pytest.raises(ValueError, match="NaN|infinity"):
        unchanged(lambda: clf.predict(X), X)


@pytest.mark.parametrize("value", [1e30, -1e30, 1e20, 3e38])
def test_values_too_large_for_float32_products_are_refused(model, value):
    clf, _, X, y = model
    X = X.astype(np.float64)
    X[1, 1] = value
    for call in (lambda: make_clf().fit(X, y), lambda: clf.predict_proba(X)):
        with pytest.raises(ValueError, match=r"as large as .*Log-transform"):
            unchanged(call, X)
    with pytest.raises(ValueError, match="as large as"):
        clf.predict(sp.csr_matrix(X))


def test_constant_genes_and_all_zero_samples_work(model):
    _, _, X, y = model
    X = X.copy()
    X[:, 2] = 3.0  # a constant gene
    X[:, 4] = 0.0  # a gene never expressed
    X[5] = 0.0  # an all-zero sample
    clf = unchanged(lambda: make_clf().fit(X, y), X, y)
    proba = unchanged(lambda: clf.predict_proba(X), X)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(1), 1)
    everything_constant = np.ones_like(X)
    assert np.isfinite(clf.predict_proba(everything_constant)).all()
    assert np.isfinite(make_clf().fit(everything_constant, y).predict_proba(X)).all()


def test_duplicated_gene_names_are_a_clear_error(model):
    _, _, X, y = model
    frame = pd.DataFrame(X, columns=["A", "B", "C", "A", "D", "B"])
    with pytest.raises(ValueError, match=r"2 duplicated column name.*'A', 'B'.*groupby"):
        unchanged(lambda: make_clf().fit(frame, y), frame)
    _, framed, _, _ = model
    with pytest.raises(ValueError, match="duplicated"):
        framed.predict(frame)


def test_non_numeric_columns_are_a_clear_error(model):
    _, framed, X, y = model
    frame = pd.DataFrame(X, columns=[f"G{i}" for i in range(6)])
    frame["G3"] = frame["G3"].astype(object)
    frame.loc[4, "G3"] = "high"
    with pytest.raises(ValueError, match=r"column 'G3' \(dtype object\).*'high'"):
        unchanged(lambda: make_clf().fit(frame, y), frame)
    with pytest.raises(ValueError, match="'G3'"):
        framed.predict(frame)
    text = pd.DataFrame(X, columns=frame.columns).astype({"G1": "string"})
    text.loc[0, "G1"] = "n/a"
    with pytest.raises(ValueError, match=r"column 'G1' \(dtype string\).*'n/a'"):
        make_clf().fit(text, y)


def test_numbers_stored_as_objects_or_strings_work(model):
    clf, framed, X, y = model
    as_object = pd.DataFrame(X.astype(object), columns=[f"G{i}" for i in range(6)])
    expected = framed.predict_proba(pd.DataFrame(X, columns=as_object.columns))
    np.testing.assert_allclose(
        unchanged(lambda: framed.predict_proba(as_object), as_object), expected
    )
    np.testing.assert_allclose(clf.predict_proba(X.astype(str)), clf.predict_proba(X), rtol=1e-6)


@pytest.mark.parametrize(
    "dtype", [bool, np.int8, np.int64, np.uint16, np.float16, np.float32, np.float64]
)
def test_bool_int_and_float_dtypes_work(model, dtype):
    clf, _, X, y = model
    kind = np.dtype(dtype).kind
    if kind == "b":
        Xd = X > 0
    elif kind == "u":
        Xd = np.abs(X * 3).astype(dtype)
    else:
        Xd = (X * 3).astype(dtype)
    fitted = unchanged(lambda: make_clf(max_epochs=1).fit(Xd, y), Xd, y)
    proba = unchanged(lambda: clf.predict_proba(Xd), Xd)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba, clf.predict_proba(Xd.astype(np.float32)), rtol=1e-6)
    assert fitted.n_features_in_ == 6


@pytest.mark.parametrize("layout", ["F", "strided", "memmap", "readonly", "csc", "csr"])
def test_memory_layouts_give_the_same_predictions(model, layout, tmp_path):
    clf, _, X, y = model
    if layout == "F":
        Xl = np.asfortranarray(X)
    elif layout == "strided":
        Xl = np.repeat(X, 2, axis=1)[:, ::2]
        assert not Xl.flags.c_contiguous
    elif layout == "memmap":
        mm = np.memmap(tmp_path / "X.dat", dtype=np.float32, mode="w+", shape=X.shape)
        mm[:] = X
        mm.flush()
        Xl = np.memmap(tmp_path / "X.dat", dtype=np.float32, mode="r", shape=X.shape)
    elif layout == "readonly":
        Xl = X.copy()
        Xl.setflags(write=False)
    else:
        Xl = sp.csc_matrix(X) if layout == "csc" else sp.csr_matrix(X)
    expected = clf.predict_proba(X)
    np.testing.assert_array_equal(unchanged(lambda: clf.predict_proba(Xl), Xl), expected)
    refit = unchanged(lambda: make_clf(max_epochs=1).fit(Xl, y), Xl, y)
    np.testing.assert_array_equal(refit.predict_proba(X), expected)  # bitwise (dense_batch)


def test_dataframe_input_is_not_modified(model):
    _, framed, X, y = model
    frame = pd.DataFrame(
        X.astype(np.float64),
        columns=[f"G{i}" for i in range(6)],
        index=[f"cell{i}" for i in range(len(X))],
    )
    labels = pd.Series(np.array(["a", "b", "c"])[y], index=frame.index)
    unchanged(lambda: make_clf(max_epochs=1).fit(frame, labels), frame)
    pd.testing.assert_series_equal(
        labels, pd.Series(np.array(["a", "b", "c"])[y], index=frame.index)
    )
    unchanged(lambda: framed.predict(frame), frame)


def test_one_sample_per_class_works_with_and_without_early_stopping():
    X, y = make_data(n=3, n_classes=3)
    assert make_clf().fit(X, y).predict(X).shape == (3,)
    with pytest.warns(UserWarning, match="stratified validation split is impossible"):
        clf = make_clf(early_stopping=True, validation_fraction=0.34).fit(X, y)
    assert set(clf.predict(X)) <= {0, 1, 2}


def test_two_hundred_classes():
    X, y = make_data(n=400, genes=8, n_classes=200)
    labels = np.array([f"type{i:03d}" for i in range(200)])[y]
    clf = make_clf(max_epochs=1, batch_size=64).fit(X, labels)
    proba = clf.predict_proba(X[:10])
    assert proba.shape == (10, 200)
    np.testing.assert_allclose(proba.sum(1), 1)
    assert set(clf.predict(X)) <= set(labels)


def test_unseen_labels_at_score(model):
    clf, _, X, y = model
    assert clf.score(X, y + 10) == 0.0  # labels the model cannot predict: all wrong
    with pytest.raises(ValueError, match="string labels but the model was fitted on number"):
        clf.score(X, np.array(["x"] * len(X)))


def _wide_fit_and_predict(n_genes):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4, n_genes)).astype(np.float32)
    clf = make_clf(n_heads=1, max_epochs=1, batch_size=4).fit(X, np.array([0, 1, 0, 1]))
    one = X[:1].copy()
    t0 = time.perf_counter()
    proba = unchanged(lambda: clf.predict_proba(one), one)
    return proba, time.perf_counter() - t0


def test_one_sample_with_many_genes_at_predict():
    proba, _ = _wide_fit_and_predict(5_000)
    assert proba.shape == (1, 2) and np.isfinite(proba).all()


@pytest.mark.slow
def test_one_sample_with_fifty_thousand_genes_at_predict():
    proba, seconds = _wide_fit_and_predict(50_000)
    assert proba.shape == (1, 2) and np.isfinite(proba).all()


# ------------------------------------------------------------------ property-based
@settings(
    max_examples=14,
    deadline=None,
    derandomize=True,
    phases=[Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_input_works_or_fails_clearly_and_is_never_modified(data):
    """Random shapes, dtypes, layouts, label types and special values: a working model
    (probabilities sum to 1, bit-for-bit after save/load) or a clear ValueError."""
    n_classes = data.draw(st.integers(2, 4), label="n_classes")
    per_class = data.draw(st.integers(1, 4), label="per_class")
    genes = data.draw(st.integers(1, 9), label="genes")
    dtype = np.dtype(
        data.draw(
            st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.uint8, np.bool_]),
            label="dtype",
        )
    )
    layout = data.draw(
        st.sampled_from(["C", "F", "strided", "frame", "csr", "memmap"]), label="layout"
    )
    scale = data.draw(st.sampled_from([0.0, 1e-30, 1.0, 100.0]), label="scale")
    special = data.draw(
        st.sampled_from(
            [None, "constant_gene", "zero_row", "nan", "inf", "huge"]
            if dtype.kind == "f"
            else [None, "constant_gene", "zero_row"]
        ),
        label="special",
    )
    labels = data.draw(
        st.sampled_from(["int", "str", "float"] + (["bool"] * (n_classes == 2))), label="labels"
    )
    n = n_classes * per_class
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    values = rng.normal(size=(n, genes)) * scale
    if dtype.kind == "u":
        values = np.abs(values)
    X = (values > 0) if dtype.kind == "b" else values.astype(dtype)
    if special == "constant_gene":
        X[:, 0] = 1
    elif special == "zero_row":
        X[0] = 0
    elif special in ("nan", "inf", "huge"):
        with np.errstate(over="ignore"):  # 1e30 is inf in float16: refused either way
            X[n // 2, genes // 2] = {"nan": np.nan, "inf": -np.inf, "huge": 1e30}[special]
    codes = np.arange(n) % n_classes
    y = {
        "int": codes * 7 - 3,
        "str": np.array([f"c{c}" for c in codes]),
        "float": codes * 2.0 + 1,
        "bool": codes == 1,
    }[labels]
    if layout == "F":
        X = np.asfortranarray(X)
    elif layout == "strided":
        X = np.repeat(X, 2, axis=1)[:, ::2]
    elif layout == "frame":
        X = pd.DataFrame(X, columns=[f"g{i}" for i in range(genes)])
    elif layout == "csr" and dtype.kind != "b" and dtype != np.float16:  # scipy has no f16
        X = sp.csr_matrix(X)
    elif layout == "memmap":
        X = np.lib.stride_tricks.as_strided(X)  # a view; then frozen like a read-only memmap
        X.setflags(write=False)
    clf = make_clf(
        n_layers=data.draw(st.integers(1, 2), label="n_layers"),
        max_epochs=1,
        activation=data.draw(st.sampled_from([None, "relu", "leakyrelu", "gelu"])),
        shared_norm=data.draw(st.booleans()),
    )
    expect_error = special in ("nan", "inf", "huge")

    def run():
        clf.fit(X, y)
        return clf.predict_proba(X), clf.predict(X)

    try:
        proba, predicted = unchanged(run, X, y)
    except ValueError as exc:
        assert expect_error, f"unexpected error: {exc}"
        assert any(w in str(exc) for w in ("NaN", "infinity", "as large as")), str(exc)
        return
    assert not expect_error
    assert np.isfinite(proba).all() and proba.shape == (n, n_classes)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-6)
    assert np.array_equal(predicted, clf.classes_[np.argmax(proba, axis=1)])
    assert clf.classes_.dtype == np.unique(y).dtype
    buffer = io.BytesIO()
    clf.save(buffer)
    loaded = load(io.BytesIO(buffer.getvalue()))
    assert np.array_equal(loaded.predict_proba(X), proba)
    assert np.array_equal(loaded.classes_, clf.classes_)
    assert loaded.classes_.dtype == clf.classes_.dtype
