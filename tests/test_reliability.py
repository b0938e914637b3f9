"""Reliability: faults injected into training and prediction, and hostile inputs.

Faults (NaN loss, Ctrl-C, device out-of-memory) are injected by wrapping
``TGEMNet.forward``; every test checks what the model keeps afterwards.
"""

import io
import logging
import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tgem import TGEMClassifier
from tgem._io import load
from tgem._model import TGEMNet
from tgem._training import _accumulate_gradients
from tgem.exceptions import TrainingDivergedError, TrainingInterruptedWarning

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_forward = TGEMNet.forward


def _data(n=32, genes=6, n_classes=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, genes)).astype(np.float32)
    y = np.arange(n) % n_classes
    X[np.arange(n), y % genes] += 2.0
    return X, y


def _clf(**params):
    kw = dict(n_layers=1, n_heads=2, max_epochs=4, batch_size=8, learning_rate=1e-2, random_state=0)
    kw.update(params)
    return TGEMClassifier(**kw)


def _inject(monkeypatch, fault, *, when):
    """Make ``TGEMNet.forward`` raise/return ``fault(x, out)`` when ``when(call, x, net)``."""
    calls = {"train": 0}

    def forward(self, x, return_layers=False):
        if self.training:
            calls["train"] += 1
        if when(calls["train"], x, self):
            return fault(x, _forward(self, x, return_layers))
        return _forward(self, x, return_layers)

    monkeypatch.setattr(TGEMNet, "forward", forward)
    return calls


def _nan(x, out):
    return out * float("nan")


def _raise(exc):
    def fault(x, out):
        raise exc

    return fault


def _same_weights(a, b):
    sa, sb = a.module_.state_dict(), b.module_.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ NaN loss
def test_nan_loss_raises_with_epoch_and_batch_and_keeps_best_weights(monkeypatch):
    X, y = _data()  # 4 batches per epoch: training call 10 is epoch 3, batch 2
    clf = _clf()
    _inject(monkeypatch, _nan, when=lambda call, x, net: net.training and call == 10)
    with pytest.raises(TrainingDivergedError, match=r"epoch 3, batch 2.*learning_rate"):
        clf.fit(X, y)
    monkeypatch.undo()
    assert isinstance(TrainingDivergedError("x"), FloatingPointError)
    assert len(clf.history_) == 2 and clf.best_epoch_ in (1, 2)
    assert clf._train_state_.stopped == "diverged"
    # the weights are those of the best epoch: the same as a fit stopped right there
    reference = _clf(max_epochs=clf.best_epoch_).fit(X, y)
    assert _same_weights(clf, reference)
    assert np.array_equal(clf.predict_proba(X), reference.predict_proba(X))


def test_nan_at_the_first_batch_leaves_the_initial_weights(monkeypatch):
    X, y = _data()
    clf = _clf()
    initial = {}

    def when(call, x, net):
        if not initial:
            initial.update({k: v.clone() for k, v in net.state_dict().items()})
        return net.training

    _inject(monkeypatch, _nan, when=when)
    with pytest.raises(
        TrainingDivergedError, match="epoch 1, batch 1.*weights this fit started from"
    ):
        clf.fit(X, y)
    monkeypatch.undo()
    assert clf.history_ == [] and clf.best_epoch_ is None
    for key, value in clf.module_.state_dict().items():  # no optimizer step was taken
        assert torch.equal(value, initial[key])
    assert np.isfinite(clf.predict_proba(X)).all()


def test_huge_learning_rate_never_leaves_nan_weights():
    X, y = _data()
    X = X * 1e6
    clf = _clf(learning_rate=1e8, max_epochs=3)
    try:
        clf.fit(X, y)
    except TrainingDivergedError as exc:
        assert "learning_rate" in str(exc)
    for value in clf.module_.state_dict().values():
        assert torch.isfinite(value).all()


def _all_finite(clf):
    return all(torch.isfinite(v).all() for v in clf.module_.state_dict().values())


def _diverging(**params):
    # lr 1e38: the epoch's single step (40 samples, batch 40) makes the weights non-finite,
    # and no loss is computed after that step within the epoch (issue 24, item 4)
    return _clf(**{"learning_rate": 1e38, "batch_size": 40, "max_epochs": 1, **params})


def test_weights_diverged_by_the_last_step_of_an_epoch_are_never_kept():
    X, y = _data(n=40)
    clf = _diverging()
    with pytest.raises(TrainingDivergedError, match=r"non-finite.*epoch 1.*learning_rate"):
        clf.fit(X, y)
    assert _all_finite(clf)
    assert clf.best_epoch_ is None
    assert np.isfinite(clf.predict_proba(X)).all()


def test_diverged_weights_with_early_stopping_are_never_kept():
    X, y = _data(n=40)
    clf = _diverging(early_stopping=True, validation_fraction=0.25, batch_size=30)
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        clf.fit(X, y)
    assert _all_finite(clf)
    assert np.isfinite(clf.predict_proba(X)).all()


def test_diverged_weights_never_reach_the_checkpoint(tmp_path):
    X, y = _data(n=40)
    path = tmp_path / "c.tgem"
    clf = _diverging(max_epochs=2)
    with pytest.raises(TrainingDivergedError, match="non-finite") as info:
        clf.fit(X, y, checkpoint=path)
    assert _all_finite(clf)
    if path.exists():  # whatever the error says was kept is what the file holds
        kept = load(path)
        assert _all_finite(kept)
        assert f"epoch {kept.best_epoch_})" in str(info.value)
    else:
        assert "(epoch None)" not in str(info.value)


# ------------------------------------------------------------------ Ctrl-C
def test_keyboard_interrupt_keeps_best_weights_history_and_warns(monkeypatch):
    X, y = _data()
    clf = _clf()
    _inject(monkeypatch, _raise(KeyboardInterrupt()), when=lambda call, x, net: call == 9)
    with pytest.warns(TrainingInterruptedWarning, match="after 2 epoch"):
        clf.fit(X, y)  # returns normally with the best model so far
    monkeypatch.undo()
    assert [r["epoch"] for r in clf.history_] == [1, 2] and clf.n_iter_ == 2
    assert clf._train_state_.stopped == "interrupted"
    reference = _clf(max_epochs=clf.best_epoch_).fit(X, y)
    assert _same_weights(clf, reference)
    assert clf.predict(X).shape == (len(X),)


def test_interrupted_fit_can_be_resumed_with_warm_start(monkeypatch):
    X, y = _data()
    clf = _clf()
    _inject(monkeypatch, _raise(KeyboardInterrupt()), when=lambda call, x, net: call == 9)
    with pytest.warns(TrainingInterruptedWarning):
        clf.fit(X, y)
    monkeypatch.undo()
    clf.set_params(warm_start=True, max_epochs=2).fit(X, y)
    assert [r["epoch"] for r in clf.history_] == [1, 2, 3, 4]


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_holds_the_best_model_of_the_fit(tmp_path):
    X, y = _data()
    path = tmp_path / "best.tgem"
    clf = _clf(early_stopping=True, validation_fraction=0.25, max_epochs=4)
    clf.fit(X, y, checkpoint=path)
    best = load(path)
    assert best.best_epoch_ == clf.best_epoch_
    assert [r["epoch"] for r in best.history_] == list(range(1, clf.best_epoch_ + 1))
    assert _same_weights(best, clf)  # early stopping restored the best weights
    assert np.array_equal(best.predict_proba(X), clf.predict_proba(X))
    assert "checkpoint" not in clf.get_params()


def test_checkpoint_is_written_at_each_improvement(tmp_path, monkeypatch):
    import tgem._io

    X, y = _data()
    writes = []
    real_save = tgem._io.save
    monkeypatch.setattr(
        tgem._io, "save", lambda m, p: (writes.append(m.best_epoch_), real_save(m, p))
    )
    clf = _clf(max_epochs=5).fit(X, y, checkpoint=tmp_path / "c.tgem")
    losses = [r["train_loss"] for r in clf.history_]
    improvements = [
        e for e, loss in enumerate(losses, 1) if loss < min(losses[: e - 1], default=np.inf)
    ]
    assert writes == improvements
    assert load(tmp_path / "c.tgem").best_epoch_ == improvements[-1]


def test_checkpoint_survives_an_interrupt(tmp_path, monkeypatch):
    X, y = _data()
    path = tmp_path / "c.tgem"
    clf = _clf(early_stopping=True, validation_fraction=0.25)
    _inject(monkeypatch, _raise(KeyboardInterrupt()), when=lambda call, x, net: call == 7)
    with pytest.warns(TrainingInterruptedWarning):
        clf.fit(X, y, checkpoint=path)
    monkeypatch.undo()
    assert _same_weights(load(path), clf)


def test_warm_start_continues_from_a_loaded_checkpoint(tmp_path):
    X, y = _data()
    _clf(max_epochs=2).fit(X, y, checkpoint=tmp_path / "c.tgem")
    resumed = load(tmp_path / "c.tgem").set_params(warm_start=True, max_epochs=2)
    done = len(resumed.history_)
    before = resumed.predict_proba(X)
    resumed.fit(X, y)
    assert [r["epoch"] for r in resumed.history_] == list(range(1, done + 3))
    assert not np.array_equal(resumed.predict_proba(X), before)


def test_a_failed_checkpoint_write_warns_and_training_goes_on(tmp_path, monkeypatch):
    import errno

    import tgem._io

    X, y = _data()
    path = tmp_path / "c.tgem"
    writes = []

    def full_disk(model, p):
        writes.append(model.best_epoch_)
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    monkeypatch.setattr(tgem._io, "save", full_disk)
    clf = _clf(max_epochs=3)
    with pytest.warns(
        UserWarning, match=r"c\.tgem.*No space left on device.*training goes on"
    ) as w:
        clf.fit(X, y, checkpoint=path)
    assert clf.n_iter_ == 3 and len(writes) >= 2
    assert sum("checkpoint" in str(r.message) for r in w) == 1  # once per fit, then logged
    assert clf.module_.training is False  # fitted models are in eval mode
    reference = _clf(max_epochs=3).fit(X, y)  # dropout stayed on after the failed write
    assert _same_weights(clf, reference)


# ------------------------------------------------------------------ out of memory
def test_predict_halves_the_batch_on_out_of_memory(monkeypatch, caplog):
    X, y = _data(n=40)
    clf = _clf(max_epochs=1).fit(X, y)
    expected = clf.predict_proba(X)
    sizes = []

    def fault(x, out):
        raise OOM("CUDA out of memory (simulated)")

    calls = _inject(monkeypatch, fault, when=lambda c, x, net: sizes.append(len(x)) or len(x) > 5)
    with caplog.at_level(logging.WARNING, logger="tgem"):
        proba = clf.predict_proba(X)
    assert calls["train"] == 0
    assert sizes[:4] == [40, 20, 10, 5] and max(sizes[4:]) <= 5
    np.testing.assert_allclose(proba, expected, rtol=1e-6, atol=1e-7)
    assert "out of memory" in caplog.text


def test_predict_out_of_memory_even_for_one_sample_is_a_clear_memory_error(monkeypatch):
    X, y = _data()
    clf = _clf(max_epochs=1).fit(X, y)
    _inject(monkeypatch, _raise(OOM("simulated")), when=lambda c, x, net: True)
    with pytest.raises(MemoryError, match="single sample of 6 genes.*batches of 256"):
        clf.predict(X)


def test_training_splits_the_batch_on_out_of_memory(monkeypatch, caplog):
    X, y = _data()
    reference = _clf(dropout=0.0, max_epochs=2).fit(X, y)
    clf = _clf(dropout=0.0, max_epochs=2)
    _inject(
        monkeypatch, _raise(OOM("simulated")), when=lambda c, x, net: net.training and len(x) > 2
    )
    with caplog.at_level(logging.WARNING, logger="tgem"):
        clf.fit(X, y)
    assert "accumulating gradients over 4 parts" in caplog.text
    assert len(clf.history_) == 2
    for key, value in reference.module_.state_dict().items():
        torch.testing.assert_close(clf.module_.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_split_batch_gradient_equals_whole_batch_gradient():
    gen = torch.Generator().manual_seed(0)
    # float64, so the comparison tests the accumulation, not float32 summation order (which
    # put one float32 bias gradient 1.2e-5 apart, relatively, on an AVX-512 Xeon)
    net = TGEMNet(
        n_genes=9, n_classes=3, n_layers=2, n_heads=3, dropout=0.0, generator=gen
    ).double()
    x = torch.randn(13, 9, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=gen)
    w = torch.rand(13, generator=gen, dtype=torch.float64) + 0.1
    grads = []
    for parts in (1, 2, 5, 13):
        net.zero_grad()
        loss, log_proba = _accumulate_gradients(net, x, y, w, parts)
        grads.append((loss, log_proba, [p.grad.clone() for p in net.parameters()]))
    for loss, log_proba, grad in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(log_proba, grads[0][1], rtol=1e-12, atol=1e-12)
        for g, g0 in zip(grad, grads[0][2]):
            torch.testing.assert_close(g, g0, rtol=1e-10, atol=1e-12)


def test_training_out_of_memory_for_one_sample_keeps_best_weights(monkeypatch):
    X, y = _data()
    clf = _clf()
    _inject(monkeypatch, _raise(OOM("simulated")), when=lambda c, x, net: c > 8)
    with pytest.raises(MemoryError, match="single sample of 6 genes.*epoch 3, batch 1"):
        clf.fit(X, y)
    monkeypatch.undo()
    assert clf._train_state_.stopped == "out_of_memory"
    assert _same_weights(clf, _clf(max_epochs=clf.best_epoch_).fit(X, y))


def test_validation_halves_its_batch_on_out_of_memory(monkeypatch):
    X, y = _data(n=48)
    reference = _clf(early_stopping=True, validation_fraction=0.5, max_epochs=2).fit(X, y)
    clf = _clf(early_stopping=True, validation_fraction=0.5, max_epochs=2)
    _inject(
        monkeypatch,
        _raise(OOM("simulated")),
        when=lambda c, x, net: not net.training and len(x) > 3,
    )
    clf.fit(X, y)
    for a, b in zip(clf.history_, reference.history_):
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-5)


# ------------------------------------------------------------------ hostile inputs
@pytest.fixture(scope="module")
def model():
    X, y = _data(n=24, genes=6, n_classes=3)
    frame = pd.DataFrame(X, columns=[f"G{i}" for i in range(6)])
    return _clf(max_epochs=1).fit(X, y), _clf(max_epochs=1).fit(frame, y), X, y


def _unchanged(fn, *arrays):
    """Run ``fn`` and assert that it left every input exactly as it was."""
    copies = [a.copy() for a in arrays]
    try:
        return fn()
    finally:
        for a, c in zip(arrays, copies):
            if isinstance(a, pd.DataFrame):
                pd.testing.assert_frame_equal(a, c)
            elif sp.issparse(a):
                assert (a != c).nnz == 0
            else:
                assert a.dtype == c.dtype
                assert np.array_equal(a, c, equal_nan=a.dtype.kind in "fc")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_in_fit_and_predict(model, value):
    clf, _, X, y = model
    X = X.copy()
    X[2, 3] = value
    with pytest.raises(ValueError, match="NaN|infinity"):
        _unchanged(lambda: _clf().fit(X, y), X, y)
    with pytest.raises(ValueError, match="NaN|infinity"):
        _unchanged(lambda: clf.predict(X), X)


@pytest.mark.parametrize("value", [1e30, -1e30, 1e20, 3e38])
def test_values_too_large_for_float32_products_are_refused(model, value):
    clf, _, X, y = model
    X = X.astype(np.float64)
    X[1, 1] = value
    for call in (lambda: _clf().fit(X, y), lambda: clf.predict_proba(X)):
        with pytest.raises(ValueError, match=r"as large as .*Log-transform"):
            _unchanged(call, X)
    with pytest.raises(ValueError, match="as large as"):
        clf.predict(sp.csr_matrix(X))


def test_constant_genes_and_all_zero_samples_work(model):
    _, _, X, y = model
    X = X.copy()
    X[:, 2] = 3.0  # a constant gene
    X[:, 4] = 0.0  # a gene never expressed
    X[5] = 0.0  # an all-zero sample
    clf = _unchanged(lambda: _clf().fit(X, y), X, y)
    proba = _unchanged(lambda: clf.predict_proba(X), X)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(1), 1)
    everything_constant = np.ones_like(X)
    assert np.isfinite(clf.predict_proba(everything_constant)).all()
    assert np.isfinite(_clf().fit(everything_constant, y).predict_proba(X)).all()


def test_duplicated_gene_names_are_a_clear_error(model):
    _, _, X, y = model
    frame = pd.DataFrame(X, columns=["A", "B", "C", "A", "D", "B"])
    with pytest.raises(ValueError, match=r"2 duplicated column name.*'A', 'B'.*groupby"):
        _unchanged(lambda: _clf().fit(frame, y), frame)
    _, framed, _, _ = model
    with pytest.raises(ValueError, match="duplicated"):
        framed.predict(frame)


def test_non_numeric_columns_are_a_clear_error(model):
    _, framed, X, y = model
    frame = pd.DataFrame(X, columns=[f"G{i}" for i in range(6)])
    frame["G3"] = frame["G3"].astype(object)
    frame.loc[4, "G3"] = "high"
    with pytest.raises(ValueError, match=r"column 'G3' \(dtype object\).*'high'"):
        _unchanged(lambda: _clf().fit(frame, y), frame)
    with pytest.raises(ValueError, match="'G3'"):
        framed.predict(frame)
    text = pd.DataFrame(X, columns=frame.columns).astype({"G1": "string"})
    text.loc[0, "G1"] = "n/a"
    with pytest.raises(ValueError, match=r"column 'G1' \(dtype string\).*'n/a'"):
        _clf().fit(text, y)


def test_numbers_stored_as_objects_or_strings_work(model):
    clf, framed, X, y = model
    as_object = pd.DataFrame(X.astype(object), columns=[f"G{i}" for i in range(6)])
    expected = framed.predict_proba(pd.DataFrame(X, columns=as_object.columns))
    np.testing.assert_allclose(
        _unchanged(lambda: framed.predict_proba(as_object), as_object), expected
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
    fitted = _unchanged(lambda: _clf(max_epochs=1).fit(Xd, y), Xd, y)
    proba = _unchanged(lambda: clf.predict_proba(Xd), Xd)
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
    np.testing.assert_array_equal(_unchanged(lambda: clf.predict_proba(Xl), Xl), expected)
    refit = _unchanged(lambda: _clf(max_epochs=1).fit(Xl, y), Xl, y)
    np.testing.assert_array_equal(refit.predict_proba(X), expected)  # bitwise (dense_batch)


def test_dataframe_input_is_not_modified(model):
    _, framed, X, y = model
    frame = pd.DataFrame(
        X.astype(np.float64),
        columns=[f"G{i}" for i in range(6)],
        index=[f"cell{i}" for i in range(len(X))],
    )
    labels = pd.Series(np.array(["a", "b", "c"])[y], index=frame.index)
    _unchanged(lambda: _clf(max_epochs=1).fit(frame, labels), frame)
    pd.testing.assert_series_equal(
        labels, pd.Series(np.array(["a", "b", "c"])[y], index=frame.index)
    )
    _unchanged(lambda: framed.predict(frame), frame)


def test_one_sample_per_class_works_with_and_without_early_stopping():
    X, y = _data(n=3, n_classes=3)
    assert _clf().fit(X, y).predict(X).shape == (3,)
    with pytest.warns(UserWarning, match="stratified validation split is impossible"):
        clf = _clf(early_stopping=True, validation_fraction=0.34).fit(X, y)
    assert set(clf.predict(X)) <= {0, 1, 2}


def test_two_hundred_classes():
    X, y = _data(n=400, genes=8, n_classes=200)
    labels = np.array([f"type{i:03d}" for i in range(200)])[y]
    clf = _clf(max_epochs=1, batch_size=64).fit(X, labels)
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
    clf = _clf(n_heads=1, max_epochs=1, batch_size=4).fit(X, np.array([0, 1, 0, 1]))
    one = X[:1].copy()
    t0 = time.perf_counter()
    proba = _unchanged(lambda: clf.predict_proba(one), one)
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
    clf = _clf(
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
        proba, predicted = _unchanged(run, X, y)
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


# ------------------------------------------------------------------ gene sets and GMT files
def test_empty_gene_sets_are_a_clear_error():
    from tgem._gene_sets import GeneSetSelector

    frame = pd.DataFrame(np.ones((2, 3)), columns=["CD3E", "LYZ", "MS4A1"])
    for gene_sets, match in [
        ({"T": []}, "gene set 'T' is empty"),
        ({}, "empty mapping"),
        ([], "holds no gene"),
    ]:
        with pytest.raises(ValueError, match=match):
            _unchanged(lambda gs=gene_sets: GeneSetSelector(gs).fit(frame), frame)
    with pytest.raises(ValueError, match="none of the 1 genes"):
        GeneSetSelector({"B": ["CD79A"]}).fit(frame)


@pytest.mark.parametrize(
    "line, match",
    [
        ("ONLY_A_NAME\n", "line 2 is not a GMT gene set"),
        ("NAME\tdescription\n", "line 2 is not a GMT gene set"),
        ("NAME description CD3E CD3D\n", "separated by tabs"),
        ("\tdescription\tCD3E\n", "line 2 is not a GMT gene set"),
        ("T\trepeated name\tCD4\n", "repeats the gene-set name 'T'"),
    ],
)
def test_malformed_gmt_lines_are_a_clear_error(tmp_path, line, match):
    from tgem._gene_sets import GeneSetSelector
    from tgem.datasets import read_gmt

    path = tmp_path / "sets.gmt"
    path.write_text("T\tT cells\tCD3E\tCD3D\n" + line + "B\tB cells\tCD79A\n")
    with pytest.raises(ValueError, match=match):
        read_gmt(path)
    frame = pd.DataFrame(np.ones((2, 2)), columns=["CD3E", "CD79A"])
    with pytest.raises(ValueError, match=match):
        GeneSetSelector(path).fit(frame)


def test_empty_and_missing_gmt_files(tmp_path):
    from tgem.datasets import read_gmt

    (tmp_path / "empty.gmt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no gene set"):
        read_gmt(tmp_path / "empty.gmt")
    with pytest.raises(FileNotFoundError):
        read_gmt(tmp_path / "missing.gmt")
    (tmp_path / "latin1.gmt").write_bytes(b"S\tdesc\tG\xe9NE\n")
    with pytest.raises(ValueError):  # UnicodeDecodeError is a ValueError
        read_gmt(tmp_path / "latin1.gmt")
