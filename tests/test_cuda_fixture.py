"""A model fitted on a CUDA GPU (``tests/fixtures/``) loads and predicts on a CPU-only machine.

The fixture was written by ``tests/fixtures/make_cuda_fixture.py`` on an NVIDIA GPU with the
Triton attention (the model in tgem's safe format, the expected outputs as plain ``.npz``
arrays; no pickle); this test needs no GPU. The probabilities must match the GPU's to 1e-4:
the same weights through the CPU's exact path differ only by float32 rounding (the log-
probabilities of the two paths agree to ~1e-5), far below any real change of the model.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tgem

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def fixture():
    expected = np.load(FIXTURES / "cuda_model_expected.npz", allow_pickle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf = tgem.load(FIXTURES / "cuda_model.tgem")
    return clf, expected, caught


def test_fixture_was_fitted_on_cuda_with_triton(fixture):
    clf, expected, _ = fixture
    info = json.loads(str(expected["info"]))
    assert info["attention_backend_"] == clf.attention_backend_ == "triton"
    assert "NVIDIA" in info["gpu"] or "H100" in info["gpu"]


def test_fixtures_hold_no_pickle():
    assert not [p.name for p in FIXTURES.iterdir() if p.suffix in (".joblib", ".pkl", ".pickle")]
    for path in FIXTURES.glob("cuda_model*"):
        if path.suffix != ".py":
            assert path.read_bytes()[:4] == b"PK\x03\x04", path  # ZIP: .tgem and .npz


def test_cuda_model_loads_on_cpu_with_device_warning(fixture):
    from tgem.exceptions import DeviceWarning

    clf, _, caught = fixture
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the model stays on it")
    assert any(issubclass(w.category, DeviceWarning) for w in caught)
    assert clf.device_.type == "cpu"
    assert next(clf.module_.parameters()).device.type == "cpu"


def test_cuda_model_predicts_on_cpu_like_on_gpu(fixture):
    from tgem.datasets import load_pbmc68k

    clf, expected, _ = fixture
    X, _ = load_pbmc68k(return_X_y=True)
    X = np.asarray(X, dtype=np.float32)[expected["test_rows"]]
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba, expected["proba"], atol=1e-4)
    top2 = np.sort(expected["proba"], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3  # ties within rounding may flip
    assert np.array_equal(clf.predict(X)[clear], expected["predictions"][clear])
