"""The torch.compile'd exact attention (tgem._kernels._compiled) against the reference formulation.

With ``TGEM_REQUIRE_COMPILE=1`` (CI) a backend that cannot run (no C++ compiler) makes these
tests fail instead of skipping; ``TGEM_DISABLE_COMPILE=1`` (the forced-fallback CI run) skips
them.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._oracle import (
    assert_float32_rms_rule,
    assert_float32_rule,
    attention_and_grads,
    float32_errors,
)
from tgem import TGEMClassifier
from tgem._kernels import _compiled as C
from tgem._kernels import backend_status, exact_attention, reference_attention, resolve_backend

REQUIRE = os.environ.get("TGEM_REQUIRE_COMPILE", "").strip() not in ("", "0")


@pytest.fixture(autouse=True)
def needs_compile():
    reason = C.compiled_unavailable(torch.device("cpu"), torch.float32)
    if reason is not None:
        if REQUIRE and "TGEM_DISABLE_COMPILE" not in reason:
            pytest.fail(f"TGEM_REQUIRE_COMPILE=1 but the compiled backend cannot run: {reason}")
        pytest.skip(reason)


def _qkv(b, h, g, scale=1.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, g, generator=gen, dtype=dtype) * scale for _ in range(3))
    grad = torch.randn(b, h, g, generator=gen, dtype=dtype)
    return q, k, v, grad


def _assert_float64_agreement(q, k, v, grad):
    ref = attention_and_grads(reference_attention, q, k, v, grad)
    got = attention_and_grads(C.compiled_attention, q, k, v, grad)
    for r, e in zip(ref, got):
        assert float((r - e).abs().max()) <= 1e-10 * max(1.0, float(r.abs().max()))


@pytest.mark.parametrize("g", [1, 2, 17, 300])
@pytest.mark.parametrize("scale", [0.1, 8.0])
def test_compiled_matches_reference_in_float64(g, scale):
    _assert_float64_agreement(*_qkv(3, 2, g, scale))


@pytest.mark.parametrize("g", [17, 765])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_compiled_float32_error_within_twice_the_reference_error(g, scale):
    q, k, v, grad = _qkv(16, 5, g, scale=scale, seed=g)
    assert_float32_rule(float32_errors(C.compiled_attention, q, k, v, grad))


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_compiled_float32_rms_error_within_twice_the_reference_error(scale):
    q, k, v, grad = _qkv(16, 5, 765, scale=scale, seed=765)
    assert_float32_rms_rule(C.compiled_attention, q, k, v, grad)


@pytest.mark.slow
def test_compiled_float32_error_at_1708_genes():
    q, k, v, grad = _qkv(4, 5, 1708, scale=0.3, seed=3)
    assert_float32_rule(float32_errors(C.compiled_attention, q, k, v, grad))


def test_compiled_gradcheck_float64():
    q, k, v, _ = _qkv(2, 2, 6, scale=2.0)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(C.compiled_attention, inputs)


def test_compiled_self_peaked_rows_keep_their_precision():
    # the gene with the largest key attends mostly to itself: its diagonal is excluded
    # inside the sums, so the small off-diagonal remainder is not a difference of large terms
    q, k, v, grad = _qkv(2, 3, 40, scale=1.0, seed=5)
    k[..., 7] = 12.0
    q[..., 7] = 3.0
    assert_float32_rule(float32_errors(C.compiled_attention, q, k, v, grad))


def test_compiled_double_backward_raises_clearly():
    q, k, v, _ = _qkv(1, 1, 4)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(C.compiled_attention(q, k, v).sum(), q, create_graph=True)


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    g=st.integers(3, 40),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
    equal=st.booleans(),
)
def test_compiled_matches_reference_property(b, h, g, scale, seed, equal):
    q, k, v, grad = _qkv(b, h, g, scale, seed)
    if equal:  # all-equal inputs: every score of a row is the same
        q, k, v = (t[..., :1].expand_as(t).contiguous() for t in (q, k, v))
    _assert_float64_agreement(q, k, v, grad)
    assert_float32_rule(float32_errors(C.compiled_attention, q, k, v, grad), floor_ulps=64)


def test_auto_picks_compiled_between_native_and_eager(monkeypatch):
    monkeypatch.setenv("TGEM_DISABLE_NATIVE", "1")
    assert resolve_backend("auto", "cpu").name == "compiled"
    monkeypatch.setenv("TGEM_DISABLE_COMPILE", "1")
    assert resolve_backend("auto", "cpu").name == "exact"
    assert backend_status("cpu")["compiled"] == "disabled by TGEM_DISABLE_COMPILE"
    with pytest.raises(ValueError, match="TGEM_DISABLE_COMPILE"):
        resolve_backend("compiled", "cpu")


def _break_compilation(monkeypatch, message, working=()):
    """Make every compiled function except those named in ``working`` raise ``message``."""
    real = C._compiled_fn

    def compiled_fn(name):
        if name in working:
            return real(name)

        def fail(*args):
            raise RuntimeError(message)

        return fail

    monkeypatch.setattr(C, "_compiled_fn", compiled_fn)
    monkeypatch.setattr(C, "_failures", {})


def test_compile_failure_warns_once_and_falls_back_to_the_eager_path(monkeypatch):
    _break_compilation(monkeypatch, "no working C++ compiler (simulated)")
    q, k, v, grad = _qkv(2, 2, 9)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*simulated"):
        got = attention_and_grads(C.compiled_attention, q, k, v, grad)
    want = attention_and_grads(exact_attention, q, k, v, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        C.compiled_attention(q, k, v)
    assert "simulated" in backend_status("cpu")["compiled"]
    assert resolve_backend("auto", "cpu").name != "compiled"


def test_backward_falls_back_when_only_the_backward_fails_to_compile(monkeypatch):
    _break_compilation(monkeypatch, "backward kernel failed (simulated)", working=("forward_rows",))
    q, k, v, grad = _qkv(2, 2, 9)
    with pytest.warns(RuntimeWarning, match="simulated"):
        got = attention_and_grads(C.compiled_attention, q, k, v, grad)
    for r, e in zip(attention_and_grads(reference_attention, q, k, v, grad), got):
        assert float((r - e).abs().max()) <= 1e-10 * max(1.0, float(r.abs().max()))


def test_classifier_fits_on_the_compiled_backend_like_on_the_exact_one():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 12)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    params = dict(
        n_layers=2, n_heads=2, max_epochs=3, learning_rate=1e-2, random_state=0, dropout=0.0
    )
    compiled = TGEMClassifier(attention_backend="compiled", **params).fit(X, y)
    exact = TGEMClassifier(attention_backend="exact", **params).fit(X, y)
    np.testing.assert_allclose(compiled.predict_proba(X), exact.predict_proba(X), atol=1e-4)
