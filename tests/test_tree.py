"""The tree-code attention (tgem._kernels._tree) against the plain reference formulation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tgem._kernels._tree as T
from tests._oracle import (
    assert_float32_rms_rule,
    assert_float32_rule,
    attention_and_grads,
    float32_errors,
)
from tgem._kernels import (
    attention_entropy_rows,
    exact_attention,
    reference_attention,
    resolve_backend,
)
from tgem._kernels._tree import tree_attention, tree_entropy_rows, tree_parameters

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SCALES = [0.01, 1.0, 30.0, 1000.0]


def _qkv(b, h, g, scale=1.0, seed=0, dtype=torch.float64, zeros=0.0):
    """(q, k, v, upstream gradient); ``scale`` multiplies q and k (the score scale)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, b, h, g, generator=gen, dtype=dtype)
    if zeros:  # unexpressed genes: q = k = v = 0
        x = x * (torch.rand(b, 1, g, generator=gen) >= zeros).to(dtype)
    q, k, v = x[0] * scale, x[1] * scale, x[2]
    grad = torch.randn(b, h, g, generator=gen, dtype=dtype)
    return q, k, v, grad


def _assert_float64_close(fn, q, k, v, grad, tol=1e-10):
    """Output and gradients within ``tol`` of the reference's largest entry (at least 1)."""
    ref = attention_and_grads(reference_attention, q, k, v, grad)
    got = attention_and_grads(fn, q, k, v, grad)
    for name, r, e in zip(("out", "dq", "dk", "dv"), ref, got):
        assert torch.isfinite(e).all(), name
        err = float((r - e).abs().max())
        assert err <= tol * max(1.0, float(r.abs().max())), f"{name}: error {err:.3g}"


@pytest.fixture
def spy(monkeypatch):
    """Counts the rows that go through the root expansion and through the tree."""
    calls = {"root": 0, "tree": 0}

    def wrap(name, fn):
        def counted(points, *args):
            calls[name] += points.shape[0]
            return fn(points, *args)

        return counted

    monkeypatch.setattr(T, "_root_expansion", wrap("root", T._root_expansion))
    monkeypatch.setattr(T, "_tree_sums", wrap("tree", T._tree_sums))
    return calls


# ------------------------------------------------------------------------ float64
@pytest.mark.parametrize("g", [1, 2, 3, 17, 300])
@pytest.mark.parametrize("scale", SCALES)
def test_tree_matches_reference_in_float64(g, scale):
    _assert_float64_close(tree_attention, *_qkv(3, 2, g, scale))


def test_tree_gradcheck():
    for scale in (0.3, 8.0):  # root expansion only; through the tree
        q, k, v, _ = _qkv(1, 1, 40, scale, seed=3)
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        assert torch.autograd.gradcheck(tree_attention, leaves, eps=1e-6, atol=1e-7)


def test_sharp_attention_runs_through_the_tree_and_small_scores_do_not(spy):
    q, k, v, grad = _qkv(2, 2, 300, 30.0)
    attention_and_grads(tree_attention, q, k, v, grad)
    assert spy["tree"] > 0 and spy["root"] == 0
    spy["tree"] = 0
    q, k, v, grad = _qkv(2, 2, 300, 0.01)
    attention_and_grads(tree_attention, q, k, v, grad)
    assert spy["tree"] == 0 and spy["root"] > 0


def test_the_tree_descends_to_expansions_and_leaves(monkeypatch):
    """At 5,000 genes and large scores the traversal skips, expands and sums leaves."""
    seen = {"expand": 0, "direct": 0}
    expand = T._expand

    def counted_expand(moments, *args):
        seen["expand"] += moments.shape[0]
        return expand(moments, *args)

    monkeypatch.setattr(T, "_expand", counted_expand)
    q, k, v, grad = _qkv(1, 1, 5000, 3.0, seed=1)
    _assert_float64_close(tree_attention, q, k, v, grad)
    assert seen["expand"] > 0
    levels, leaf_d, _, depth = T._build(k.reshape(1, -1), v.reshape(1, -1, 1), 5)
    assert depth >= 5 and leaf_d.shape[1] <= T.LEAF
    torch.testing.assert_close(levels[0].moments[:, 0, 0], v.sum().reshape(1))


def test_tree_stops_at_the_level_its_targets_need():
    points = torch.linspace(0.0, 1.0, 1024, dtype=torch.float64)[None]
    weights = torch.ones(1, 1024, 1, dtype=torch.float64)
    full = T._build(points, weights, 5)
    assert full[3] == 5  # 32 leaves of 32 points
    levels, nodes_d, _, depth = T._build(points, weights, 5, torch.tensor([16.0]), rho=4.0)
    assert depth == 1 and nodes_d.shape == (2, 512)  # radius 0.25 x 16 = 4
    for a, b in zip(levels, full[0]):
        torch.testing.assert_close(a.moments, b.moments)
    q = torch.linspace(-16.0, 16.0, 1024, dtype=torch.float64)[None]
    grad = torch.ones_like(q)
    _assert_float64_close(tree_attention, q, points, torch.cos(7 * points), grad)


def test_row_chunks_do_not_change_the_result(monkeypatch):
    q, k, v, grad = _qkv(4, 3, 200, 20.0)
    full = attention_and_grads(tree_attention, q, k, v, grad)
    monkeypatch.setattr(T, "TARGET_BUDGET", 1)  # one row per chunk
    chunked = attention_and_grads(tree_attention, q, k, v, grad)
    for a, b in zip(full, chunked):
        assert torch.equal(a, b)


def test_results_do_not_depend_on_thread_count():
    q, k, v, grad = _qkv(4, 5, 300, 30.0, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(attention_and_grads(tree_attention, q, k, v, grad))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(
    g=st.integers(1, 80),
    rows=st.integers(1, 4),
    log_scale=st.floats(-2.0, 3.0),
    zeros=st.sampled_from([0.0, 0.6]),
    seed=st.integers(0, 2**16),
)
def test_tree_property_matches_reference(g, rows, log_scale, zeros, seed):
    q, k, v, grad = _qkv(rows, 1, g, 10.0**log_scale, seed=seed, zeros=zeros)
    _assert_float64_close(tree_attention, q, k, v, grad)


# ------------------------------------------------------------------------ float32
@pytest.mark.parametrize("g", [17, 300])
@pytest.mark.parametrize("scale", SCALES)
def test_tree_float32_rule(g, scale):
    q, k, v, grad = _qkv(4, 5, g, scale)
    assert_float32_rule(float32_errors(tree_attention, q, k, v, grad))


@pytest.mark.parametrize("scale", [0.05, 0.5, 3.0])
def test_tree_float32_rms_error_within_twice_the_reference_error(scale):
    q, k, v, grad = _qkv(4, 5, 765, scale, seed=765)
    assert_float32_rms_rule(tree_attention, q, k, v, grad)


def test_float32_result_keeps_dtype_and_shape():
    q, k, v, _ = _qkv(2, 3, 40, 2.0, dtype=torch.float32)
    out = tree_attention(q, k, v)
    assert out.dtype == torch.float32 and out.shape == q.shape
    flat = tree_attention(q.reshape(6, 40), k.reshape(6, 40), v.reshape(6, 40))
    assert torch.equal(flat, out.reshape(6, 40))


# ------------------------------------------------------------------------ hostile numerics
def test_uniform_softmax_gives_exact_mean():
    q = k = v = torch.ones(1, 1, 17)
    out = tree_attention(q, k, v)
    torch.testing.assert_close(out, torch.full_like(out, 16 / 17), rtol=1e-7, atol=0)


@pytest.mark.parametrize("g", [1, 2, 3, 50])
def test_all_keys_equal(g):
    q, _, v, grad = _qkv(2, 2, g, 100.0)
    k = torch.full_like(q, 3.7)
    _assert_float64_close(tree_attention, q, k, v, grad)


@pytest.mark.parametrize("scale", [1.0, 500.0])
def test_many_zero_genes(scale):
    q, k, v, grad = _qkv(3, 2, 400, scale, zeros=0.8)
    _assert_float64_close(tree_attention, q, k, v, grad)
    assert_float32_rule(float32_errors(tree_attention, q, k, v, grad))


def test_softmax_peaked_on_the_gene_itself():
    """The own entry holds all the mass: the result is the tiny rest, not a cancellation."""
    q = torch.tensor([[50.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0, -0.1, 0.2]], dtype=torch.float64)
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    grad = torch.ones_like(q)
    _assert_float64_close(tree_attention, q, k, v, grad, tol=1e-12)


def test_scores_in_the_thousands_and_float32_extremes():
    q, k, v, grad = _qkv(2, 2, 300, 3000.0, seed=5)
    _assert_float64_close(tree_attention, q, k, v, grad)
    # float32 inputs whose products overflow float32: the reference gives nan, the tree code
    # (which sums in float64) the float64 reference's result
    big = torch.tensor([[3e19, -2e19, 1e19, 5.0]])
    out = tree_attention(big, big, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    expected = reference_attention(
        big.double(), big.double(), torch.tensor([[1.0, 2, 3, 4]]).double()
    )
    assert torch.isnan(reference_attention(big, big, big)).any()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    tiny = torch.full((1, 1, 9), 1e-40)  # subnormal inputs: a uniform softmax
    out = tree_attention(tiny, tiny, torch.ones_like(tiny))
    torch.testing.assert_close(out, torch.full_like(out, 8 / 9))


def test_results_hold_no_subnormals():
    q, k, v, grad = _qkv(2, 2, 200, 300.0, dtype=torch.float32)
    for x in attention_and_grads(tree_attention, q, k, v * 1e-30, grad):
        nonzero = x[x != 0].abs()
        assert (nonzero >= torch.finfo(torch.float32).tiny).all()


def test_non_finite_inputs_raise():
    q, k, v, _ = _qkv(1, 1, 5)
    q[0, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite"):
        tree_attention(q, k, v)


def test_half_precision_and_mismatched_inputs_raise():
    q = torch.ones(1, 1, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"float16.*\.float\(\)"):
        tree_attention(q, q, q)
    with pytest.raises(ValueError, match="share shape"):
        tree_attention(torch.ones(1, 4), torch.ones(1, 5), torch.ones(1, 4))
    with pytest.raises(ValueError, match="genes"):
        tree_attention(torch.ones(1, 0), torch.ones(1, 0), torch.ones(1, 0))


def test_inputs_are_not_modified():
    q, k, v, grad = _qkv(2, 2, 100, 30.0, dtype=torch.float32)
    before = [t.clone() for t in (q, k, v, grad)]
    attention_and_grads(tree_attention, q, k, v, grad)
    tree_attention(q, k, v)
    for a, b in zip(before, (q, k, v, grad)):
        assert torch.equal(a, b)


def test_double_backward_is_refused():
    q, k, v, _ = _qkv(1, 1, 6)
    q.requires_grad_(True)
    out = tree_attention(q, k, v)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


# ------------------------------------------------------------------------ tolerance
def test_tolerance_sets_order_and_bounds_the_error():
    assert tree_parameters(torch.float32, 1000).order == 28
    assert tree_parameters(torch.float64, 1000).order == 33
    assert tree_parameters(torch.float64, 1000, 1e-4).order < 28
    for tol in (1e-9, 1e-13):
        assert T.expansion_bound(tree_parameters(torch.float64, 10, tol).order) <= tol
    q, k, v, grad = _qkv(2, 2, 300, 10.0, seed=2)
    ref = reference_attention(q, k, v)
    for tol in (1e-3, 1e-6):
        err = float((tree_attention(q, k, v, tol=tol) - ref).abs().max())
        assert err <= 2 * tol * float(v.abs().max())


@pytest.mark.parametrize("tol", [0.0, -1.0, 0.5, float("nan"), "tight"])
def test_tolerance_out_of_range_raises(tol):
    q, k, v, _ = _qkv(1, 1, 5)
    with pytest.raises(ValueError, match="tree_tol"):
        tree_attention(q, k, v, tol=tol)


# ------------------------------------------------------------------------ entropy, backend
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("g", [1, 2, 300])
def test_entropy_matches_the_exact_paths_entropy(scale, g):
    q, k, _, _ = _qkv(2, 3, g, scale, zeros=0.3)
    expected = attention_entropy_rows(q, k)
    got = tree_entropy_rows(q, k)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    q32, k32 = q.float(), k.float()
    got32 = tree_entropy_rows(q32, k32)
    assert got32.dtype == torch.float32
    expected32 = attention_entropy_rows(q32.double(), k32.double())  # of the rounded inputs
    torch.testing.assert_close(got32.double(), expected32, rtol=0, atol=1e-6)


def test_tree_backend_is_registered_but_not_autos_choice():
    backend = resolve_backend("tree", "cpu", torch.float64)
    assert backend.fn is tree_attention
    for genes in (None, 765, 1708, 22283):  # auto's tree is the native one, never this
        name = resolve_backend("auto", "cpu", torch.float64, genes=genes).name
        assert "tree" not in name.split("+")
    with pytest.raises(ValueError, match="float32 and float64 only"):
        resolve_backend("tree", "cpu", torch.float16)


# ------------------------------------------------------------------------ real models, large G
def _trained_qkv(path: Path, pbmc):
    """q, k, v of every layer of a saved model on 4 PBMC cells (captured from exact)."""
    import tgem
    from tgem._kernels import _registry

    clf = tgem.load(path)
    captured = []

    def capture(q, k, v):
        captured.append((q.detach().double(), k.detach().double(), v.detach().double()))
        return exact_attention(q, k, v)

    _registry.register_backend(_registry.Backend("_capture", capture, lambda d, t: None))
    try:
        clf.module_.attention_backend = "_capture"
        clf.predict_proba(pbmc[0][:4])
    finally:
        _registry._BACKENDS.pop("_capture", None)
    return captured


@pytest.mark.filterwarnings("ignore:X does not have valid feature names")
@pytest.mark.parametrize("name", ["attention_pbmc", "attention_pbmc_scaled"])
def test_trained_pbmc_models(name, pbmc):
    path = RESULTS / name / "model.tgem"
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    layers = _trained_qkv(path, pbmc)
    assert layers
    gen = torch.Generator().manual_seed(0)
    for q, k, v in layers:
        grad = torch.randn(q.shape, generator=gen, dtype=torch.float64)
        _assert_float64_close(tree_attention, q, k, v, grad)
        assert_float32_rms_rule(tree_attention, q, k, v, grad)


@pytest.mark.slow
@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("genes", [22283, 60000])
def test_tree_at_whole_transcriptome_sizes_against_float64_exact(genes, scale):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 1, genes, generator=gen, dtype=torch.float64).abs() * 2
    w = torch.randn(3, 1, genes, generator=gen, dtype=torch.float64) * math.sqrt(2 / genes)
    q, k, v = x * w[0] * scale, x * w[1] * scale, x * w[2]
    grad = torch.randn(1, 1, genes, generator=gen, dtype=torch.float64)
    ref = attention_and_grads(exact_attention, q, k, v, grad)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        got = attention_and_grads(tree_attention, q.to(dtype), k.to(dtype), v.to(dtype), grad)
        for name, r, e in zip(("out", "dq", "dk", "dv"), ref, got):
            err = float((r - e.double()).abs().max())
            assert err <= tol * max(1.0, float(r.abs().max())), f"{dtype} {name}: {err:.3g}"
    assert np.isfinite(float(tree_entropy_rows(q, k).sum()))


@pytest.mark.parametrize("magnitude", [1e6, 1e10, 1e14])
def test_points_and_targets_of_any_magnitude_stay_finite_and_exact(magnitude):
    """Moments normalised by each node's radius: keys and queries of 1e14 (scores of 1e28,
    the input limit times Xavier weights) overflow no Taylor term, and a row whose keys are
    all equal (radius 0) with a huge query needs no power of it."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, grad = (torch.randn(2, 3, 40, generator=gen, dtype=torch.float64) for _ in range(4))
    q, k, v = q * magnitude, k * magnitude, v * magnitude
    k[0, 0] = magnitude  # all keys equal in one row
    ref = attention_and_grads(reference_attention, q, k, v, grad)
    got = attention_and_grads(tree_attention, q, k, v, grad)
    # float64 rounding of either result is relative to the scale of the terms each is summed
    # from (as in tests/_oracle.py), which here dwarfs the results themselves
    mq, mk, mv, mg = (float(t.abs().max()) for t in (q, k, v, grad))
    scales = (mv, mg * mv * mk, mg * mv * mq, mg)
    for name, r, e, scale in zip(("out", "dq", "dk", "dv"), ref, got, scales):
        assert torch.isfinite(e).all(), name
        err = float((r - e).abs().max())
        assert err <= 1e-10 * scale, f"{name}: error {err:.3g} at scale {scale:.3g}"
