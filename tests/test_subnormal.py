"""Subnormal-free dense attention (issue 25, first item).

Exponentials of scores far below a row's maximum are subnormal floats, and on x86 every
operation that produces or reads one takes a microcode assist: a sharp attention (query and
key weights x30, x300) made a training step 4-25x slower. The native kernel flushes them to
zero in its own threads (MXCSR FTZ/DAZ, the caller's state restored); the pure-PyTorch paths
keep every exponential normal (ATen's threads never see a flush setting). These tests check
that no exponential is subnormal, that the caller's floating-point state is left as it was
by every backend, and that the accuracy rules hold at sharp score scales.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests._oracle import assert_float32_rule, attention_and_grads, float32_errors
from tgem._kernels import (
    _compiled,
    _native,
    _tree_native,
    backend_names,
    backend_status,
    reference_attention,
    resolve_backend,
)
from tgem._kernels._exact import (
    _exp2_block,
    diagonal_exp2,
    exact_backward,
    exact_forward,
    scaled_queries,
    scaled_row_max,
)
from tgem._model import TGEMNet

REQUIRE_NATIVE = os.environ.get("TGEM_REQUIRE_NATIVE", "").strip() not in ("", "0")
TINY = {dt: torch.finfo(dt).tiny for dt in (torch.float32, torch.float64)}


def _subnormal_count(t: torch.Tensor) -> int:
    """Number of nonzero entries of ``t`` below the smallest normal float of its dtype."""
    a = t.detach().abs()
    return int(((a > 0) & (a < TINY[t.dtype])).sum())


def _flushes() -> bool:
    """Whether this thread flushes subnormals (FTZ) or reads them as zero (DAZ) right now.

    Python floats and small CPU tensors are computed on the calling thread, so they show its
    MXCSR (x86) or FPCR (ARM) flush bits.
    """
    ftz = 1e-300 * 1e-10 == 0.0  # a float64 product in the subnormal range
    daz = 5e-324 * 1.0 == 0.0  # the smallest float64 subnormal read as zero
    ftz32 = float(torch.tensor(1e-30) * 1e-10) == 0.0  # float32, on this thread
    return ftz or daz or ftz32


def _sharp(g: int = 48, batch: int = 2, heads: int = 2, scale: float = 300.0, seed: int = 0):
    """Queries and keys as the model makes them (inputs in [0, 4) times Xavier-sized
    weights), with the query and key weights multiplied by ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, g, generator=gen, dtype=torch.float64) * 4
    w = torch.randn(3, heads, g, generator=gen, dtype=torch.float64) * (2.0 / (g + 1)) ** 0.5
    q = x * w[0] * scale
    k = x * w[1] * scale
    v = x * w[2]
    grad = torch.randn(batch, heads, g, generator=gen, dtype=torch.float64)
    return q, k, v, grad


def _cpu_backends(dtype=torch.float32) -> list[str]:
    status = backend_status("cpu", dtype)
    return [name for name in backend_names() if status[name] is None]


def _needs_native():
    if _native._LIB is None:
        msg = f"native kernel not loaded: {_native.native_status()}"
        if REQUIRE_NATIVE:
            pytest.fail(f"TGEM_REQUIRE_NATIVE=1 but {msg}")
        pytest.skip(msg)


# ------------------------------------------------------------------ no subnormal exponentials
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_exponentials_are_never_subnormal(dtype):
    # scores reach -1e4..-1e6 below the row maximum: without the floor, the blocks hold
    # subnormal exponentials (each a microcode assist on x86)
    q, k, _, _ = _sharp(scale=3000.0 if dtype == torch.float64 else 300.0)
    q, k = (t.to(dtype).reshape(-1, t.shape[-1]) for t in (q, k))
    n, g = q.shape
    q2 = scaled_queries(q)
    m2 = scaled_row_max(q2, k)
    rows = torch.cat([q2, (-m2).unsqueeze(-1)], dim=-1)
    cols = torch.cat(
        [k.unsqueeze(1).expand(n, q2.shape[-1], g), torch.ones_like(k).unsqueeze(1)], dim=1
    )
    e = _exp2_block(rows, cols, 0, torch.empty(n, g, g, dtype=dtype))
    assert _subnormal_count(e) == 0
    assert (e == 0).sum() == n * g  # only the diagonals: every other term at least the floor
    assert _subnormal_count(diagonal_exp2(q2, k, m2)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_exponentials_are_never_subnormal(dtype):
    # the compiled path's pointwise expression, run eagerly (the same code Inductor fuses)
    q, k, _, _ = _sharp(scale=3000.0 if dtype == torch.float64 else 300.0)
    q, k = (t.to(dtype).reshape(-1, t.shape[-1]) for t in (q, k))
    q2, hi, lo, _ = _compiled._split_queries(q)
    m2 = scaled_row_max(q2, k)
    y = _compiled._exponent(hi, lo, k, m2)
    e = torch.exp2(y)
    assert _subnormal_count(e) == 0
    assert (e == 0).any()  # the dropped terms are exact zeros
    # kept terms are at least 2^64 x the smallest normal, so that their products with the
    # weights of the fused loop (grad / Z can be 1e-10) stay normal too
    assert float(e[e > 0].min()) >= TINY[dtype] * 2.0**64
    w = torch.full_like(e, 2.0**-64)
    assert _subnormal_count(e * w) == 0
    # a NaN score is not hidden by the select
    y_nan = _compiled._exponent(hi, lo, torch.full_like(k, float("nan")), m2)
    assert torch.isnan(y_nan).all()


def test_native_kernel_flushes_subnormal_terms():
    _needs_native()
    # one row whose only off-diagonal term is exp(-90) = 8.2e-40 (subnormal in float32):
    # with gradual underflow the output is that subnormal, with the kernel's flush it is 0
    q = torch.tensor([[1.0, 1.0]])
    k = torch.tensor([[0.0, -90.0]])
    v = torch.tensor([[1.0, 1.0]])
    out, m2, inv_z, e_diag = _native.native_forward(q, k, v)
    assert out[0, 0] == 0.0
    for t in (out, inv_z, e_diag):
        assert _subnormal_count(t) == 0
    q, k, v, grad = (t.float().reshape(-1, t.shape[-1]) for t in _sharp(scale=300.0))
    saved = _native.native_forward(q, k, v)
    for t in (*saved, *_native.native_backward(q, k, v, *saved[1:], saved[0], grad)):
        assert _subnormal_count(t) == 0


# ------------------------------------------------------------------ the caller's FP state
def test_flush_probe_sees_a_flush_mode():
    # the probe of the next test can fail: it sees a flush mode where one is set
    assert not _flushes()
    if not torch.set_flush_denormal(True):
        if os.environ.get("TGEM_REQUIRE_NATIVE") == "1" or os.environ.get("TGEM_REQUIRE_ISA"):
            pytest.fail("TGEM_REQUIRE_NATIVE/TGEM_REQUIRE_ISA set, but no flush-to-zero mode")
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        assert _flushes()
    finally:
        torch.set_flush_denormal(False)
    assert not _flushes()


@pytest.mark.parametrize(
    "backend", ["reference", "exact", "compiled", "native", "tree", "tree_native"]
)
def test_caller_floating_point_state_unchanged(backend):
    if backend in ("native", "tree_native"):
        _needs_native()
    if backend == "tree_native" and REQUIRE_NATIVE and _tree_native._LOAD_ERROR:
        pytest.fail(f"TGEM_REQUIRE_NATIVE=1 but {_tree_native._LOAD_ERROR}")
    if backend not in _cpu_backends():
        pytest.skip(f"{backend} does not run here: {backend_status('cpu')[backend]}")
    assert not _flushes()
    fn = resolve_backend(backend, torch.device("cpu"), torch.float32).fn
    q, k, v, grad = (t.float() for t in _sharp(scale=300.0))
    attention_and_grads(fn, q, k, v, grad)
    assert not _flushes(), f"{backend} left flush-to-zero on in the calling thread"
    # the model's path too (the native kernel's fused layer call)
    net = TGEMNet(48, 3, n_layers=1, n_heads=2, dropout=0.0, attention_backend=backend)
    with torch.no_grad():
        for layer in net.layers:
            layer.WQ.mul_(300.0)
            layer.WK.mul_(300.0)
    x = torch.rand(4, 48, generator=torch.Generator().manual_seed(1)) * 4
    net(x).sum().backward()
    assert not _flushes(), f"{backend} (model) left flush-to-zero on in the calling thread"


# ------------------------------------------------------------------ accuracy at sharp scales
def _fast_paths() -> list[str]:
    names = ["exact", "compiled"]
    if _native._LIB is not None or REQUIRE_NATIVE:
        names.append("native")
    return names


@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])
@pytest.mark.parametrize("backend", _fast_paths())
def test_float32_rule_at_sharp_scales(backend, scale):
    if backend == "native":
        _needs_native()
    if backend not in _cpu_backends():
        pytest.skip(f"{backend} does not run here: {backend_status('cpu')[backend]}")
    fn = resolve_backend(backend, torch.device("cpu"), torch.float32).fn
    for seed in range(3):
        q, k, v, grad = _sharp(g=64, scale=scale, seed=seed)
        assert_float32_rule(float32_errors(fn, q, k, v, grad))


@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])
@pytest.mark.parametrize("backend", ["exact", "compiled"])
def test_float64_matches_reference_at_sharp_scales(backend, scale):
    if backend not in _cpu_backends(torch.float64):
        pytest.skip(f"{backend} does not run here: {backend_status('cpu')[backend]}")
    fn = resolve_backend(backend, torch.device("cpu"), torch.float64).fn
    q, k, v, grad = _sharp(g=64, scale=scale)
    got = attention_and_grads(fn, q, k, v, grad)
    want = attention_and_grads(reference_attention, q, k, v, grad)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
        top = float(b.abs().max())
        err = float((a - b).abs().max())
        assert err <= 1e-10 * max(top, 1e-300), f"{name}: error {err:.3g} at scale {top:.3g}"


def test_eager_blocks_agree_with_unfloored_sums():
    # the floor changes the sums by less than rounding: float64 blocks against float64
    # exponentials computed without it (a row maximum term of 1, the rest tiny or zero)
    q, k, v, grad = (t.reshape(-1, t.shape[-1]) for t in _sharp(scale=300.0))
    out, m2, inv_z, e_diag = exact_forward(q, k, v)
    s = q[:, :, None] * k[:, None, :]
    e = torch.exp(s - s.amax(-1, keepdim=True))
    z = e.sum(-1)
    e = e * (1 - torch.eye(q.shape[-1], dtype=e.dtype))
    torch.testing.assert_close(out, (e * v[:, None, :]).sum(-1) / z, rtol=1e-12, atol=1e-300)
    dq, dk, dv = exact_backward(q, k, v, m2, inv_z, e_diag, out, grad)
    assert torch.isfinite(torch.stack([dq, dk, dv])).all()
