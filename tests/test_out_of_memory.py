"""Running out of device memory: training splits its batch and accumulates gradients,
validation and prediction halve their batches, and one sample that still does not fit is a
clear ``MemoryError``.

Out-of-memory errors are injected by wrapping ``TGEMNet.forward``
(``tests._reliability.inject``).
"""

import logging

import numpy as np
import pytest
import torch

from tests._reliability import OOM, inject, make_clf, make_data, raising, same_weights
from tgem._model import TGEMNet
from tgem._training import _accumulate_gradients


def test_predict_halves_the_batch_on_out_of_memory(monkeypatch, caplog):
    X, y = make_data(n=40)
    clf = make_clf(max_epochs=1).fit(X, y)
    expected = clf.predict_proba(X)
    sizes = []

    def fault(x, out):
        raise OOM("CUDA out of memory (simulated)")

    calls = inject(monkeypatch, fault, when=lambda c, x, net: sizes.append(len(x)) or len(x) > 5)
    with caplog.at_level(logging.WARNING, logger="tgem"):
        proba = clf.predict_proba(X)
    assert calls["train"] == 0
    assert sizes[:4] == [40, 20, 10, 5] and max(sizes[4:]) <= 5
    np.testing.assert_allclose(proba, expected, rtol=1e-6, atol=1e-7)
    assert "out of memory" in caplog.text


def test_predict_out_of_memory_even_for_one_sample_is_a_clear_memory_error(monkeypatch):
    X, y = make_data()
    clf = make_clf(max_epochs=1).fit(X, y)
    inject(monkeypatch, raising(OOM("simulated")), when=lambda c, x, net: True)
    with pytest.raises(MemoryError, match="single sample of 6 genes.*batches of 256"):
        clf.predict(X)


def test_training_splits_the_batch_on_out_of_memory(monkeypatch, caplog):
    X, y = make_data()
    reference = make_clf(dropout=0.0, max_epochs=2).fit(X, y)
    clf = make_clf(dropout=0.0, max_epochs=2)
    inject(
        monkeypatch, raising(OOM("simulated")), when=lambda c, x, net: net.training and len(x) > 2
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
    X, y = make_data()
    clf = make_clf()
    inject(monkeypatch, raising(OOM("simulated")), when=lambda c, x, net: c > 8)
    with pytest.raises(MemoryError, match="single sample of 6 genes.*epoch 3, batch 1"):
        clf.fit(X, y)
    monkeypatch.undo()
    assert clf._train_state_.stopped == "out_of_memory"
    assert same_weights(clf, make_clf(max_epochs=clf.best_epoch_).fit(X, y))


def test_validation_halves_its_batch_on_out_of_memory(monkeypatch):
    X, y = make_data(n=48)
    reference = make_clf(early_stopping=True, validation_fraction=0.5, max_epochs=2).fit(X, y)
    clf = make_clf(early_stopping=True, validation_fraction=0.5, max_epochs=2)
    inject(
        monkeypatch,
        raising(OOM("simulated")),
        when=lambda c, x, net: not net.training and len(x) > 3,
    )
    clf.fit(X, y)
    for a, b in zip(clf.history_, reference.history_):
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-5)
