"""Helpers shared by the reliability tests: a small data set and classifier, faults injected
into ``TGEMNet.forward``, and the check that a call leaves its inputs exactly as they were.

Used by ``test_training_failures.py``, ``test_out_of_memory.py``, ``test_checkpoints.py``,
``test_inputs.py`` and ``test_gene_sets.py``.
"""

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from tgem import TGEMClassifier
from tgem._model import TGEMNet

#: What torch raises when a device runs out of memory (``torch.OutOfMemoryError`` since 2.5).
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_forward = TGEMNet.forward


def make_data(n=32, genes=6, n_classes=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, genes)).astype(np.float32)
    y = np.arange(n) % n_classes
    X[np.arange(n), y % genes] += 2.0
    return X, y


def make_clf(**params):
    kw = dict(n_layers=1, n_heads=2, max_epochs=4, batch_size=8, learning_rate=1e-2, random_state=0)
    kw.update(params)
    return TGEMClassifier(**kw)


def inject(monkeypatch, fault, *, when):
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


def nan_output(x, out):
    return out * float("nan")


def raising(exc):
    def fault(x, out):
        raise exc

    return fault


def same_weights(a, b):
    sa, sb = a.module_.state_dict(), b.module_.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def unchanged(fn, *arrays):
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
