"""Checkpoints written by ``fit(..., checkpoint=path)``: the best model of the fit, written at
each improvement, kept through an interrupt, resumable with ``warm_start``, and a failed write
that warns while training goes on."""

import numpy as np
import pytest

from tests._reliability import inject, make_clf, make_data, raising, same_weights
from tgem._io import load
from tgem.exceptions import TrainingInterruptedWarning


def test_checkpoint_holds_the_best_model_of_the_fit(tmp_path):
    X, y = make_data()
    path = tmp_path / "best.tgem"
    clf = make_clf(early_stopping=True, validation_fraction=0.25, max_epochs=4)
    clf.fit(X, y, checkpoint=path)
    best = load(path)
    assert best.best_epoch_ == clf.best_epoch_
    assert [r["epoch"] for r in best.history_] == list(range(1, clf.best_epoch_ + 1))
    assert same_weights(best, clf)  # early stopping restored the best weights
    assert np.array_equal(best.predict_proba(X), clf.predict_proba(X))
    assert "checkpoint" not in clf.get_params()


def test_checkpoint_is_written_at_each_improvement(tmp_path, monkeypatch):
    import tgem._io

    X, y = make_data()
    writes = []
    real_save = tgem._io.save
    monkeypatch.setattr(
        tgem._io, "save", lambda m, p: (writes.append(m.best_epoch_), real_save(m, p))
    )
    clf = make_clf(max_epochs=5).fit(X, y, checkpoint=tmp_path / "c.tgem")
    losses = [r["train_loss"] for r in clf.history_]
    improvements = [
        e for e, loss in enumerate(losses, 1) if loss < min(losses[: e - 1], default=np.inf)
    ]
    assert writes == improvements
    assert load(tmp_path / "c.tgem").best_epoch_ == improvements[-1]


def test_checkpoint_survives_an_interrupt(tmp_path, monkeypatch):
    X, y = make_data()
    path = tmp_path / "c.tgem"
    clf = make_clf(early_stopping=True, validation_fraction=0.25)
    inject(monkeypatch, raising(KeyboardInterrupt()), when=lambda call, x, net: call == 7)
    with pytest.warns(TrainingInterruptedWarning):
        clf.fit(X, y, checkpoint=path)
    monkeypatch.undo()
    assert same_weights(load(path), clf)


def test_warm_start_continues_from_a_loaded_checkpoint(tmp_path):
    X, y = make_data()
    make_clf(max_epochs=2).fit(X, y, checkpoint=tmp_path / "c.tgem")
    resumed = load(tmp_path / "c.tgem").set_params(warm_start=True, max_epochs=2)
    done = len(resumed.history_)
    before = resumed.predict_proba(X)
    resumed.fit(X, y)
    assert [r["epoch"] for r in resumed.history_] == list(range(1, done + 3))
    assert not np.array_equal(resumed.predict_proba(X), before)


def test_a_failed_checkpoint_write_warns_and_training_goes_on(tmp_path, monkeypatch):
    import errno

    import tgem._io

    X, y = make_data()
    path = tmp_path / "c.tgem"
    writes = []

    def full_disk(model, p):
        writes.append(model.best_epoch_)
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    monkeypatch.setattr(tgem._io, "save", full_disk)
    clf = make_clf(max_epochs=3)
    with pytest.warns(
        UserWarning, match=r"c\.tgem.*No space left on device.*training goes on"
    ) as w:
        clf.fit(X, y, checkpoint=path)
    assert clf.n_iter_ == 3 and len(writes) >= 2
    assert sum("checkpoint" in str(r.message) for r in w) == 1  # once per fit, then logged
    assert clf.module_.training is False  # fitted models are in eval mode
    reference = make_clf(max_epochs=3).fit(X, y)  # dropout stayed on after the failed write
    assert same_weights(clf, reference)
