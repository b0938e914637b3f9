"""``attention_backend="auto"``: dense native or the native tree code, by gene count and reach."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import tgem._kernels._tree as T
from tgem import TGEMClassifier
from tgem._kernels import _registry, _tree_native, resolve_backend, score_reach
from tgem._kernels._registry import _layer_reach
from tgem._kernels._tree_native import (
    AUTO_GENES_MIN,
    AUTO_GENES_REACH_BASE,
    AUTO_GENES_TREE,
    AUTO_REACH_AT_BASE,
    AUTO_REACH_POWER,
    auto_reach,
)
from tgem._model import TGEMNet

REQUIRE = os.environ.get("TGEM_REQUIRE_NATIVE", "").strip() not in ("", "0")


@pytest.fixture
def native():
    """Skip (or, under TGEM_REQUIRE_NATIVE=1, fail) without the native dense and tree code."""
    reason = _tree_native._unavailable(torch.device("cpu"), torch.float32)
    if reason is not None:
        if REQUIRE:
            pytest.fail(f"TGEM_REQUIRE_NATIVE=1 but {reason}")
        pytest.skip(reason)


needs_native = pytest.mark.usefixtures("native")
LIMIT = AUTO_REACH_AT_BASE  # the reach limit at AUTO_GENES_REACH_BASE genes


def _qkv(genes, reach, batch=2, heads=2, seed=0, dtype=torch.float32):
    """Inputs whose score reach is exactly ``reach``: |q| <= reach, range(k) = 1."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.rand(batch, heads, genes, generator=gen, dtype=torch.float64) * 2 - 1) * reach
    q[..., 0] = reach
    k = torch.rand(batch, heads, genes, generator=gen, dtype=torch.float64)
    k[..., 0], k[..., 1] = 0.0, 1.0
    v = torch.randn(batch, heads, genes, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)]


def _out_and_grads(fn, q, k, v):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------ the rule
def test_rule_is_dense_then_calls_below_a_growing_reach_then_every_call():
    assert auto_reach(1) == auto_reach(AUTO_GENES_MIN - 1) == -math.inf
    assert 0 < auto_reach(AUTO_GENES_MIN) < auto_reach(AUTO_GENES_REACH_BASE) == LIMIT
    assert LIMIT == 2 * T.RHO  # at the base: the calls whose rows are one expansion each
    assert auto_reach(2 * AUTO_GENES_REACH_BASE) == pytest.approx(LIMIT * 2**AUTO_REACH_POWER)
    assert LIMIT < auto_reach(AUTO_GENES_TREE - 1) < math.inf
    assert auto_reach(AUTO_GENES_TREE) == auto_reach(60000) == math.inf
    assert AUTO_GENES_MIN < 765 < 1708 < AUTO_GENES_TREE <= 5000  # the measured rows


def test_score_reach_is_the_largest_rows_max_q_times_range_k():
    q, k, _ = _qkv(50, 3.5)
    assert score_reach(q, k) == pytest.approx(3.5)
    assert score_reach(q * 0, k) == 0.0 and score_reach(q[..., :0], k[..., :0]) == 0.0


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_is_dense_at_small_genes_per_call_in_between_and_tree_at_large(dtype):
    dense = resolve_backend("auto", "cpu", dtype).name  # without a gene count: the dense choice
    assert dense in ("native", "compiled", "exact")
    assert resolve_backend("auto", "cpu", dtype, genes=200).name == dense
    assert resolve_backend("auto", "cpu", dtype, genes=765).name == f"{dense}+tree_native"
    assert resolve_backend("auto", "cpu", dtype, genes=1708).name == f"{dense}+tree_native"
    assert resolve_backend("auto", "cpu", dtype, genes=5000).name == "tree_native"
    assert resolve_backend("auto", "cpu", dtype, genes=22283).name == "tree_native"


@needs_native
def test_auto_binds_the_tolerance_to_the_tree():
    assert resolve_backend("auto", "cpu", genes=22283, tol=1e-4).fn.keywords == {"tol": 1e-4}


def test_auto_stays_dense_without_the_native_extension(monkeypatch):
    monkeypatch.setenv("TGEM_DISABLE_NATIVE", "1")
    for genes in (765, 1708, 22283):
        backend = resolve_backend("auto", "cpu", genes=genes)
        assert backend.name in ("compiled", "exact"), backend.name


def test_auto_never_runs_the_tree_off_the_cpu():
    for genes in (1708, 22283):
        name = resolve_backend("auto", "cuda", genes=genes).name
        assert "tree" not in name and "+" not in name


# ------------------------------------------------------------------------ per call
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_call_choice_switches_at_the_limit_and_equals_the_chosen_backend(dtype):
    genes = AUTO_GENES_REACH_BASE
    auto = resolve_backend("auto", "cpu", dtype, genes=genes)
    dense = resolve_backend("auto", "cpu", dtype)
    tree = resolve_backend("tree_native", "cpu", dtype)
    for reach, chosen in ((0.5, tree), (LIMIT, tree), (LIMIT * 1.001, dense), (300.0, dense)):
        q, k, v = _qkv(genes, reach, dtype=dtype)
        assert score_reach(q, k) == pytest.approx(reach)
        _assert_same(_out_and_grads(auto.fn, q, k, v), _out_and_grads(chosen.fn, q, k, v))


def _net(genes, backend, qk_scale=1.0, tol=None):
    net = TGEMNet(
        n_genes=genes,
        n_classes=3,
        n_layers=2,
        n_heads=2,
        attention_backend=backend,
        generator=torch.Generator().manual_seed(0),
        qk_init_scale=qk_scale,
        dropout=0.0,
        tree_tolerance=tol,
    )
    return net


def _net_out_and_grads(net, x):
    out = net(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    return [out.detach(), *grads]


@needs_native
@pytest.mark.parametrize("qk_scale, chosen", [(1.0, "tree_native"), (300.0, "native")])
def test_the_network_under_auto_equals_the_chosen_backend(qk_scale, chosen):
    genes = 1200
    x = torch.rand(4, genes, generator=torch.Generator().manual_seed(1)) * 4
    auto = _net(genes, "auto", qk_scale)
    with torch.no_grad():
        q, k, _ = auto.layers[0].qkv(x)
    # the first layer's reach decides its call; x300 weights are far past the limit
    assert (score_reach(q, k) <= LIMIT) == (chosen == "tree_native")
    assert auto.backend(x).name == "native+tree_native"
    _assert_same(_net_out_and_grads(auto, x), _net_out_and_grads(_net(genes, chosen, qk_scale), x))


@needs_native
def test_auto_passes_the_networks_tolerance_to_the_tree(monkeypatch):
    seen = []
    parameters = T.tree_parameters

    def spy(dtype, genes, tol=None):
        seen.append(tol)
        return parameters(dtype, genes, tol)

    monkeypatch.setattr(T, "tree_parameters", spy)
    net = _net(AUTO_GENES_TREE, "auto", tol=1e-5)
    net(torch.rand(2, AUTO_GENES_TREE))
    assert seen and set(seen) == {1e-5}


@needs_native
def test_fit_records_the_per_call_choice_and_stays_repeatable():
    rng = np.random.default_rng(0)
    X = rng.random((24, AUTO_GENES_MIN + 100)).astype(np.float32) * 4
    y = np.arange(24) % 2
    kw = dict(n_layers=1, n_heads=2, max_epochs=1, batch_size=8, random_state=0)
    first = TGEMClassifier(**kw).fit(X, y)
    assert first.attention_backend_ == "native+tree_native"
    again = TGEMClassifier(**kw).fit(X, y)
    assert np.array_equal(first.predict_proba(X), again.predict_proba(X))


LAYER_REACHES = {"numpy": _layer_reach, "native": _tree_native.layer_reach}


@pytest.mark.parametrize("how", sorted(LAYER_REACHES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_reach_equals_the_score_reach_of_the_layers_queries_and_keys(how, dtype, request):
    """The per-layer choice computes the reach from x and the weights (in C, or numpy on the
    CPU): exactly score_reach of q = x * WQ and k = x * WK, so it picks what the per-call rule
    does. Gene counts around the C code's vector blocks (16 float32, 8 float64), signs mixed,
    non-finite values propagated as torch's extremes do."""
    if how == "native":
        request.getfixturevalue("native")
    reach = LAYER_REACHES[how]
    gen = torch.Generator().manual_seed(3)
    for genes in (1, 7, 8, 15, 16, 17, 50, 765):
        x = torch.randn(4, genes, generator=gen, dtype=dtype)
        wq, wk = (torch.randn(3, genes, 1, generator=gen, dtype=dtype) * 7 for _ in range(2))
        for case in ("plain", "nan", "inf", "zero", "negative"):
            xc = x.clone()
            if case == "nan":
                xc[2, genes // 2] = math.nan
            elif case == "inf":
                xc[1, -1] = math.inf
            elif case == "zero":
                xc[:] = 0.0
            elif case == "negative":
                xc = -xc.abs()
            xb = xc.unsqueeze(1)
            want = score_reach(xb * wq[..., 0], xb * wk[..., 0])
            got = reach(xc, wq, wk)
            assert got == want or (math.isnan(got) and math.isnan(want)), (genes, case)
            if case == "plain" and genes > 1:
                assert got > 0
    assert reach(x[:0], wq, wk) == 0.0


@needs_native
def test_native_layer_reach_falls_back_where_it_cannot_run():
    """Other dtypes and non-contiguous inputs: the same value, by numpy or by the copy."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    wq, wk = (torch.randn(2, 40, 1, generator=gen, dtype=torch.float64) for _ in range(2))
    want = _layer_reach(x, wq, wk)
    assert _tree_native.layer_reach(x.T.contiguous().T, wq, wk) == want  # not contiguous
    assert _tree_native.layer_reach(x[::2], wq, wk) == _layer_reach(x[::2], wq, wk)
    half = [t.to(torch.float16) for t in (x, wq, wk)]
    assert _tree_native.layer_reach(*half) == _layer_reach(*half)


@needs_native
def test_auto_takes_the_tree_backends_layer_reach(monkeypatch):
    """auto's per-layer choice calls the backend's layer_reach (C), not numpy's."""
    calls = []
    real = _tree_native.layer_reach
    registered = _registry._BACKENDS["tree_native"]
    monkeypatch.setitem(
        _registry._BACKENDS,
        "tree_native",
        replace(registered, layer_reach=lambda *a: calls.append(1) or real(*a)),
    )
    net = TGEMNet(AUTO_GENES_REACH_BASE, 2, n_layers=2, n_heads=2, attention_backend="auto")
    with torch.no_grad():
        net(torch.randn(3, AUTO_GENES_REACH_BASE))
    assert len(calls) == 2  # once per layer
