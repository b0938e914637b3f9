"""The native CPU kernel (tgem._kernels._native): agreement with the reference, dispatch,
determinism.

With ``TGEM_REQUIRE_NATIVE=1`` (CI) a kernel that is not built or cannot load makes these tests
fail instead of skipping. ``TGEM_DISABLE_NATIVE=1`` (the forced-fallback CI run) skips the
kernel tests and keeps the fallback tests.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from tests._oracle import assert_float32_rms_rule, assert_float32_rule, float32_errors
from tgem._kernels import _native as nat
from tgem._kernels import backend_status, reference_attention, resolve_backend
from tgem._kernels._exact import exact_backward, exact_forward

REQUIRE = os.environ.get("TGEM_REQUIRE_NATIVE", "").strip() not in ("", "0")
# instruction-set paths that must run here, e.g. "avx512" on a machine known to have it
# (not set by CI, whose processors differ from one machine to the next)
REQUIRE_ISAS = {s.strip() for s in os.environ.get("TGEM_REQUIRE_ISA", "").split(",") if s.strip()}
EPS32 = torch.finfo(torch.float32).eps
PURE = ("compiled", "exact")  # the pure-PyTorch exact paths "auto" falls back to


def needs_native() -> None:
    """Skip (or, under TGEM_REQUIRE_NATIVE=1, fail) when the kernel cannot run."""
    if nat._LIB is None:
        msg = f"native kernel not loaded: {nat.native_status()}"
        if REQUIRE:
            pytest.fail(f"TGEM_REQUIRE_NATIVE=1 but {msg}")
        pytest.skip(msg)
    if nat._disabled():
        if REQUIRE:
            pytest.fail(f"TGEM_REQUIRE_NATIVE=1 but {nat._disabled()}")
        pytest.skip(nat._disabled())


@pytest.fixture(params=nat.ISAS)
def isa(request):
    """Each instruction-set path the processor supports, forced for the test."""
    needs_native()
    if request.param not in nat.supported_isas():
        msg = f"this CPU does not support the {request.param} path"
        if request.param in REQUIRE_ISAS:
            pytest.fail(f"TGEM_REQUIRE_ISA names {request.param!r} but {msg}")
        pytest.skip(msg)
    previous = nat.set_isa(request.param)
    yield request.param
    nat.set_isa(previous)


@pytest.fixture
def threads():
    """Restore torch's thread count after a test changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _inputs(genes: int, case: str, batch: int = 2, heads: int = 2, seed: int = 0):
    """float64 (q, k, v, upstream gradient) built like the model builds them: x_i * W_i."""
    gen = torch.Generator().manual_seed(seed + genes)
    x = torch.randn(batch, 1, genes, generator=gen, dtype=torch.float64).abs() * 2.0
    std = math.sqrt(2.0 / (genes + 1))  # Xavier-normal of a (heads, genes, 1) weight
    w = torch.randn(3, heads, genes, generator=gen, dtype=torch.float64) * std
    if case == "large":  # |q k| up to a few hundred: a sharp softmax
        w = torch.randn(3, heads, genes, generator=gen, dtype=torch.float64) * 3.0
        x = x * 3.0
    elif case == "equal":  # every gene has the same expression
        x = torch.full_like(x, 1.7)
    elif case == "constant":  # q = k = v = 1: the uniform softmax
        x, w = torch.ones_like(x), torch.ones_like(w)
    q, k, v = (x * w[i] for i in range(3))
    grad = torch.randn(batch, heads, genes, generator=gen, dtype=torch.float64)
    return q, k, v, grad


def _run(fn, q, k, v, grad, dtype):
    """Output and input gradients of ``fn`` in ``dtype``, returned in float64."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad.to(dtype))
    return [t.detach().double() for t in (out, *grads)]


@functools.lru_cache(maxsize=16)
def _references(genes: int, case: str, batch: int, heads: int):
    q, k, v, grad = _inputs(genes, case, batch, heads)
    ref64 = _run(reference_attention, q, k, v, grad, torch.float64)
    ref32 = _run(reference_attention, q, k, v, grad, torch.float32)
    return (q, k, v, grad), ref64, ref32


def _check_against_reference(genes: int, case: str, batch: int = 2, heads: int = 2):
    (q, k, v, grad), ref64, ref32 = _references(genes, case, batch, heads)
    got = _run(nat.native_attention, q, k, v, grad, torch.float32)
    for g32 in got:
        assert torch.isfinite(g32).all()
    # the rule of tests/_oracle.py: twice the plain float32 formulation's own error, plus a
    # floor of 4 ulp of the scale of the summed terms (for cases where that one is exact)
    mq, mk, mv, mg = (float(t.abs().max()) for t in (q, k, v, grad))
    scales = [mv, mg * mv * mk, mg * mv * mq, mg]
    rows = [
        (float((g32 - r64).abs().max()), float((r32 - r64).abs().max()), scale)
        for g32, r32, r64, scale in zip(got, ref32, ref64, scales)
    ]
    assert_float32_rule(rows)


@pytest.mark.parametrize("genes", [1, 2, 17, 1708])
@pytest.mark.parametrize("case", ["normal", "large", "equal"])
def test_native_matches_reference_forward_and_gradients(isa, genes, case):
    _check_against_reference(genes, case)


def test_native_uniform_softmax_gives_exact_mean(isa):
    """q = k = v = 1: every row is uniform, out_i = (G - 1) / G."""
    _check_against_reference(17, "constant")
    q = k = v = torch.ones(1, 1, 17)
    out = nat.native_attention(q, k, v)
    torch.testing.assert_close(out, torch.full_like(out, 16 / 17), rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize(("genes", "scale"), [(17, 0.5), (17, 3.0), (300, 0.5), (300, 3.0)])
def test_native_float32_rule_on_independent_gaussian_inputs(isa, genes, scale):
    """The float32 rule of the exact path's tests (tests/_oracle.py), on i.i.d. inputs."""
    gen = torch.Generator().manual_seed(genes)
    q, k, v = (
        torch.randn(4, 5, genes, generator=gen, dtype=torch.float64) * scale for _ in range(3)
    )
    grad = torch.randn(4, 5, genes, generator=gen, dtype=torch.float64)
    assert_float32_rule(float32_errors(nat.native_attention, q, k, v, grad))


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_native_float32_rms_error_within_twice_the_reference_error(isa, scale):
    """The rule without a floor, on the RMS error over 765 genes (tests/_oracle.py)."""
    gen = torch.Generator().manual_seed(765)
    q, k, v = (
        torch.randn(16, 5, 765, generator=gen, dtype=torch.float64) * scale for _ in range(3)
    )
    grad = torch.randn(16, 5, 765, generator=gen, dtype=torch.float64)
    assert_float32_rms_rule(nat.native_attention, q, k, v, grad)


@pytest.mark.slow
def test_native_matches_reference_at_5000_genes(isa):
    _check_against_reference(5000, "normal", batch=1, heads=1)


@pytest.mark.parametrize("genes", [1, 17, 300])
def test_native_forward_backward_match_exact_path_outputs(isa, genes):
    """Same outputs as exact_forward / exact_backward (the row maximum to one rounding)."""
    q, k, v, grad = (t.reshape(-1, genes) for t in _inputs(genes, "normal", batch=3))
    q32, k32, v32, g32 = (t.float().contiguous() for t in (q, k, v, grad))
    got = nat.native_forward(q32, k32, v32)
    ref = exact_forward(q, k, v)
    torch.testing.assert_close(got[1], exact_forward(q32, k32, v32)[1], rtol=2 * EPS32, atol=0)
    for name, a, b in zip(("out", "m2", "inv_z", "e_diag"), got, ref):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6, msg=name)
    dgot = nat.native_backward(q32, k32, v32, *got[1:], got[0], g32)
    dref = exact_backward(q, k, v, *ref[1:], ref[0], grad)
    for name, a, b in zip(("dq", "dk", "dv"), dgot, dref):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6, msg=name)


def test_native_results_do_not_depend_on_thread_count(isa, threads):
    # 15 rows: one backward task per row at 1 and 2 threads, per (row, key block) at 3 and
    # 4 threads (fewer than 4 rows per thread): the two schedules must agree bit for bit
    q, k, v, grad = (t.float() for t in _inputs(300, "normal", batch=3, heads=5))
    results = []
    for n in (1, 2, 3, 4):
        torch.set_num_threads(n)
        results.append(_run(nat.native_attention, q, k, v, grad, torch.float32))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_native_paths_agree_with_each_other():
    needs_native()
    q, k, v, grad = _inputs(100, "normal", batch=2, heads=3)
    results = {}
    for name in nat.supported_isas():
        previous = nat.set_isa(name)
        try:
            results[name] = _run(nat.native_attention, q, k, v, grad, torch.float32)
        finally:
            nat.set_isa(previous)
    first = results[nat.supported_isas()[0]]
    for other in results.values():
        for a, b in zip(first, other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


#: Scales of the rows of one call: ordinary, then row maxima past 2^24 (from inputs of about
#: 2e4 on, the fused exponent's rounding error overflowed exp2 or wiped out a whole row),
#: up to the products of two values at the input limit (1e15, tgem._classifier.MAX_ABS_VALUE).
LARGE_ROW_SCALES = (1.0, 1e3, 2e4, 1e5, 1e10, 1e15)


def test_native_large_scores_are_finite_and_match_the_reference(isa):
    """Rows of very large scores next to ordinary ones (issue 24, item 5): the float32 rule,
    every result finite, on every instruction-set path."""
    gen = torch.Generator().manual_seed(24)
    scale = torch.tensor(LARGE_ROW_SCALES, dtype=torch.float64)[:, None, None]
    q, k, v = (torch.randn(6, 2, 40, generator=gen, dtype=torch.float64) * scale for _ in "qkv")
    grad = torch.randn(6, 2, 40, generator=gen, dtype=torch.float64)
    got = _run(nat.native_attention, q, k, v, grad, torch.float32)
    assert all(torch.isfinite(t).all() for t in got)
    for row in range(len(LARGE_ROW_SCALES)):  # the rule row by row: each at its own scale
        assert_float32_rule(
            float32_errors(nat.native_attention, *(t[row : row + 1] for t in (q, k, v, grad)))
        )


def test_native_does_not_modify_inputs_and_accepts_views(isa):
    q, k, v, grad = (t.float() for t in _inputs(33, "normal"))
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous view
    before = [t.clone() for t in (q_t, k, v)]
    out = nat.native_attention(q_t, k, v)
    for a, b in zip(before, (q_t, k, v)):
        assert torch.equal(a, b)
    torch.testing.assert_close(out, reference_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_native_double_backward_raises_clearly(isa):
    q, k, v = (t.float().requires_grad_(True) for t in _inputs(5, "normal")[:3])
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(nat.native_attention(q, k, v).sum(), q, create_graph=True)


# ----------------------------------------------------------------------------- exp2
def _all_float32_samples(n: int = 1 << 20) -> torch.Tensor:
    """Random bit patterns over every float32 (finite, inf, NaN) plus a dense grid."""
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int64)
    anything = bits.to(torch.int32).view(torch.float32)
    grid = torch.linspace(-160.0, 130.0, 1 << 20, dtype=torch.float32)
    fine = torch.linspace(-1.0, 1.0, 1 << 16, dtype=torch.float32)
    return torch.cat([anything, grid, fine])


def test_exp2_accuracy_over_the_whole_float_range(isa):
    y = _all_float32_samples()
    got = nat.native_exp2(y).double()
    exact = torch.exp2(y.double())
    tiny = torch.finfo(torch.float32).tiny  # 2^-126
    normal = (exact >= tiny) & (y < 127.99)
    rel = ((got[normal] - exact[normal]) / exact[normal]).abs().max().item()
    assert rel <= 2 * EPS32, f"max relative error {rel:.3g} > 2 ulp"
    # gradual underflow, then 0: the polynomial's relative error (as above) carried into the
    # subnormal range, plus the final rounding to its grid (half of 2^-149)
    sub = exact < tiny
    excess = (got[sub] - exact[sub]).abs() - (2.0**-150 + 2 * EPS32 * exact[sub])
    assert excess.max().item() <= 0, (
        f"error {excess.max().item() + 2.0**-150:.3g} beyond half a subnormal ulp + 2 ulp "
        "relative in the subnormal range"
    )
    assert (got[y <= -151] == 0).all()
    assert torch.isinf(got[y >= 128]).all()
    assert torch.isnan(got[torch.isnan(y)]).all()


def test_exp2_special_values_and_exact_powers(isa):
    special = torch.tensor([float("-inf"), float("inf"), float("nan"), 0.0, -0.0, -1e30, 1e30])
    got = nat.native_exp2(special)
    assert got[0] == 0 and torch.isinf(got[1]) and torch.isnan(got[2])
    assert got[3] == 1 and got[4] == 1 and got[5] == 0 and torch.isinf(got[6])
    ints = torch.arange(-149, 128, dtype=torch.float32)
    assert torch.equal(nat.native_exp2(ints).double(), torch.exp2(ints.double()))


# ----------------------------------------------------------------------------- dispatch
def test_native_is_the_auto_backend_for_cpu_float32():
    needs_native()
    assert resolve_backend("auto", "cpu", torch.float32).name == "native"
    assert backend_status("cpu")["native"] is None
    assert "native kernel" in nat.native_status()


def test_float64_falls_back_to_the_exact_path():
    assert resolve_backend("auto", "cpu", torch.float64).name in PURE
    with pytest.raises(ValueError, match="float64"):
        resolve_backend("native", "cpu", torch.float64)


def test_disabled_native_falls_back_to_exact(monkeypatch):
    monkeypatch.setenv("TGEM_DISABLE_NATIVE", "1")
    assert resolve_backend("auto", "cpu", torch.float32).name in PURE
    assert "TGEM_DISABLE_NATIVE" in backend_status("cpu")["native"]
    assert "disabled" in nat.native_status()


def test_missing_library_is_reported_and_falls_back(monkeypatch):
    monkeypatch.delenv("TGEM_DISABLE_NATIVE", raising=False)
    lib, path, reason = nat._open_library("/nonexistent/_tgem_kernels.so")
    assert lib is None and "could not be loaded" in reason
    monkeypatch.setattr(nat, "_LIB", None)
    monkeypatch.setattr(nat, "_LOAD_ERROR", "extension not built (test)")
    assert resolve_backend("auto", "cpu", torch.float32).name in PURE
    assert "extension not built" in nat.native_status()
    with pytest.raises(RuntimeError, match="cannot run"):
        nat.native_attention(*torch.ones(3, 1, 1, 4))


def test_isa_forced_by_environment(monkeypatch):
    needs_native()
    q, k, v, grad = (t.float() for t in _inputs(40, "normal"))
    previous = nat.set_isa("scalar")
    try:
        by_function = nat.native_attention(q, k, v)
    finally:
        nat.set_isa(previous)
    monkeypatch.setenv("TGEM_NATIVE_ISA", "scalar")
    assert "forced by TGEM_NATIVE_ISA" in nat.native_status()
    assert torch.equal(nat.native_attention(q, k, v), by_function)


def test_unusable_isa_request_makes_backend_unavailable(monkeypatch):
    needs_native()
    monkeypatch.setenv("TGEM_NATIVE_ISA", "neon")
    reason = backend_status("cpu")["native"]
    assert "TGEM_NATIVE_ISA" in reason and "neon" in reason
    assert resolve_backend("auto", "cpu").name in PURE
    with pytest.raises(RuntimeError, match="TGEM_NATIVE_ISA"):
        nat.native_attention(*torch.ones(3, 1, 1, 4))
    with pytest.raises(ValueError, match="neon"):
        nat.set_isa("neon")


# ----------------------------------------------------------------------------- whole layer
def _plain_layer(attention):
    """A layer as the model writes it without ``layer_fn``: q/k/v products, attention, mix."""

    def layer(x, wq, wk, wv, w0):
        xb = x.unsqueeze(1)
        heads = attention(xb * wq[..., 0], xb * wk[..., 0], xb * wv[..., 0])
        return torch.einsum("bhg,h->bg", heads, w0)

    return layer


def _layer_inputs(batch: int, heads: int, genes: int, scale: float = 1.0, seed: int = 0):
    """float64 (x, WQ, WK, WV, W_0, upstream gradient) shaped and scaled like the model's."""
    gen = torch.Generator().manual_seed(seed + genes)
    x = torch.rand(batch, genes, generator=gen, dtype=torch.float64) * 4
    std = math.sqrt(2.0 / (genes + heads)) * scale
    w = [torch.randn(heads, genes, 1, generator=gen, dtype=torch.float64) * std for _ in range(3)]
    w0 = torch.randn(heads, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch, genes, generator=gen, dtype=torch.float64)
    return (x, *w, w0), grad


def _layer_run(fn, inputs, grad, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad.to(dtype))
    return [t.detach().double() for t in (out, *grads)]


LAYER_NAMES = ("mixed", "dx", "dWQ", "dWK", "dWV", "dW_0")


@pytest.mark.parametrize(
    ("batch", "heads", "genes"), [(2, 1, 1), (3, 2, 2), (3, 5, 17), (4, 3, 300)]
)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_native_layer_matches_reference_layer(isa, batch, heads, genes, scale):
    """Output and all five gradients against the plain formulation: float64 reference, and
    at most twice the plain float32 formulation's own error, plus a floor of 4 ulp of the
    scale of the terms each result sums (sqrt of their count times the largest), for results
    the plain formulation gets exact by luck (as tests/_oracle.py does for the attention)."""
    inputs, grad = _layer_inputs(batch, heads, genes, scale)
    plain = _plain_layer(reference_attention)
    ref64 = _layer_run(plain, inputs, grad, torch.float64)
    ref32 = _layer_run(plain, inputs, grad, torch.float32)
    got = _layer_run(nat.native_layer, inputs, grad, torch.float32)
    mx, mwq, mwk, mwv, mw0, mgm = (float(t.abs().max()) for t in (*inputs, grad))
    mq, mk, mv, mg = mx * mwq, mx * mwk, mx * mwv, mw0 * mgm  # the heads' q, k, v, gradient
    dq, dk = mg * mv * mk, mg * mv * mq  # the attention's gradient terms (tests/_oracle.py)
    scales = [
        math.sqrt(heads) * mw0 * mv,
        math.sqrt(heads) * (dq * mwq + dk * mwk + mg * mwv),
        math.sqrt(batch) * mx * dq,
        math.sqrt(batch) * mx * dk,
        math.sqrt(batch) * mx * mg,
        math.sqrt(batch * genes) * mgm * mv,
    ]
    for name, g32, r32, r64, term in zip(LAYER_NAMES, got, ref32, ref64, scales):
        assert torch.isfinite(g32).all(), name
        err, ref_err = float((g32 - r64).abs().max()), float((r32 - r64).abs().max())
        floor = 4 * EPS32 * term
        assert err <= 2 * ref_err + floor, (
            f"{name}: float32 error {err:.3g} > 2 x reference error {ref_err:.3g} + {floor:.3g}"
        )


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_native_layer_rms_error_within_twice_the_reference_error(isa, scale):
    """The float32 rule without a floor on a model-sized layer (16 samples, 5 heads, 765)."""
    inputs, grad = _layer_inputs(16, 5, 765, scale)
    plain = _plain_layer(reference_attention)
    ref64 = _layer_run(plain, inputs, grad, torch.float64)
    ref32 = _layer_run(plain, inputs, grad, torch.float32)
    got = _layer_run(nat.native_layer, inputs, grad, torch.float32)
    for name, g32, r32, r64 in zip(LAYER_NAMES, got, ref32, ref64):
        err = float((g32 - r64).pow(2).mean().sqrt())
        ref_err = float((r32 - r64).pow(2).mean().sqrt())
        assert err <= 2 * ref_err, f"{name}: RMS error {err:.3g} > 2 x {ref_err:.3g}"


def test_native_layer_agrees_with_native_attention_composed(isa):
    """The fused layer and the attention kernel wrapped in PyTorch's products agree closely
    (the same kernel; only the head mix and the weight-gradient sums are added differently)."""
    inputs, grad = _layer_inputs(4, 5, 200)
    composed = _layer_run(_plain_layer(nat.native_attention), inputs, grad, torch.float32)
    fused = _layer_run(nat.native_layer, inputs, grad, torch.float32)
    for name, a, b in zip(LAYER_NAMES, fused, composed):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=64 * EPS32 * scale, msg=name)


def test_native_layer_results_do_not_depend_on_thread_count(isa, threads):
    inputs, grad = _layer_inputs(3, 5, 300)
    results = []
    for n in (1, 2, 3, 4):
        torch.set_num_threads(n)
        results.append(_layer_run(nat.native_layer, inputs, grad, torch.float32))
    for other in results[1:]:
        for name, a, b in zip(LAYER_NAMES, results[0], other):
            assert torch.equal(a, b), name


def test_native_layer_keeps_inputs_and_accepts_views(isa):
    inputs, grad = _layer_inputs(3, 2, 33)
    x, wq, wk, wv, w0 = (t.float() for t in inputs)
    x_view = x.t().contiguous().t()  # same values, not contiguous
    before = [t.clone() for t in (x_view, wq, wk, wv, w0)]
    out = nat.native_layer(x_view, wq, wk, wv, w0)
    for a, b in zip(before, (x_view, wq, wk, wv, w0)):
        assert torch.equal(a, b)
    torch.testing.assert_close(out, nat.native_layer(x, wq, wk, wv, w0), rtol=0, atol=0)


def test_native_layer_rejects_bad_shapes_and_double_backward(isa):
    x = torch.rand(2, 5)
    wq, wk, wv = torch.randn(3, 4, 5, 1).unbind(0)
    with pytest.raises(ValueError, match=r"\(heads, genes, 1\)"):
        nat.native_layer(x, wq[..., 0], wk, wv, torch.ones(4))
    with pytest.raises(ValueError, match="W_0"):
        nat.native_layer(x, wq, wk, wv, torch.ones(3))
    with pytest.raises(TypeError, match="float32"):
        nat.native_layer(x.double(), wq, wk, wv, torch.ones(4))
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(
            nat.native_layer(x, wq, wk, wv, torch.ones(4)).sum(), x, create_graph=True
        )


def test_model_uses_the_fused_layer_and_matches_the_composed_path(isa, monkeypatch):
    """TGEMNet calls the backend's layer_fn; without it (the composed path) the log-probabilities
    and every parameter gradient agree to float32 rounding."""
    from dataclasses import replace

    import tgem._kernels._registry as att
    from tgem._model import TGEMNet

    net = TGEMNet(
        40,
        3,
        n_heads=3,
        dropout=0.0,
        attention_backend="native",
        generator=torch.Generator().manual_seed(0),
    )
    x = torch.rand(5, 40, generator=torch.Generator().manual_seed(1)) * 4
    calls = []
    original = nat.native_layer_forward
    monkeypatch.setattr(nat, "native_layer_forward", lambda *a: calls.append(1) or original(*a))

    def run():
        net.zero_grad()
        out = net(x)
        out[:, 0].sum().backward()
        return [out.detach()] + [p.grad.clone() for p in net.parameters()]

    fused = run()
    assert len(calls) == 3
    composed_backend = replace(att._BACKENDS["native"], layer_fn=None)
    monkeypatch.setitem(att._BACKENDS, "native", composed_backend)
    composed = run()
    assert len(calls) == 3
    for a, b in zip(fused, composed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
