"""Training failures: a NaN loss or diverged weights, and Ctrl-C.

Faults are injected by wrapping ``TGEMNet.forward`` (``tests._reliability.inject``); every test
checks what the model keeps afterwards.
"""

import numpy as np
import pytest
import torch

from tests._reliability import inject, make_clf, make_data, nan_output, raising, same_weights
from tgem._io import load
from tgem.exceptions import TrainingDivergedError, TrainingInterruptedWarning


# ------------------------------------------------------------------ NaN loss
def test_nan_loss_raises_with_epoch_and_batch_and_keeps_best_weights(monkeypatch):
    X, y = make_data()  # 4 batches per epoch: training call 10 is epoch 3, batch 2
    clf = make_clf()
    inject(monkeypatch, nan_output, when=lambda call, x, net: net.training and call == 10)
    with pytest.raises(TrainingDivergedError, match=r"epoch 3, batch 2.*learning_rate"):
        clf.fit(X, y)
    monkeypatch.undo()
    assert isinstance(TrainingDivergedError("x"), FloatingPointError)
    assert len(clf.history_) == 2 and clf.best_epoch_ in (1, 2)
    assert clf._train_state_.stopped == "diverged"
    # the weights are those of the best epoch: the same as a fit stopped right there
    reference = make_clf(max_epochs=clf.best_epoch_).fit(X, y)
    assert same_weights(clf, reference)
    assert np.array_equal(clf.predict_proba(X), reference.predict_proba(X))


def test_nan_at_the_first_batch_leaves_the_initial_weights(monkeypatch):
    X, y = make_data()
    clf = make_clf()
    initial = {}

    def when(call, x, net):
        if not initial:
            initial.update({k: v.clone() for k, v in net.state_dict().items()})
        return net.training

    inject(monkeypatch, nan_output, when=when)
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
    X, y = make_data()
    X = X * 1e6
    clf = make_clf(learning_rate=1e8, max_epochs=3)
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
    return make_clf(**{"learning_rate": 1e38, "batch_size": 40, "max_epochs": 1, **params})


def test_weights_diverged_by_the_last_step_of_an_epoch_are_never_kept():
    X, y = make_data(n=40)
    clf = _diverging()
    with pytest.raises(TrainingDivergedError, match=r"non-finite.*epoch 1.*learning_rate"):
        clf.fit(X, y)
    assert _all_finite(clf)
    assert clf.best_epoch_ is None
    assert np.isfinite(clf.predict_proba(X)).all()


def test_diverged_weights_with_early_stopping_are_never_kept():
    X, y = make_data(n=40)
    clf = _diverging(early_stopping=True, validation_fraction=0.25, batch_size=30)
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        clf.fit(X, y)
    assert _all_finite(clf)
    assert np.isfinite(clf.predict_proba(X)).all()


def test_diverged_weights_never_reach_the_checkpoint(tmp_path):
    X, y = make_data(n=40)
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
    X, y = make_data()
    clf = make_clf()
    inject(monkeypatch, raising(KeyboardInterrupt()), when=lambda call, x, net: call == 9)
    with pytest.warns(TrainingInterruptedWarning, match="after 2 epoch"):
        clf.fit(X, y)  # returns normally with the best model so far
    monkeypatch.undo()
    assert [r["epoch"] for r in clf.history_] == [1, 2] and clf.n_iter_ == 2
    assert clf._train_state_.stopped == "interrupted"
    reference = make_clf(max_epochs=clf.best_epoch_).fit(X, y)
    assert same_weights(clf, reference)
    assert clf.predict(X).shape == (len(X),)


def test_interrupted_fit_can_be_resumed_with_warm_start(monkeypatch):
    X, y = make_data()
    clf = make_clf()
    inject(monkeypatch, raising(KeyboardInterrupt()), when=lambda call, x, net: call == 9)
    with pytest.warns(TrainingInterruptedWarning):
        clf.fit(X, y)
    monkeypatch.undo()
    clf.set_params(warm_start=True, max_epochs=2).fit(X, y)
    assert [r["epoch"] for r in clf.history_] == [1, 2, 3, 4]
