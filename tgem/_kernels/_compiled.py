"""The exact attention with its gene-pair reductions compiled by TorchInductor.

Pure PyTorch: the same algorithm as :func:`tgem._kernels._exact.exact_attention`, but each pass
over the gene pairs (the forward row sums; the backward column sums and row sums) is written
as one pointwise expression reduced along one axis and handed to :func:`torch.compile`.
Inductor fuses the score, the base-2 exponential, the products and the reduction into one
loop nest, so no block of the gene x gene matrix goes through memory: faster than the
blocked eager path on CPU (benchmarks/README.md), with the same O(batch x heads x genes)
memory.

Registered as the ``"compiled"`` attention backend, between the native kernel and the eager
exact path in ``"auto"``'s order. It needs a working :func:`torch.compile` (on CPU, a C++
compiler; on CUDA, Triton). The first call in a process compiles (seconds; Inductor caches
the result on disk for later processes); shapes are compiled dynamically, so a new batch
size or gene count does not recompile. Should compilation fail, the backend reports why
(:func:`tgem.show_versions`), warns once and computes on the eager exact path instead.
``TGEM_DISABLE_COMPILE=1`` switches it off.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import shutil
import warnings

import torch

from tgem._kernels._exact import (
    diagonal_exp2,
    exact_attention,
    exact_backward,
    exact_forward,
    exact_function,
    scaled_queries,
    scaled_row_max,
)
from tgem._kernels._registry import Backend, register_backend

logger = logging.getLogger(__name__)

_failures: dict[str, str] = {}  # device type -> why compilation failed there, once it has
_compiled: dict = {}


# ------------------------------------------------------------------ the compiled reductions
# Entry (i, j) of the base-2 exponent is hi_i k_j + lo_i k_j - m2_i (``scaled_queries``
# splits q log2(e) into two terms in float32; in float64 ``lo`` is zero). ``off`` excludes
# the diagonal inside the sums, as the eager path does.


def _exponent(hi, lo, k, m2):
    """The base-2 exponent of each entry, ``-inf`` below ``2 ** 64`` times the smallest normal.

    The fused loop multiplies each exponential by float32 weights (values, ``grad / Z``,
    ``grad q / Z``, keys) that can be far below 1, so keeping the exponentials normal is not
    enough: a term just above ``2 ** -126`` times such a weight is still a subnormal float (a
    microcode assist of about 100 cycles on x86; ATen's threads never flush them). With a
    floor of ``2 ** -62`` (float32; ``2 ** -958`` in float64) the products stay normal for
    weights down to ``2 ** -64`` (the floor ``2 ** -126`` did not keep a sharp attention's
    step from slowing down; ``benchmarks/bench_subnormal.py`` measures it). The dropped terms
    are below ``2 ** -62`` of a row whose largest term is 1: the sums move by at most
    ``genes * 2 ** -62`` relative (1.3e-14 at 60,000 genes), far below float32 rounding.
    NaN scores stay NaN (``NaN < floor`` is false).
    """
    k_row = k[:, None, :]
    y = hi[:, :, None] * k_row + lo[:, :, None] * k_row - m2[:, :, None]
    # literal constants: floats read from a module-level dict here gave a different compiled
    # kernel, measured at 2.8x the float32 error in dk (765 genes, scale 0.5)
    floor = -62.0 if y.dtype == torch.float32 else -958.0
    return torch.where(y < floor, -math.inf, y)


def _off_diagonal(idx):
    # ``idx`` is arange(G) in the data's float dtype (exact below 2**24 genes): a float
    # comparison vectorises as wide as the data, an int64 iota at half the width (measured:
    # the mask then costs nothing instead of a third of the kernel's time)
    return idx[:, None] != idx[None, :]


def _forward_rows(hi, lo, k, v, m2, idx):
    """Z_i (diagonal included: it is zeroed after the softmax) and sum_{j != i} e_ij v_j."""
    e = torch.exp2(_exponent(hi, lo, k, m2))
    z = e.sum(-1)
    numerator = torch.where(_off_diagonal(idx), e * v[:, None, :], 0.0).sum(-1)
    return z, numerator


def _backward_columns(hi, lo, k, v, m2, out, w1, w2, idx):
    """dv_j = sum_{i != j} e_ij w1_i and sum_{i != j} e_ij (v_j - out_i) w2_i (rows i)."""
    e = torch.exp2(_exponent(hi, lo, k, m2))
    off = _off_diagonal(idx)  # applied to each product: masking e itself runs 7x slower
    dv = torch.where(off, e * w1[:, :, None], 0.0).sum(1)
    dk = torch.where(off, e * (v[:, None, :] - out[:, :, None]) * w2[:, :, None], 0.0).sum(1)
    return dv, dk


def _backward_rows(hi, lo, k, v, m2, out, idx):
    """sum_{j != i} e_ij (v_j - out_i) k_j, centred element by element like the eager path."""
    e = torch.where(_off_diagonal(idx), torch.exp2(_exponent(hi, lo, k, m2)), 0.0)
    return (e * (v[:, None, :] - out[:, :, None]) * k[:, None, :]).sum(-1)


_FUNCTIONS = {
    "forward_rows": _forward_rows,
    "backward_columns": _backward_columns,
    "backward_rows": _backward_rows,
}


def _compiled_fn(name: str):
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = torch.compile(_FUNCTIONS[name], dynamic=True, fullgraph=True)
    return fn


def _fail(device_type: str, exc: BaseException) -> None:
    first = (str(exc).splitlines() or [""])[0][:300]
    reason = _failures[device_type] = f"torch.compile failed: {type(exc).__name__}: {first}"
    warnings.warn(
        f"attention_backend='compiled' on {device_type}: {reason}. Computing on the eager "
        "exact path instead (same results, slower). Set TGEM_DISABLE_COMPILE=1 to skip the "
        "attempt.",
        RuntimeWarning,
        stacklevel=3,
    )


def _make_compile_settings():
    """Settings for the compiled calls: shapes stay generic instead of multiplying graphs.

    Without them every coincidence of sizes (batch x heads equal to the gene count: "duck
    shaping") and every size-1 dimension adds a graph, and the default limit of 8 graphs per
    function is soon reached in a long session (many models, float32 and float64). Built once
    (building them costs ~1 ms, entering them ~10 us) and entered around each call only, so
    torch's global settings are untouched between calls.
    """
    try:
        import torch._dynamo.config as dynamo_config
        import torch.fx.experimental._config as fx_config

        return (dynamo_config.patch(recompile_limit=64), fx_config.patch(use_duck_shape=False))
    except Exception:  # private settings moved: run with torch's defaults
        return ()


_SETTINGS = _make_compile_settings()


def _run(name: str, *args):
    """The compiled function's result, or ``None`` once compilation has failed."""
    device_type = args[0].device.type
    if device_type in _failures:
        return None
    try:
        with contextlib.ExitStack() as stack:
            for setting in _SETTINGS:
                stack.enter_context(setting)
            return _compiled_fn(name)(*args)
    except (torch.OutOfMemoryError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a compiler problem must not stop a fit
        if "CUDA error" in str(exc) or "AcceleratorError" in type(exc).__name__:
            raise  # the device itself failed: falling back would only fail again, less clearly
        _fail(device_type, exc)
        return None


def _split_queries(q):
    q2 = scaled_queries(q)
    hi = q2[..., 0].contiguous()
    lo = q2[..., 1].contiguous() if q2.shape[-1] > 1 else torch.zeros_like(hi)
    idx = torch.arange(q.shape[-1], dtype=q.dtype, device=q.device)
    return q2, hi, lo, idx


# ------------------------------------------------------------------ the two passes
def compiled_forward(q, k, v):
    """:func:`tgem._kernels._exact.exact_forward`'s results from the compiled row sums."""
    q2, hi, lo, idx = _split_queries(q)
    m2 = scaled_row_max(q2, k)
    sums = _run("forward_rows", hi, lo, k, v, m2, idx)
    if sums is None:  # compilation failed: the eager blocked sums
        return exact_forward(q, k, v)
    z, numerator = sums
    e_diag = diagonal_exp2(q2, k, m2)
    inv_z = z.reciprocal()
    return numerator * inv_z, m2, inv_z, e_diag


def compiled_backward(q, k, v, m2, inv_z, e_diag, out, grad):
    """:func:`tgem._kernels._exact.exact_backward`'s results from the compiled sums."""
    w1 = grad * inv_z
    w2 = w1 * q
    _, hi, lo, idx = _split_queries(q)
    cols = _run("backward_columns", hi, lo, k, v, m2, out, w1, w2, idx)
    rows = _run("backward_rows", hi, lo, k, v, m2, out, idx) if cols is not None else None
    if rows is None:  # compilation failed: the eager blocked sums, same saved state
        return exact_backward(q, k, v, m2, inv_z, e_diag, out, grad)
    dv, dk = cols
    diag = e_diag * out
    return w1 * (rows - diag * k), dk - diag * w2, dv


_CompiledAttention = exact_function("compiled", compiled_forward, compiled_backward)


def compiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact T-GEM attention with the gene-pair sums compiled by ``torch.compile``.

    Same result as :func:`tgem._kernels._reference.reference_attention` (to rounding) in
    O(batch x heads x genes) memory; differentiable once. Falls back to
    :func:`tgem._kernels._exact.exact_attention` if compilation fails.

    Parameters
    ----------
    q, k, v : torch.Tensor of shape (batch, heads, genes)

    Returns
    -------
    torch.Tensor of shape (batch, heads, genes)

    Examples
    --------
    >>> import torch
    >>> from tgem._kernels import reference_attention
    >>> q, k, v = torch.randn(3, 2, 1, 5, dtype=torch.float64).unbind(0)
    >>> torch.allclose(compiled_attention(q, k, v), reference_attention(q, k, v))
    True
    """
    if q.device.type in _failures:
        return exact_attention(q, k, v)
    return _CompiledAttention.apply(q, k, v)


# ------------------------------------------------------------------ availability
def _cpp_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # private API, or no compiler: look for the usual names
        for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
            if name and shutil.which(name):
                return name
    return None


def compiled_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when the compiled backend can run on ``device``/``dtype``, else why not."""
    if os.environ.get("TGEM_DISABLE_COMPILE", "") not in ("", "0"):
        return "disabled by TGEM_DISABLE_COMPILE"
    if device.type in _failures:
        return _failures[device.type]
    if dtype not in (torch.float32, torch.float64):
        return f"float32 and float64 only, not {dtype}"
    if device.type == "cpu":
        if _cpp_compiler() is None:
            return "torch.compile needs a C++ compiler on CPU and none was found (set CXX)"
        return None
    if device.type == "cuda":
        return _cuda_unavailable(device)
    return f"not supported on {device.type}"


def _cuda_unavailable(device: torch.device) -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        return "TRITON_INTERPRET is set: Inductor's kernels would run in Triton's interpreter"
    if importlib.util.find_spec("triton") is None:
        return "torch.compile needs Triton on CUDA (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton does not import: {type(exc).__name__}: {exc}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return f"Inductor needs compute capability 7.0 or newer, this GPU has {major}.{minor}"
    return None


register_backend(Backend("compiled", compiled_attention, compiled_unavailable, priority=5))
