"""The original's preset, today's defaults (pinned) and the 0.1 compatibility of new parameters."""

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone

from tgem import TGEMClassifier, load

COMPAT = Path(__file__).parent / "fixtures" / "compat_0.1"

#: The values of the original T-GEM; a change here must be deliberate.
ORIGINAL = {
    "n_layers": 3,
    "n_heads": 5,
    "activation": "leakyrelu",
    "dropout": 0.3,
    "shared_norm": True,
    "learning_rate": 1e-4,
    "batch_size": 16,
    "max_epochs": 50,
    "weight_decay": 0.0,
    "early_stopping": False,
    "class_weight": None,
    "standardize": False,
    "qk_init_scale": 1.0,
    "importance_baseline": "zeros",
    "calibration": None,
    "tree_tolerance": None,
}

#: Today's defaults, every one of them: changing a default means editing this test.
#: Today's defaults: the original's except where the defaults study changed them (issue 26).
CHANGED_FROM_ORIGINAL = {"standardize": True, "learning_rate": 1e-3, "early_stopping": "auto"}
DEFAULTS = {
    **ORIGINAL,
    **CHANGED_FROM_ORIGINAL,
    "validation_fraction": 0.1,
    "n_iter_no_change": 10,
    "calibration_fraction": 0.1,
    "attention_backend": "auto",
    "device": "auto",
    "n_threads": None,
    "importance_n_samples": 256,
    "warm_start": False,
    "distributed": "auto",
    "random_state": None,
    "verbose": 0,
}


def _fixture_data():
    sys.path.insert(0, str(COMPAT))
    try:
        from make_fixtures import GENES, data
    finally:
        sys.path.remove(str(COMPAT))
    return data(), GENES


def _expected():
    return np.load(COMPAT / "expected.npz", allow_pickle=False)


def test_todays_defaults_are_pinned():
    assert TGEMClassifier().get_params() == DEFAULTS


def test_original_writes_out_every_value_of_the_original():
    clf = TGEMClassifier.original()
    params = clf.get_params()
    assert {k: params[k] for k in ORIGINAL} == ORIGINAL
    assert all(type(params[k]) is type(v) for k, v in ORIGINAL.items())


def test_original_does_not_follow_the_constructor_defaults(monkeypatch):
    # the defaults differ from the original's, and the preset keeps the original's values
    assert TGEMClassifier().standardize is True and TGEMClassifier().learning_rate == 1e-3
    clf = TGEMClassifier.original()
    assert clf.standardize is False and clf.learning_rate == 1e-4
    # whatever the defaults become
    kwdefaults = TGEMClassifier.__init__.__kwdefaults__
    monkeypatch.setitem(kwdefaults, "dropout", 0.1)
    assert TGEMClassifier().dropout == 0.1 and TGEMClassifier.original().dropout == 0.3


def test_original_applies_overrides_and_refuses_unknown_names():
    clf = TGEMClassifier.original(n_layers=2, random_state=0)
    assert clf.n_layers == 2 and clf.random_state == 0 and clf.n_heads == 5
    with pytest.raises(TypeError, match="n_layer"):
        TGEMClassifier.original(n_layer=2)


def _platform() -> dict:
    """What decides the bits of a CPU fit: torch's build and kernels, the native kernel's code."""
    from tgem._kernels import _native

    info = dict(line.split(":", 1) for line in _read_cpuinfo() if ":" in line)
    info = {key.strip(): value.strip() for key, value in info.items()}
    vector_flags = [f for f in info.get("flags", "").split() if f.startswith(("avx", "amx", "fma"))]
    return {
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_isa": _native._active_isa()[0] or "none",
        "cpu_vendor": info.get("vendor_id", "unknown"),
        "cpu_vector_flags": sorted(vector_flags),  # what MKL and oneDNN dispatch on
    }


def _read_cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def test_original_is_bit_identical_to_tgem_0_1_on_the_cpu():
    """Bit for bit where the fixture's bits were reproduced (platform.json: torch's build and
    CPU kernels, the native kernel's instruction set, the CPU's vendor and vector extensions,
    on which MKL and oneDNN pick their code);
    elsewhere the same fit rounds differently (about 4e-7 with AVX2 kernels) and must agree to
    1e-5, far below what a change of the training itself moves (1e-2 and more)."""
    (X, y), genes = _fixture_data()
    clf = TGEMClassifier.original(
        n_layers=2,
        n_heads=2,
        max_epochs=2,
        batch_size=8,
        random_state=0,
        early_stopping=True,
        device="cpu",
    ).fit(X, y)
    expected = _expected()
    proba = clf.predict_proba(pd.DataFrame(expected["X"], columns=genes))
    # expected.npz was written by tgem 0.1.0 (see fixtures/compat_0.1/README.md)
    fixture = json.loads((COMPAT / "platform.json").read_text())["reproduced_bitwise_on"]
    if _platform() == fixture:
        assert np.array_equal(proba, expected["proba"])
    else:
        np.testing.assert_allclose(proba, expected["proba"], rtol=0, atol=1e-5)


def test_a_0_1_pickle_answers_get_params_and_clone_with_0_1_values(monkeypatch):
    # the constructor's defaults must not leak into old pickles when they change
    monkeypatch.setitem(TGEMClassifier.__init__.__kwdefaults__, "standardize", True)
    with open(COMPAT / "model.pkl", "rb") as fh:
        clf = pickle.load(fh)  # tgem's own test file (a pickle runs code when loaded)
    assert b"standardize" not in (COMPAT / "model.pkl").read_bytes()  # written before it
    params = clf.get_params()
    assert params["standardize"] is False and params["qk_init_scale"] == 1.0
    copy = clone(clf)
    assert copy.get_params() == params
    expected = _expected()
    (_, _), genes = _fixture_data()
    proba = clf.predict_proba(pd.DataFrame(expected["X"], columns=genes))
    np.testing.assert_allclose(proba, expected["proba"], rtol=0, atol=1e-6)


def test_a_format_1_file_without_the_new_parameters_loads_with_0_1_values(monkeypatch):
    monkeypatch.setitem(TGEMClassifier.__init__.__kwdefaults__, "standardize", True)
    monkeypatch.setitem(TGEMClassifier.__init__.__kwdefaults__, "qk_init_scale", 10.0)
    clf = load(COMPAT / "model.tgem")
    assert clf.standardize is False and clf.qk_init_scale == 1.0
    assert not clf.module_.standardize
    expected = _expected()
    (_, _), genes = _fixture_data()
    proba = clf.predict_proba(pd.DataFrame(expected["X"], columns=genes))
    np.testing.assert_allclose(proba, expected["proba"], rtol=0, atol=1e-6)
