"""GPU tests: the compiled Triton kernels and ``TGEMClassifier(device="cuda")`` end to end.

All marked ``cuda`` (deselected by default; run with ``pytest -m cuda``). Without a GPU they
skip, or fail when ``TGEM_REQUIRE_CUDA=1``. Tolerances follow ``tests/test_triton.py``: the
kernel's float32 error against float64 is at most twice the plain float32 formulation's own
error (for dq and dk: of the larger of that and the pure-PyTorch exact path's, which uses the
same algebra), plus a floor of 64 float32 ulps of the largest value (different summation
order over the tiles; any wrong term is off by about 1/G of the scale instead).
"""

import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.cuda
EPS32 = float(torch.finfo(torch.float32).eps)
FLOOR_ULPS = 64


@pytest.fixture(scope="module", autouse=True)
def gpu():
    reason = None
    if not torch.cuda.is_available():
        reason = f"torch {torch.__version__} sees no CUDA GPU"
    else:
        from tgem._kernels._triton import triton_unavailable

        reason = triton_unavailable(torch.device("cuda"), torch.float32)
    if reason is not None:
        if os.environ.get("TGEM_REQUIRE_CUDA") == "1":
            pytest.fail(f"TGEM_REQUIRE_CUDA=1 but the Triton GPU path cannot run: {reason}")
        pytest.skip(reason)
    return torch.device("cuda")


def _grads(fn, inputs, upstream):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    return [out.detach(), *torch.autograd.grad(out, xs, upstream.to(out.dtype))]


@pytest.mark.parametrize("genes", [17, 765, 1708])
def test_kernels_match_reference_on_gpu(gpu, genes):
    from tgem._kernels import exact_attention, reference_attention
    from tgem._kernels._triton import triton_attention

    gen = torch.Generator(device=gpu).manual_seed(genes)
    shape = (3, 2, genes) if genes < 1000 else (2, 2, genes)
    # expression-like inputs times Xavier-like weights, and a sharper unit-normal set
    q, k, v = (torch.randn(shape, generator=gen, device=gpu) for _ in range(3))
    upstream = torch.randn(shape, generator=gen, device=gpu)
    exact = _grads(reference_attention, [x.double() for x in (q, k, v)], upstream.double())
    ref32 = _grads(reference_attention, [q, k, v], upstream)
    path32 = _grads(exact_attention, [q, k, v], upstream)
    kernel = _grads(triton_attention, [q, k, v], upstream)
    for what, e64, r32, p32, kern in zip(("out", "dq", "dk", "dv"), exact, ref32, path32, kernel):
        assert torch.isfinite(kern).all(), what
        err = (kern.double() - e64).abs().max().item()
        base = (r32.double() - e64).abs().max().item()
        if what in ("dq", "dk"):
            base = max(base, (p32.double() - e64).abs().max().item())
        bound = 2 * base + FLOOR_ULPS * EPS32 * e64.abs().max().item()
        assert err <= bound, f"G={genes} {what}: error {err:.3g} > {bound:.3g}"


def test_inference_forward_equals_training_forward(gpu):
    from tgem._kernels._triton import triton_attention

    q, k, v = torch.randn(3, 4, 5, 301, device=gpu).unbind(0)
    with torch.no_grad():
        plain = triton_attention(q, k, v)
    trained = triton_attention(q.requires_grad_(), k, v)
    torch.testing.assert_close(plain, trained.detach(), rtol=1e-6, atol=1e-7)


def test_every_output_element_is_written(gpu, monkeypatch):
    from tgem._kernels import _triton as m

    monkeypatch.setattr(m, "_empty", lambda x: torch.full_like(x, float("nan")))
    q, k, v = (torch.randn(2, 3, 131, device=gpu, requires_grad=True) for _ in range(3))
    out = m.triton_attention(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in (out, *grads))


def test_auto_backend_on_cuda_is_triton(gpu):
    from tgem._kernels import resolve_backend

    assert resolve_backend("auto", gpu, torch.float32).name == "triton"
    assert resolve_backend("auto", gpu, torch.float64).name != "triton"


def _pbmc(n=300, seed=0):
    from tgem.datasets import load_pbmc68k

    X, y = load_pbmc68k(return_X_y=True)
    X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
    idx = np.random.default_rng(seed).permutation(len(y))[:n]
    return X[idx], y[idx]


def test_classifier_fits_and_predicts_on_cuda(gpu):
    import copy

    from tgem import TGEMClassifier

    X, y = _pbmc()
    clf = TGEMClassifier(
        device="cuda",
        n_layers=2,
        n_heads=3,
        dropout=0.0,
        learning_rate=1e-3,
        max_epochs=3,
        batch_size=32,
        random_state=0,
    ).fit(X, y)
    assert clf.device_.type == "cuda"
    assert clf.attention_backend_ == "triton"
    assert next(clf.module_.parameters()).is_cuda
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert clf.score(X, y) > np.mean(y == "Dendritic")  # beats the majority class
    # the same weights on the CPU, through the pure-PyTorch exact path
    module = copy.deepcopy(clf.module_).cpu()
    module.attention_backend = "exact"
    with torch.no_grad():
        cpu_log = module(torch.from_numpy(X)).double().numpy()
    np.testing.assert_allclose(
        clf.predict_log_proba(X),
        cpu_log - np.logaddexp.reduce(cpu_log, axis=1, keepdims=True),
        atol=1e-4,
    )


def test_fit_on_cuda_matches_fit_on_cpu(gpu):
    from tgem import TGEMClassifier

    X, y = _pbmc(150)
    X = X[:, :200]
    params = dict(
        n_layers=2,
        n_heads=2,
        dropout=0.0,
        learning_rate=1e-3,
        max_epochs=2,
        batch_size=16,
        random_state=0,
    )
    gpu_clf = TGEMClassifier(device="cuda", **params).fit(X, y)
    cpu_clf = TGEMClassifier(device="cpu", attention_backend="exact", **params).fit(X, y)
    # same seed, no dropout: the two fits differ only by float32 rounding
    assert np.abs(gpu_clf.predict_proba(X) - cpu_clf.predict_proba(X)).max() < 1e-3
    assert np.mean(gpu_clf.predict(X) == cpu_clf.predict(X)) >= 0.98


def test_classifier_analysis_runs_on_cuda(gpu):
    from tgem import TGEMClassifier

    X, y = _pbmc(120)
    clf = TGEMClassifier(
        device="cuda", n_layers=1, n_heads=2, max_epochs=1, importance_n_samples=20, random_state=0
    ).fit(X, y)
    entropy = clf.attention_entropy(X[:10])
    assert entropy.shape == (1, 2) and np.all(np.isfinite(entropy))
    importances = clf.feature_importances_
    assert importances.shape == (X.shape[1],)
    assert np.isclose(importances.sum(), 1.0)
