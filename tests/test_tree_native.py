"""The tree code with its sums in C (tgem._kernels._tree_native, backend "tree_native").

Against the plain reference formulation as every fast path, and against the pure-PyTorch
tree code (the same algorithm). With ``TGEM_REQUIRE_NATIVE=1`` (CI) a native tree code that
cannot run makes these tests fail instead of skipping; ``TGEM_DISABLE_NATIVE=1`` (the
forced-fallback CI run) skips them and keeps the tests of the fallback.
"""

from __future__ import annotations

import math
import os

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
from tgem._kernels import (
    _native,
    _tree_native,
    attention_entropy_rows,
    backend_status,
    exact_attention,
    reference_attention,
    resolve_backend,
)
from tgem._kernels import _tree as T
from tgem._kernels._tree import tree_attention
from tgem._kernels._tree_native import tree_native_attention, tree_native_entropy_rows
from tgem._model import TGEMNet

REQUIRE = os.environ.get("TGEM_REQUIRE_NATIVE", "").strip() not in ("", "0")
EPS32 = torch.finfo(torch.float32).eps
SCALES = [0.01, 1.0, 30.0, 1000.0]


#: Tests of how the backend reports that it cannot run: they run everywhere.
FALLBACK_TESTS = {
    "test_backend_unavailable_when_native_is_disabled_or_off_cpu",
    "test_an_extension_without_the_tree_code_is_reported",
}


@pytest.fixture(autouse=True)
def needs_tree_native(request):
    """Skip (or, under TGEM_REQUIRE_NATIVE=1, fail) when the native tree code cannot run."""
    if request.function.__name__ in FALLBACK_TESTS:
        return
    reason = _tree_native._unavailable(torch.device("cpu"), torch.float32)
    if reason is not None:
        if REQUIRE:
            pytest.fail(f"TGEM_REQUIRE_NATIVE=1 but {reason}")
        pytest.skip(reason)


def _qkv(b, h, g, scale=1.0, seed=0, dtype=torch.float64, zeros=0.0):
    """(q, k, v, upstream gradient); ``scale`` multiplies q and k (the score scale)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, b, h, g, generator=gen, dtype=dtype)
    if zeros:  # unexpressed genes: q = k = v = 0
        x = x * (torch.rand(b, 1, g, generator=gen) >= zeros).to(dtype)
    q, k, v = x[0] * scale, x[1] * scale, x[2]
    grad = torch.randn(b, h, g, generator=gen, dtype=dtype)
    return q, k, v, grad


def _assert_float64_close(q, k, v, grad, tol=1e-10, fn=tree_native_attention, ref=None):
    """Output and gradients within ``tol`` of the reference's largest entry (at least 1)."""
    want = attention_and_grads(ref or reference_attention, q, k, v, grad)
    got = attention_and_grads(fn, q, k, v, grad)
    for name, r, e in zip(("out", "dq", "dk", "dv"), want, got):
        assert torch.isfinite(e).all(), name
        err = float((r - e.double()).abs().max())
        assert err <= tol * max(1.0, float(r.abs().max())), f"{name}: error {err:.3g}"


@pytest.fixture
def counts(monkeypatch):
    """The C code's work counters: [one-expansion sums, tree sums, expansions, leaf points]."""
    c = torch.zeros(4, dtype=torch.int64)
    monkeypatch.setattr(_tree_native, "work_counts", c)
    return c


# ------------------------------------------------------------------------ float64
@pytest.mark.parametrize("g", [1, 2, 3, 17, 300])
@pytest.mark.parametrize("scale", SCALES)
def test_matches_reference_in_float64(g, scale):
    _assert_float64_close(*_qkv(3, 2, g, scale))


def test_gradcheck():
    for scale in (0.3, 8.0):  # one expansion; through the tree
        q, k, v, _ = _qkv(1, 2, 40, scale, seed=3)
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        assert torch.autograd.gradcheck(tree_native_attention, leaves, eps=1e-6, atol=1e-7)


def test_sharp_attention_runs_through_the_tree_and_small_scores_do_not(counts):
    q, k, v, grad = _qkv(2, 2, 300, 30.0)
    attention_and_grads(tree_native_attention, q, k, v, grad)
    assert counts[0] == 0 and counts[1] > 0 and counts[2] > 0
    counts.zero_()
    q, k, v, grad = _qkv(2, 2, 300, 0.01)
    attention_and_grads(tree_native_attention, q, k, v, grad)
    # each row: forward and backward, one sum per sign of q, none through the tree
    assert counts[1] == 0 and counts[2] == 0 and counts[0] == 2 * 2 * 2 * 2


def test_the_tree_skips_expands_and_sums_leaves(counts):
    """At 5,000 genes and large scores the traversal expands nodes and sums leaves, and it
    visits far fewer points than the dense sum would."""
    q, k, v, grad = _qkv(1, 1, 5000, 3.0, seed=1)
    _assert_float64_close(q, k, v, grad, ref=exact_attention)
    assert counts[1] > 0 and counts[2] > 0 and counts[3] > 0
    # forward (q >= 0 and q < 0 sums) and backward: 5,000 targets each, dense would be G^2
    assert counts[3] + 30 * counts[2] < 0.1 * 2 * 5000**2


@settings(max_examples=30, deadline=None)
@given(
    g=st.integers(1, 80),
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    log_scale=st.floats(-2.0, 3.0),
    zeros=st.sampled_from([0.0, 0.6]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference_and_pure_tree(g, batch, heads, log_scale, zeros, seed):
    q, k, v, grad = _qkv(batch, heads, g, 10.0**log_scale, seed=seed, zeros=zeros)
    _assert_float64_close(q, k, v, grad)
    _assert_float64_close(q, k, v, grad, ref=tree_attention)


# ------------------------------------------------------------------------ float32
@pytest.mark.parametrize("g", [17, 300])
@pytest.mark.parametrize("scale", SCALES)
def test_float32_rule(g, scale):
    q, k, v, grad = _qkv(4, 5, g, scale)
    assert_float32_rule(float32_errors(tree_native_attention, q, k, v, grad))


@pytest.mark.parametrize("scale", [0.01, 0.5, 3.0, 30.0])
def test_float32_rms_error_within_twice_the_reference_error(scale):
    q, k, v, grad = _qkv(4, 5, 765, scale, seed=765)
    assert_float32_rms_rule(tree_native_attention, q, k, v, grad)


def test_float32_result_keeps_dtype_shape_and_layout():
    q, k, v, _ = _qkv(2, 3, 40, 2.0, dtype=torch.float32)
    out = tree_native_attention(q, k, v)
    assert out.dtype == torch.float32 and out.shape == q.shape
    flat = tree_native_attention(q.reshape(6, 40), k.reshape(6, 40), v.reshape(6, 40))
    assert torch.equal(flat, out.reshape(6, 40))
    # non-contiguous inputs give the same result
    qt, kt, vt = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v))
    assert not qt.is_contiguous()
    assert torch.equal(tree_native_attention(qt, kt, vt), out)


# ------------------------------------------------------------------------ against "tree"
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agrees_with_the_pure_pytorch_tree(scale, dtype):
    q, k, v, grad = _qkv(3, 4, 700, scale, seed=11, dtype=dtype)
    pure = attention_and_grads(tree_attention, q, k, v, grad)
    native = attention_and_grads(tree_native_attention, q, k, v, grad)
    mq, mk, mv, mg = (float(t.abs().max()) for t in (q, k, v, grad))
    # both round float64 sums within the tolerance of each other to the dtype: at most an
    # ulp of the terms' scale apart (float32), or the tolerance (float64)
    rel = 4 * EPS32 if dtype == torch.float32 else 1e-10
    for name, a, b, s in zip(
        ("out", "dq", "dk", "dv"), pure, native, (mv, mg * mv * mk, mg * mv * mq, mg)
    ):
        assert a.dtype == b.dtype == dtype
        err = float((a - b).abs().max())
        assert err <= rel * max(s, float(a.abs().max())), f"{name}: {err:.3g}"


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0, 1000.0])
@pytest.mark.parametrize("g", [1, 2, 300])
def test_entropy_matches_the_exact_paths_entropy(scale, g):
    q, k, _, _ = _qkv(2, 3, g, scale, zeros=0.3)
    expected = attention_entropy_rows(q, k)
    torch.testing.assert_close(tree_native_entropy_rows(q, k), expected, rtol=0, atol=1e-10)
    got32 = tree_native_entropy_rows(q.float(), k.float())
    assert got32.dtype == torch.float32
    expected32 = attention_entropy_rows(q.float().double(), k.float().double())
    torch.testing.assert_close(got32.double(), expected32, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        tree_native_entropy_rows(q, k), T.tree_entropy_rows(q, k), rtol=0, atol=1e-12
    )


# ------------------------------------------------------------------------ threads, FP state
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_thread_count(dtype):
    # rows of both kinds: sharp (through the tree) and near uniform (one expansion)
    q, k, v, grad = _qkv(4, 5, 300, 30.0, dtype=dtype)
    q[0] *= 1e-4
    k[0] *= 1e-4
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(attention_and_grads(tree_native_attention, q, k, v, grad))
            results[-1].append(tree_native_entropy_rows(q, k))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_instruction_set_paths_are_bit_identical():
    """The AVX2 instances compute the same operations in the same order as the baseline."""
    supported = _native.supported_isas()
    q, k, v, grad = _qkv(3, 2, 400, 30.0, seed=6)
    q[0] *= 1e-3  # a row of the cheap case too
    results = []
    try:
        for isa in supported:
            _native.set_isa(isa)
            results.append(attention_and_grads(tree_native_attention, q, k, v, grad))
            results[-1].append(tree_native_entropy_rows(q, k))
    finally:
        _native.set_isa(None)
    assert len(results) >= 1
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_repeated_calls_are_bit_identical():
    q, k, v, grad = _qkv(2, 3, 500, 100.0, seed=4, dtype=torch.float32)
    first = attention_and_grads(tree_native_attention, q, k, v, grad)
    second = attention_and_grads(tree_native_attention, q, k, v, grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_caller_flush_to_zero_setting_is_kept():
    """The C threads run with flush-to-zero; a caller that has set it keeps it, one that has
    not is left without it (tests/test_subnormal.py checks the latter for every backend)."""
    q, k, v, grad = _qkv(2, 2, 100, 300.0, dtype=torch.float32)
    if not torch.set_flush_denormal(True):
        if os.environ.get("TGEM_REQUIRE_NATIVE") == "1" or os.environ.get("TGEM_REQUIRE_ISA"):
            pytest.fail("TGEM_REQUIRE_NATIVE/TGEM_REQUIRE_ISA set, but no flush-to-zero mode")
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        attention_and_grads(tree_native_attention, q, k, v, grad)
        assert 1e-300 * 1e-10 == 0.0  # still flushing
    finally:
        torch.set_flush_denormal(False)
    attention_and_grads(tree_native_attention, q, k, v, grad)
    assert 1e-300 * 1e-10 != 0.0


# ------------------------------------------------------------------------ hostile numerics
def test_uniform_softmax_gives_exact_mean():
    q = k = v = torch.ones(1, 1, 17)
    out = tree_native_attention(q, k, v)
    torch.testing.assert_close(out, torch.full_like(out, 16 / 17), rtol=1e-7, atol=0)


@pytest.mark.parametrize("g", [1, 2, 3, 50, 2000])
def test_all_keys_equal(g):
    q, _, v, grad = _qkv(2, 2, g, 100.0)
    k = torch.full_like(q, 3.7)
    _assert_float64_close(q, k, v, grad, ref=exact_attention if g > 500 else None)


@pytest.mark.parametrize("scale", [1.0, 500.0])
def test_many_zero_genes(scale):
    q, k, v, grad = _qkv(3, 2, 400, scale, zeros=0.8)
    _assert_float64_close(q, k, v, grad)
    assert_float32_rule(float32_errors(tree_native_attention, q, k, v, grad))


def test_queries_of_one_sign_only():
    q, k, v, grad = _qkv(2, 2, 200, 20.0, seed=8)
    _assert_float64_close(q.abs(), k, v, grad)
    _assert_float64_close(-q.abs(), k, v, grad)


def test_softmax_peaked_on_the_gene_itself():
    q = torch.tensor([[50.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0, -0.1, 0.2]], dtype=torch.float64)
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    _assert_float64_close(q, k, v, torch.ones_like(q), tol=1e-12)


def test_scores_in_the_thousands_and_float32_extremes():
    q, k, v, grad = _qkv(2, 2, 300, 3000.0, seed=5)
    _assert_float64_close(q, k, v, grad)
    # float32 inputs whose products overflow float32: the reference gives nan, the tree code
    # (which sums in float64) the float64 reference's result
    big = torch.tensor([[3e19, -2e19, 1e19, 5.0]])
    vals = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = tree_native_attention(big, big, vals)
    expected = reference_attention(big.double(), big.double(), vals.double())
    assert torch.isnan(reference_attention(big, big, big)).any()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    tiny = torch.full((1, 1, 9), 1e-40)  # subnormal inputs: a uniform softmax
    out = tree_native_attention(tiny, tiny, torch.ones_like(tiny))
    torch.testing.assert_close(out, torch.full_like(out, 8 / 9))
    huge = torch.tensor([[3e38, -3e38, 1e38]])  # the float32 limits
    out = tree_native_attention(huge, huge, vals[:, :3])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out.double(), reference_attention(*(x.double() for x in (huge, huge, vals[:, :3])))
    )


@pytest.mark.parametrize("magnitude", [1e6, 1e14])
def test_points_and_targets_of_any_magnitude_stay_finite(magnitude):
    gen = torch.Generator().manual_seed(3)
    q, k, v, grad = (torch.randn(2, 3, 40, generator=gen, dtype=torch.float64) for _ in range(4))
    q, k, v = q * magnitude, k * magnitude, v * magnitude
    k[0, 0] = magnitude  # all keys equal in one row
    ref = attention_and_grads(reference_attention, q, k, v, grad)
    got = attention_and_grads(tree_native_attention, q, k, v, grad)
    mq, mk, mv, mg = (float(t.abs().max()) for t in (q, k, v, grad))
    for name, r, e, s in zip(
        ("out", "dq", "dk", "dv"), ref, got, (mv, mg * mv * mk, mg * mv * mq, mg)
    ):
        assert torch.isfinite(e).all(), name
        assert float((r - e).abs().max()) <= 1e-10 * s, name


def test_results_hold_no_subnormals():
    q, k, v, grad = _qkv(2, 2, 200, 300.0, dtype=torch.float32)
    for x in attention_and_grads(tree_native_attention, q, k, v * 1e-30, grad):
        nonzero = x[x != 0].abs()
        assert (nonzero >= torch.finfo(torch.float32).tiny).all()


def test_non_finite_inputs_raise():
    q, k, v, _ = _qkv(1, 1, 5)
    q[0, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite"):
        tree_native_attention(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_error_is_the_pure_trees(dtype, name, bad):
    """The fused C forward checks finiteness per row; its error is the pure tree's, word for
    word (the input named, the count of bad values), in any row, with or without gradients."""
    inputs = dict(zip("qkv", _qkv(3, 2, 40, 5.0, dtype=dtype)[:3]))
    inputs[name][2, 1, 7] = bad
    inputs[name][0, 0, 0] = bad
    with pytest.raises(ValueError) as want:
        tree_attention(*inputs.values())
    assert "2 non-finite" in str(want.value)
    for grad in (False, True):
        leaves = [x.clone().requires_grad_(grad) for x in inputs.values()]
        with pytest.raises(ValueError) as got:
            tree_native_attention(*leaves)
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize("g", [1, 2, 3])
@pytest.mark.parametrize("scale", [0.01, 30.0])
def test_fused_path_on_tiny_gene_counts_and_zero_keys(g, scale):
    _assert_float64_close(*_qkv(2, 3, g, scale, seed=g))
    q, k, v, grad = _qkv(2, 3, g, scale, seed=g)
    _assert_float64_close(q, torch.zeros_like(k), v, grad)  # every key zero


def test_runs_the_fused_c_forward_and_backward(monkeypatch, counts):
    """Attention and gradients come from the fused C entry points, not from the row and
    column sums (which only the entropy uses now)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the separate C sums ran")

    monkeypatch.setattr(_tree_native._NativeSides, "row_sums", refuse)
    monkeypatch.setattr(_tree_native._NativeSides, "column_sums", refuse)
    q, k, v, grad = _qkv(2, 2, 300, 0.01)
    _assert_float64_close(q, k, v, grad)
    # forward and backward, one cheap sum per row and sign of q
    assert counts[0] == 2 * 2 * 2 * 2 and counts[1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.01, 30.0])
def test_backward_that_recomputes_the_sums_gives_the_same_gradients(monkeypatch, dtype, scale):
    """Past SAVE_LIMIT_BYTES the forward keeps nothing but q, k, v and the backward repeats the
    forward's sums: bitwise the same attention and gradients as when they are kept."""
    q, k, v, grad = _qkv(2, 3, 400, scale, seed=7, dtype=dtype)
    kept = attention_and_grads(tree_native_attention, q, k, v, grad)
    monkeypatch.setattr(_tree_native, "SAVE_LIMIT_BYTES", 0)
    calls = []
    forward = _tree_native._fused_forward
    monkeypatch.setattr(
        _tree_native, "_fused_forward", lambda *a: calls.append(a[-1]) or forward(*a)
    )
    again = attention_and_grads(tree_native_attention, q, k, v, grad)
    assert calls == [False, True]  # the forward keeps nothing; the backward recomputes
    for a, b in zip(kept, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scale", [0.3, 30.0])
def test_float32_inputs_read_directly_give_the_float64_path_rounded(scale):
    """The C code reads float32 rows itself: the same sums as float64 inputs of the same values
    (at the same tolerance), each result rounded once to float32."""
    q, k, v, grad = _qkv(2, 3, 500, scale, seed=5, dtype=torch.float32)
    fn = lambda *x: tree_native_attention(*x, tol=1e-9)  # noqa: E731
    got = attention_and_grads(fn, q, k, v, grad)
    wide = attention_and_grads(fn, *(x.double() for x in (q, k, v, grad)))
    for a, b in zip(got, wide):
        assert a.dtype == torch.float32
        assert torch.equal(a, T._to_output(b, torch.float32))


def test_zero_queries_of_either_sign_agree():
    """q = -0.0 and q = +0.0 give the same results (the diagonal picks its side by sign bit)."""
    q, k, v, grad = _qkv(1, 2, 60, 3.0, seed=2)
    q[..., ::3] = 0.0
    neg = q.clone()
    neg[..., ::3] = -0.0
    for a, b in zip(
        attention_and_grads(tree_native_attention, q, k, v, grad),
        attention_and_grads(tree_native_attention, neg, k, v, grad),
    ):
        assert torch.equal(a, b)


def test_half_precision_and_mismatched_inputs_raise_as_the_pure_tree():
    q = torch.ones(1, 1, 4, dtype=torch.float16)
    for fn in (tree_attention, tree_native_attention):
        with pytest.raises(ValueError, match=r"float16.*\.float\(\)"):
            fn(q, q, q)
        with pytest.raises(ValueError, match="share shape"):
            fn(torch.ones(1, 4), torch.ones(1, 5), torch.ones(1, 4))
        with pytest.raises(ValueError, match="genes"):
            fn(torch.ones(1, 0), torch.ones(1, 0), torch.ones(1, 0))
    with pytest.raises(ValueError, match="float32 and float64 only"):
        resolve_backend("tree_native", "cpu", torch.float16)


def test_inputs_are_not_modified():
    q, k, v, grad = _qkv(2, 2, 100, 30.0, dtype=torch.float32)
    before = [t.clone() for t in (q, k, v, grad)]
    attention_and_grads(tree_native_attention, q, k, v, grad)
    tree_native_entropy_rows(q, k)
    for a, b in zip(before, (q, k, v, grad)):
        assert torch.equal(a, b)


def test_double_backward_is_refused():
    q, k, v, _ = _qkv(1, 1, 6)
    q.requires_grad_(True)
    out = tree_native_attention(q, k, v)
    with pytest.raises(RuntimeError, match="tree_native T-GEM attention is differentiable once"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_tolerance_is_the_pure_trees():
    q, k, v, _ = _qkv(2, 2, 300, 10.0, seed=2)
    ref = reference_attention(q, k, v)
    for tol in (1e-3, 1e-6):
        err = float((tree_native_attention(q, k, v, tol=tol) - ref).abs().max())
        assert err <= 2 * tol * float(v.abs().max())
    with pytest.raises(ValueError, match="tree_tol"):
        tree_native_attention(q, k, v, tol=0.5)


# ------------------------------------------------------------------------ backend
def test_backend_is_registered_and_auto_without_a_gene_count_stays_dense():
    backend = resolve_backend("tree_native", "cpu", torch.float32)
    assert backend.fn is tree_native_attention
    for dtype in (torch.float32, torch.float64):  # by gene count: tests/test_auto_backend.py
        assert resolve_backend("auto", "cpu", dtype).name not in ("tree", "tree_native")
    assert "tree code" in _tree_native.tree_native_status()


def test_backend_unavailable_when_native_is_disabled_or_off_cpu(monkeypatch):
    monkeypatch.delenv("TGEM_DISABLE_NATIVE", raising=False)
    on_cpu = _tree_native._unavailable(torch.device("cpu"), torch.float32)
    off_cpu = _tree_native._unavailable(torch.device("cuda"), torch.float32)
    # where the code runs on CPU, CUDA tensors are refused; without a build, the reason is that
    assert "CPU tensors only" in off_cpu if on_cpu is None else off_cpu == on_cpu
    monkeypatch.setenv("TGEM_DISABLE_NATIVE", "1")
    assert "TGEM_DISABLE_NATIVE" in backend_status("cpu")["tree_native"]
    assert backend_status("cpu")["tree"] is None  # the pure-PyTorch tree still runs
    with pytest.raises(ValueError, match="tree_native.*TGEM_DISABLE_NATIVE"):
        resolve_backend("tree_native", "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="attention_backend='tree'"):
        _tree_native._ready()


def test_an_extension_without_the_tree_code_is_reported():
    class Old:
        def tgem_tree_abi_version(self):
            raise AttributeError("no such symbol")

    assert "rebuild" in _tree_native._declare(Old())
    assert _tree_native._declare(None) is not None


def test_model_runs_with_the_native_tree():
    x = torch.rand(3, 60, generator=torch.Generator().manual_seed(2)) * 4
    outs = {}
    for name in ("tree", "tree_native"):
        torch.manual_seed(0)
        net = TGEMNet(60, 3, n_layers=2, n_heads=2, dropout=0.0, attention_backend=name)
        out = net(x)
        out.sum().backward()
        outs[name] = (out.detach(), net.layers[0].WQ.grad.clone())
    for a, b in zip(outs["tree"], outs["tree_native"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ whole transcriptome
@pytest.mark.slow  # the float64 exact path takes about 20 s per case on 2 cores
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_at_22283_genes_against_float64_exact(scale):
    genes = 22283
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 1, genes, generator=gen, dtype=torch.float64).abs() * 2
    w = torch.randn(3, 1, genes, generator=gen, dtype=torch.float64) * math.sqrt(2 / genes)
    q, k, v = x * w[0] * scale, x * w[1] * scale, x * w[2]
    grad = torch.randn(1, 1, genes, generator=gen, dtype=torch.float64)
    ref = attention_and_grads(exact_attention, q, k, v, grad)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        got = attention_and_grads(
            tree_native_attention, q.to(dtype), k.to(dtype), v.to(dtype), grad
        )
        for name, r, e in zip(("out", "dq", "dk", "dv"), ref, got):
            err = float((r - e.double()).abs().max())
            assert err <= tol * max(1.0, float(r.abs().max())), f"{dtype} {name}: {err:.3g}"
