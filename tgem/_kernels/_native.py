"""The native CPU kernel of the exact attention: loader, autograd function, backend ``"native"``.

The kernel library ``tgem._tgem_kernels`` is plain C (``tgem/_csrc/tgem_kernels.c``), built by
the package's setuptools extension and loaded here with :mod:`ctypes` by path; it never links
to PyTorch and works on the raw buffers of contiguous float32 tensors (no copy). It computes
the algorithm of :func:`tgem._kernels._exact.exact_forward` and
:func:`tgem._kernels._exact.exact_backward`, fused into one pass over the gene pairs each: each
exponent one fused multiply-subtract of the scaled query (``q log2 e``, rounded once), a
degree-5 polynomial base-2 exponential, blocked sums, and a fixed reduction order that makes
the result bitwise independent of the number of threads (``torch.get_num_threads()``).

The model calls the kernel one layer at a time (:func:`native_layer`, the backend's
``layer_fn``): the q/k/v products, the head mixing with ``W_0`` and, backwards, the input and
weight gradients are done in C around the two passes, which removes 48 PyTorch operator
calls per layer and training step (measured by ``benchmarks/bench_native_kernel.py
--compare-composed``; results in benchmarks/README.md). :func:`native_attention` is the
attention alone, on given q, k and v.

The instruction set is chosen at run time: AVX-512F, AVX2+FMA or portable scalar code. Force
one with the environment variable ``TGEM_NATIVE_ISA=scalar|avx2|avx512`` or with
:func:`set_isa`. ``TGEM_DISABLE_NATIVE=1`` hides the backend (``"auto"`` then uses ``"exact"``).
Importing this module never fails because the library is missing: the backend then reports why
it is unavailable, and :func:`native_status` says so.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os

import torch

from tgem._kernels._exact import exact_function
from tgem._kernels._registry import Backend, check_once_differentiable, register_backend

logger = logging.getLogger(__name__)

#: Instruction-set paths of the kernel, by the code the C library uses for them.
ISAS = ("scalar", "avx2", "avx512")
_ABI_VERSION = 3
_ERRORS = {
    -1: "invalid arguments",
    -2: "instruction set not supported by this CPU",
    -3: "out of memory",
}

_c_float_p = ctypes.c_void_p  # raw data pointers (tensor.data_ptr())


def _load_library() -> tuple[ctypes.CDLL | None, str | None, str | None]:
    """Locate and load the compiled kernel; returns ``(lib, path, reason_if_not_loaded)``."""
    try:
        spec = importlib.util.find_spec("tgem._tgem_kernels")
    except (ImportError, ValueError) as exc:
        spec = None
        logger.debug("find_spec failed: %s", exc)
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return (
            None,
            None,
            (
                "extension not built (tgem._tgem_kernels not found; install tgem "
                "with a C compiler available: pip install -e .)"
            ),
        )
    return _open_library(spec.origin)


def _open_library(path: str) -> tuple[ctypes.CDLL | None, str | None, str | None]:
    """Load the kernel library at ``path`` and declare its C signatures."""
    try:
        lib = ctypes.CDLL(path)
        version = lib.tgem_abi_version()
    except (OSError, AttributeError) as exc:
        return None, path, f"extension could not be loaded from {path}: {exc}"
    if version != _ABI_VERSION:
        return (
            None,
            path,
            (
                f"extension at {path} has ABI version {version}, expected "
                f"{_ABI_VERSION}; rebuild it with pip install -e ."
            ),
        )
    ptr, i64, cint = _c_float_p, ctypes.c_int64, ctypes.c_int
    lib.tgem_isa_supported.argtypes = [cint]
    lib.tgem_isa_supported.restype = cint
    lib.tgem_forward.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, cint, cint]
    lib.tgem_forward.restype = cint
    lib.tgem_backward.argtypes = [ptr] * 8 + [i64, i64, ptr, ptr, ptr, cint, cint]
    lib.tgem_backward.restype = cint
    lib.tgem_layer_forward.argtypes = [ptr] * 5 + [i64] * 3 + [ptr] * 8 + [cint, cint]
    lib.tgem_layer_forward.restype = cint
    lib.tgem_layer_backward.argtypes = [ptr] * 13 + [i64] * 3 + [ptr] * 5 + [cint, cint]
    lib.tgem_layer_backward.restype = cint
    lib.tgem_exp2.argtypes = [ptr, ptr, i64, cint]
    lib.tgem_exp2.restype = cint
    return lib, path, None


_LIB, _LIB_PATH, _LOAD_ERROR = _load_library()
_forced_isa: str | None = None


def supported_isas() -> list[str]:
    """Instruction-set paths this processor can run (empty when the library is not loaded).

    Examples
    --------
    >>> set(supported_isas()) <= {"scalar", "avx2", "avx512"}
    True
    """
    if _LIB is None:
        return []
    return [name for code, name in enumerate(ISAS) if _LIB.tgem_isa_supported(code)]


def set_isa(name: str | None) -> str | None:
    """Force the kernel's instruction-set path (``None`` restores automatic choice).

    Takes precedence over the environment variable ``TGEM_NATIVE_ISA``.

    Parameters
    ----------
    name : {"scalar", "avx2", "avx512"} or None

    Returns
    -------
    str or None
        The previously forced path, so that callers can restore it.

    Examples
    --------
    >>> previous = set_isa("scalar")
    >>> _ = set_isa(previous)
    """
    global _forced_isa
    if name is not None and name not in ISAS:
        raise ValueError(f"Unknown native instruction set {name!r}; choose one of {ISAS} or None.")
    previous, _forced_isa = _forced_isa, name
    return previous


def _requested_isa() -> tuple[str | None, str]:
    """The requested path (or None for automatic) and where the request comes from."""
    if _forced_isa is not None:
        return _forced_isa, "set_isa()"
    env = os.environ.get("TGEM_NATIVE_ISA", "").strip().lower()
    if env in ("", "auto"):
        return None, "automatic"
    return env, "TGEM_NATIVE_ISA"


def _active_isa() -> tuple[str | None, str]:
    """``(isa, explanation)``; ``isa`` is None when the kernel cannot run, with the reason."""
    if _LIB is None:
        return None, _LOAD_ERROR or "extension not loaded"
    supported = supported_isas()
    requested, source = _requested_isa()
    if requested is None:
        return supported[-1], f"best supported by this CPU (supported: {', '.join(supported)})"
    if requested not in ISAS:
        return None, (
            f"{source}={requested!r} is not one of {', '.join(ISAS)}; unset it or pick one of these"
        )
    if requested not in supported:
        return None, (
            f"{source} asks for {requested}, which this CPU does not support "
            f"(supported: {', '.join(supported)})"
        )
    return requested, f"forced by {source} (supported: {', '.join(supported)})"


def _disabled() -> str | None:
    value = os.environ.get("TGEM_DISABLE_NATIVE", "").strip()
    if value not in ("", "0"):
        return f"disabled by TGEM_DISABLE_NATIVE={value}"
    return None


def native_status() -> str:
    """One line: which instruction-set path the native kernel uses and why, or why it cannot run.

    Examples
    --------
    >>> isinstance(native_status(), str)
    True
    """
    disabled = _disabled()
    if disabled:
        return f"native kernel {disabled}"
    isa, why = _active_isa()
    if isa is None:
        return f"native kernel unavailable: {why}"
    return (
        f"native kernel {isa}: {why}; threads follow torch.get_num_threads() "
        f"(now {torch.get_num_threads()}); library {_LIB_PATH}"
    )


def _unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Backend hook: None when the kernel runs on ``device``/``dtype``, else the reason."""
    disabled = _disabled()
    if disabled:
        return disabled
    isa, why = _active_isa()
    if isa is None:
        return why
    if torch.device(device).type != "cpu":
        return f"the native kernel runs on CPU tensors only, not {torch.device(device).type}"
    if dtype == torch.float64:
        return "float64 uses the pure path ('exact'); the native kernel is float32 only"
    if dtype != torch.float32:
        return f"{dtype} is not supported; the native kernel is float32 only"
    return None


def native_available() -> bool:
    """Whether the native kernel can run now on CPU float32 tensors.

    Examples
    --------
    >>> native_available() in (True, False)
    True
    """
    return _unavailable(torch.device("cpu"), torch.float32) is None


def _isa_code() -> int:
    isa, why = _active_isa()
    if isa is None:
        raise RuntimeError(
            f"The native attention kernel cannot run: {why}. Use "
            "attention_backend='exact' (or 'auto') instead."
        )
    return ISAS.index(isa)


def _check(tensors: dict[str, torch.Tensor], shape: torch.Size, dims: int = 2) -> None:
    for name, x in tensors.items():
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(
                f"{name} is {x.dtype} on {x.device}; the native kernel needs "
                "float32 CPU tensors (use the 'exact' backend otherwise)."
            )
        if x.shape != shape or x.dim() != dims or not x.is_contiguous():
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} (contiguous={x.is_contiguous()})"
                f"; expected a contiguous tensor of shape {tuple(shape)}."
            )


def _raise_on(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"native {what} failed: {_ERRORS.get(code, f'error code {code}')}.")


def native_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Native counterpart of :func:`tgem._kernels._exact.exact_forward`, on contiguous float32.

    Returns
    -------
    out, m2, inv_z, e_diag : torch.Tensor of shape (N, G)
        As ``exact_forward``: the output, the base-2 row maxima, ``1 / Z`` and the diagonal
        exponentials.

    Examples
    --------
    >>> import torch
    >>> q, k, v = torch.randn(3, 2, 5).unbind(0)
    >>> if native_available():
    ...     out, m2, inv_z, e_diag = native_forward(q, k, v)
    ...     print(tuple(out.shape))
    ... else:  # the kernel is not built here: the same shape from the pure path
    ...     print((2, 5))
    (2, 5)
    """
    n, g = q.shape
    _check({"q": q, "k": k, "v": v}, q.shape)
    isa = _isa_code()
    out, m2, inv_z, e_diag = (torch.empty(n, g, dtype=torch.float32) for _ in range(4))
    code = _LIB.tgem_forward(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        n,
        g,
        out.data_ptr(),
        m2.data_ptr(),
        inv_z.data_ptr(),
        e_diag.data_ptr(),
        isa,
        torch.get_num_threads(),
    )
    _raise_on(code, "attention forward")
    return out, m2, inv_z, e_diag


def native_backward(q, k, v, m2, inv_z, e_diag, out, grad):
    """Native counterpart of :func:`tgem._kernels._exact.exact_backward`; returns ``dq, dk, dv``.

    All arguments are contiguous (N, G) float32 CPU tensors: the inputs, the outputs of
    :func:`native_forward` (or of ``exact_forward``) and the upstream gradient ``grad``.
    """
    _check(
        {
            "q": q,
            "k": k,
            "v": v,
            "m2": m2,
            "inv_z": inv_z,
            "e_diag": e_diag,
            "out": out,
            "grad": grad,
        },
        q.shape,
    )
    isa = _isa_code()
    n, g = q.shape
    dq, dk, dv = (torch.empty(n, g, dtype=torch.float32) for _ in range(3))
    code = _LIB.tgem_backward(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        m2.data_ptr(),
        inv_z.data_ptr(),
        e_diag.data_ptr(),
        out.data_ptr(),
        grad.data_ptr(),
        n,
        g,
        dq.data_ptr(),
        dk.data_ptr(),
        dv.data_ptr(),
        isa,
        torch.get_num_threads(),
    )
    _raise_on(code, "attention backward")
    return dq, dk, dv


def native_exp2(y: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """``2**y`` computed by the kernels' own exponential (for accuracy tests).

    Parameters
    ----------
    y : torch.Tensor
        Float32 values (any shape; not modified).
    isa : {"scalar", "avx2", "avx512"}, optional
        Path to use; the active one by default.

    Examples
    --------
    >>> import torch
    >>> y = torch.tensor([0.0, 1.0, -1.0])
    >>> (native_exp2(y) if native_available() else torch.exp2(y)).tolist()
    [1.0, 2.0, 0.5]
    """
    code = _isa_code() if isa is None else ISAS.index(isa)
    x = y.detach().to(torch.float32).contiguous()
    res = torch.empty_like(x)
    _raise_on(_LIB.tgem_exp2(x.data_ptr(), res.data_ptr(), x.numel(), code), "exp2")
    return res


_NativeAttention = exact_function("native", native_forward, native_backward)


def _check_layer(x, wq, wk, wv, w0) -> tuple[int, int, int]:
    b, g = x.shape if x.dim() == 2 else (None, None)
    if b is None or wq.dim() != 3 or wq.shape[-1] != 1 or wq.shape[1] != g:
        raise ValueError(
            f"x has shape {tuple(x.shape)} and WQ {tuple(wq.shape)}; expected "
            "(batch, genes) and (heads, genes, 1)."
        )
    h = wq.shape[0]
    _check({"x": x}, x.shape)
    _check({"WQ": wq, "WK": wk, "WV": wv}, wq.shape, dims=3)
    _check({"W_0": w0}, torch.Size([h]), dims=1)
    return b, h, g


def native_layer_forward(x, wq, wk, wv, w0):
    """A whole layer's attention in one kernel call: ``(mixed, saved)``.

    ``x`` is a contiguous (batch, genes) float32 CPU tensor, ``wq, wk, wv`` are (heads, genes,
    1) and ``w0`` is (heads,). ``mixed`` (batch, genes) equals
    ``einsum("bhg,h->bg", attention(x WQ, x WK, x WV), W_0)`` to rounding; ``saved`` holds
    ``q, k, v, out, m2, inv_z, e_diag`` ((batch x heads, genes) each) for
    :func:`native_layer_backward`.

    Examples
    --------
    >>> import torch
    >>> from tgem._kernels import reference_attention
    >>> x = torch.rand(2, 6)
    >>> wq, wk, wv = torch.randn(3, 4, 6, 1).unbind(0)
    >>> w0 = torch.randn(4)
    >>> xb = x.unsqueeze(1)
    >>> plain = torch.einsum("bhg,h->bg", reference_attention(xb * wq[..., 0], xb * wk[..., 0],
    ...                                                       xb * wv[..., 0]), w0)
    >>> mixed = native_layer_forward(x, wq, wk, wv, w0)[0] if native_available() else plain
    >>> bool(torch.allclose(mixed, plain, atol=1e-5))
    True
    """
    b, h, g = _check_layer(x, wq, wk, wv, w0)
    isa = _isa_code()
    # one allocation for the arrays kept for the backward pass (separate ones of this size can each
    # come back from the operating system as fresh pages, about 1,200 page faults per call
    # at 1708 genes, batch 16 and 5 heads)
    q, k, v, out, m2, inv_z, e_diag = torch.empty(7, b * h, g, dtype=torch.float32).unbind(0)
    mixed = torch.empty(b, g, dtype=torch.float32)
    code = _LIB.tgem_layer_forward(
        x.data_ptr(),
        wq.data_ptr(),
        wk.data_ptr(),
        wv.data_ptr(),
        w0.data_ptr(),
        b,
        h,
        g,
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        m2.data_ptr(),
        inv_z.data_ptr(),
        e_diag.data_ptr(),
        mixed.data_ptr(),
        isa,
        torch.get_num_threads(),
    )
    _raise_on(code, "attention layer forward")
    return mixed, (q, k, v, out, m2, inv_z, e_diag)


def native_layer_backward(x, wq, wk, wv, w0, saved, grad):
    """Gradients ``dx, dWQ, dWK, dWV, dW_0`` of a layer from :func:`native_layer_forward`'s
    ``saved`` tensors and the upstream gradient ``grad`` (batch, genes)."""
    b, h, g = _check_layer(x, wq, wk, wv, w0)
    _check({"grad": grad}, x.shape)
    q, k, v, out, m2, inv_z, e_diag = saved
    isa = _isa_code()
    dx = torch.empty(b, g, dtype=torch.float32)
    dwq, dwk, dwv = (torch.empty(h, g, 1, dtype=torch.float32) for _ in range(3))
    dw0 = torch.empty(h, dtype=torch.float32)
    code = _LIB.tgem_layer_backward(
        x.data_ptr(),
        wq.data_ptr(),
        wk.data_ptr(),
        wv.data_ptr(),
        w0.data_ptr(),
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        m2.data_ptr(),
        inv_z.data_ptr(),
        e_diag.data_ptr(),
        out.data_ptr(),
        grad.data_ptr(),
        b,
        h,
        g,
        dx.data_ptr(),
        dwq.data_ptr(),
        dwk.data_ptr(),
        dwv.data_ptr(),
        dw0.data_ptr(),
        isa,
        torch.get_num_threads(),
    )
    _raise_on(code, "attention layer backward")
    return dx, dwq, dwk, dwv, dw0


class _NativeLayer(torch.autograd.Function):
    """Autograd function of :func:`native_layer` (differentiable once)."""

    @staticmethod
    def forward(ctx, x, wq, wk, wv, w0):
        x, wq, wk, wv, w0 = (t.contiguous() for t in (x, wq, wk, wv, w0))
        mixed, saved = native_layer_forward(x, wq, wk, wv, w0)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, wq, wk, wv, w0, *saved)
        return mixed

    @staticmethod
    def backward(ctx, grad):
        check_once_differentiable("native")
        x, wq, wk, wv, w0, *saved = ctx.saved_tensors
        grads = native_layer_backward(x, wq, wk, wv, w0, saved, grad.contiguous())
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def native_layer(x, wq, wk, wv, w0):
    """One T-GEM layer's mixed attention output by the native kernel, in one call.

    Equals ``einsum("bhg,h->bg", native_attention(x WQ, x WK, x WV), W_0)`` (the q, k, v
    products rounded as PyTorch rounds them; the head mix and the weight gradients summed in
    double), without the PyTorch operator calls around the kernel. Differentiable once.

    Parameters
    ----------
    x : torch.Tensor of shape (batch, genes), float32 on CPU
    wq, wk, wv : torch.Tensor of shape (heads, genes, 1)
    w0 : torch.Tensor of shape (heads,)

    Returns
    -------
    torch.Tensor of shape (batch, genes)
    """
    return _NativeLayer.apply(x, wq, wk, wv, w0)


def native_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact T-GEM attention by the native CPU kernel (float32 CPU tensors).

    Same result as :func:`tgem._kernels._exact.exact_attention` to float32 rounding, differentiable
    once, memory O(batch x heads x genes).

    Parameters
    ----------
    q, k, v : torch.Tensor of shape (batch, heads, genes), float32 on CPU

    Returns
    -------
    torch.Tensor of shape (batch, heads, genes)

    Examples
    --------
    >>> import torch
    >>> from tgem._kernels import reference_attention
    >>> q, k, v = torch.randn(3, 2, 1, 5).unbind(0)
    >>> out = native_attention(q, k, v) if native_available() else reference_attention(q, k, v)
    >>> bool(torch.allclose(out, reference_attention(q, k, v), atol=1e-5))
    True
    """
    return _NativeAttention.apply(q, k, v)


register_backend(
    Backend(
        "native",
        native_attention,
        _unavailable,
        priority=10,
        layer_fn=native_layer,
        describe=native_status,
    )
)
