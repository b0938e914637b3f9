"""The tree code in C: backend ``"tree_native"``.

Two implementations, one algorithm: :mod:`tgem._kernels._tree` is the tree code in pure
PyTorch (backend ``"tree"``, any device), and this module runs the same algorithm in the
native extension (``tgem/_csrc/tree.c``, in the library ``tgem._tgem_kernels`` that
:mod:`tgem._kernels._native` loads). The parameters come from ``_tree`` (``RHO``, ``LEAF``,
the order ``P``, ``CUT`` from the tolerance, ``EXP_FLOOR``), and so do the formulas: the
attention's forward and backward passes are each one C call (``tgem_tree_forward``,
``tgem_tree_backward``) that does per (batch x head) row what
:func:`tgem._kernels._tree.tree_forward` and ``tree_backward`` do with PyTorch operations: the
rank-1 reduction, the row sums (forward, the query gradient's) and column sums (key and value
gradients), the diagonal, the elementwise parts of the gradients and the rounding to the input
dtype (subnormal results flushed to zero). It reads float32 or float64 inputs as they are (no
float64 copies), checks them finite (a non-finite input raises the pure tree's
``ValueError``, word for word) and keeps four float64 (N, G) arrays for the backward. The
entropy (:func:`tree_native_entropy_rows`) runs its row sums in C
(``tgem_tree_row_sums``, through :class:`_NativeSides`) and its elementwise parts in
``_tree``. All sums are float64, one row per task on the dense kernel's threads
(``torch.get_num_threads()``), so the results are bitwise independent of the thread count and
the caller's floating-point state is restored. The code is compiled for the baseline
architecture and for AVX2, chosen at run time with the dense kernel's instruction set
(``TGEM_NATIVE_ISA``, :func:`tgem._kernels._native.set_isa`; AVX-512 runs the AVX2 code);
multiply-adds are not contracted, so both give bitwise the same results. Its exponentials are
its own (within 1 ulp) and its tree expansions use the fewest Taylor terms that meet the
tolerance at each node and target (the pure-PyTorch code uses ``P`` inside the tree), so the
two implementations agree within the tolerance, not bitwise.

Which runs when: ``attention_backend="tree"`` always runs the pure-PyTorch code,
``"tree_native"`` always the C code (CPU tensors, float32 or float64, the extension built and
not disabled by ``TGEM_DISABLE_NATIVE=1``; otherwise it is unavailable and says why).
``"auto"`` runs this backend instead of the dense native kernel where it is faster, by the
fixed rule of :func:`auto_reach` (gene count and the call's score reach); it never picks the
pure-PyTorch ``"tree"``, so without the extension ``"auto"`` stays dense.
"""

from __future__ import annotations

import ctypes
import math

import torch

from tgem._kernels import _native
from tgem._kernels import _tree as tree
from tgem._kernels._registry import Backend, check_once_differentiable, register_backend

_ABI_VERSION = 2
_ERRORS = {-1: "invalid arguments", -3: "out of memory", -4: "non-finite input"}
_NON_FINITE = -4


def _declare(lib) -> str | None:
    """Declare the C signatures on the loaded library; the reason when it lacks them."""
    if lib is None:
        return _native._LOAD_ERROR or "extension not loaded"
    try:
        version = lib.tgem_tree_abi_version()
    except AttributeError:
        return (
            f"the extension at {_native._LIB_PATH} has no tree code (built before it); "
            "rebuild it with pip install -e ."
        )
    if version != _ABI_VERSION:
        return (
            f"the extension's tree code has ABI version {version}, expected {_ABI_VERSION}; "
            "rebuild it with pip install -e ."
        )
    ptr, i64, cint, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    params = [cint, dbl, dbl, dbl, i64, dbl]  # order, rho, cut, clamp, leaf, tol
    lib.tgem_tree_row_sums.argtypes = [ptr] * 4 + [i64, i64, cint] + params + [ptr, ptr, cint, cint]
    lib.tgem_tree_row_sums.restype = cint
    lib.tgem_tree_column_sums.argtypes = (
        [ptr] * 3 + [i64, i64, cint] + params + [ptr, ptr] + [cint] * 2
    )
    lib.tgem_tree_column_sums.restype = cint
    # forward: q, k, v, f32, n, g, with_grad, params, exp_floor, y, out, z, r, kk, counts, isa,
    # threads; backward: q, k, v, grad, f32, out, z, r, kk, n, g, params, exp_floor, dq, dk,
    # dv, counts, isa, threads
    lib.tgem_tree_forward.argtypes = (
        [ptr] * 3 + [cint, i64, i64, cint] + params + [dbl] + [ptr] * 6 + [cint, cint]
    )
    lib.tgem_tree_forward.restype = cint
    lib.tgem_tree_backward.argtypes = (
        [ptr] * 4 + [cint] + [ptr] * 4 + [i64, i64] + params + [dbl] + [ptr] * 4 + [cint, cint]
    )
    lib.tgem_tree_backward.restype = cint
    return None


_LOAD_ERROR = _declare(_native._LIB)
#: Work counters the C code adds to when set to an int64 tensor of 4 entries (tests only):
#: sums by one expansion (the cheap case), sums through the tree, expansions evaluated in the
#: tree, points summed directly at the leaves.
work_counts: torch.Tensor | None = None


def _add_counts(counts: torch.Tensor) -> None:
    if work_counts is not None:
        work_counts.add_(counts)


def _params(p: tree.TreeParameters) -> tuple:
    return (p.order, p.rho, p.cut, p.cut + tree.EXP_MARGIN, tree.LEAF, p.tol)


def _raise_on(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(
            f"native tree {what} failed: {_ERRORS.get(code, f'error code {code}')}. "
            "Use attention_backend='tree' (pure PyTorch) instead."
        )


def _ready() -> None:
    reason = _unavailable(torch.device("cpu"), torch.float64)
    if reason is not None:
        raise RuntimeError(
            f"The native tree code cannot run: {reason}. Use attention_backend='tree' instead."
        )


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64).contiguous()


class _NativeSides(tree._Sides):
    """:class:`tgem._kernels._tree._Sides` whose row and column sums run in C."""

    def row_sums(self, weights, params: tree.TreeParameters) -> torch.Tensor:
        _ready()
        plus, minus = weights if isinstance(weights, tuple) else (weights, weights)
        plus, minus = _f64(plus), _f64(minus)
        q, k = _f64(self.q), _f64(self.k)
        n, g = q.shape
        out = torch.empty(n, g, plus.shape[-1], dtype=torch.float64)
        counts = torch.zeros(4, dtype=torch.int64)
        code = _native._LIB.tgem_tree_row_sums(
            q.data_ptr(), k.data_ptr(), plus.data_ptr(), minus.data_ptr(), n, g,
            plus.shape[-1], *_params(params), out.data_ptr(), counts.data_ptr(),
            _native._isa_code(), torch.get_num_threads(),
        )  # fmt: skip
        _raise_on(code, "row sums")
        _add_counts(counts)
        return out

    def column_sums(self, coeffs: torch.Tensor, params: tree.TreeParameters) -> torch.Tensor:
        _ready()
        coeffs = _f64(coeffs)
        q, k = _f64(self.q), _f64(self.k)
        n, g = q.shape
        out = torch.empty(n, g, coeffs.shape[-1], dtype=torch.float64)
        counts = torch.zeros(4, dtype=torch.int64)
        code = _native._LIB.tgem_tree_column_sums(
            q.data_ptr(), k.data_ptr(), coeffs.data_ptr(), n, g, coeffs.shape[-1],
            *_params(params), out.data_ptr(), counts.data_ptr(), _native._isa_code(),
            torch.get_num_threads(),
        )  # fmt: skip
        _raise_on(code, "column sums")
        _add_counts(counts)
        return out


def _fused_forward(q, k, v, params: tree.TreeParameters, with_grad: bool):
    """The fused forward in C on (N, G) contiguous float32 or float64 rows: the output in
    their dtype and, with ``with_grad``, the backward's float64 ``out, z, r, kk``."""
    _ready()
    n, g = q.shape
    y = torch.empty_like(q)
    saved = [torch.empty(n, g, dtype=torch.float64) for _ in range(4)] if with_grad else []
    ptrs = [x.data_ptr() for x in saved] if with_grad else [None] * 4
    counts = torch.zeros(4, dtype=torch.int64)
    code = _native._LIB.tgem_tree_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), q.dtype == torch.float32, n, g, with_grad,
        *_params(params), tree.EXP_FLOOR, y.data_ptr(), *ptrs, counts.data_ptr(),
        _native._isa_code(), torch.get_num_threads(),
    )  # fmt: skip
    if code == _NON_FINITE:
        tree._check_inputs(q, k, v)  # raises the pure tree's error, naming the input
    _raise_on(code, "forward")
    _add_counts(counts)
    return y, saved


def _fused_backward(q, k, v, grad, saved, params: tree.TreeParameters):
    """The fused backward in C: ``dq, dk, dv`` in the inputs' dtype."""
    _ready()
    n, g = q.shape
    grads = [torch.empty_like(q) for _ in range(3)]
    counts = torch.zeros(4, dtype=torch.int64)
    code = _native._LIB.tgem_tree_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), grad.data_ptr(), q.dtype == torch.float32,
        *(x.data_ptr() for x in saved), n, g, *_params(params), tree.EXP_FLOOR,
        *(x.data_ptr() for x in grads), counts.data_ptr(), _native._isa_code(),
        torch.get_num_threads(),
    )  # fmt: skip
    _raise_on(code, "backward")
    _add_counts(counts)
    return grads


class _TreeNativeAttention(torch.autograd.Function):
    """The tree code's attention with the forward and the backward each one C call (the
    formulas of :func:`tgem._kernels._tree.tree_forward` and ``tree_backward``)."""

    @staticmethod
    def forward(ctx, q, k, v, tol):
        shape, dtype = q.shape, q.dtype
        genes = shape[-1]
        params = tree.tree_parameters(dtype, genes, tol)
        q2, k2, v2 = (x.detach().reshape(-1, genes).contiguous() for x in (q, k, v))
        need = any(ctx.needs_input_grad[:3])
        y, saved = _fused_forward(q2, k2, v2, params, need)
        if need:
            ctx.save_for_backward(q2, k2, v2, *saved)
            ctx.params = params
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        check_once_differentiable("tree_native")
        q, k, v, *saved = ctx.saved_tensors
        g = grad.reshape(q.shape).to(q.dtype).contiguous()
        grads = _fused_backward(q, k, v, g, saved, ctx.params)
        return (*(x.reshape(ctx.shape) for x in grads), None)


def _check_cpu(q: torch.Tensor) -> None:
    if isinstance(q, torch.Tensor) and q.device.type != "cpu":
        raise ValueError(
            f"the native tree code runs on CPU tensors, got {q.device}; use "
            "attention_backend='tree' (pure PyTorch, any device) instead."
        )


def tree_native_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tol: float | None = None
) -> torch.Tensor:
    """T-GEM attention by the tree code, its sums in C (CPU tensors).

    The same algorithm, arguments, tolerance and errors as
    :func:`tgem._kernels._tree.tree_attention`; differentiable once.

    Parameters
    ----------
    q, k, v : torch.Tensor of shape (..., genes), float32 or float64 on CPU
    tol : float, optional
        Error tolerance (between 1e-13 and 0.1, :data:`tgem._kernels.TOL_RANGE`); ``None``
        takes the dtype's default (:data:`tgem._kernels._tree.DEFAULT_TOL`).

    Returns
    -------
    torch.Tensor, same shape and dtype as ``q``.

    Examples
    --------
    >>> import torch
    >>> from tgem._kernels import reference_attention
    >>> q, k, v = torch.randn(3, 2, 4, 50, dtype=torch.float64).unbind(0)
    >>> fn = tree_native_attention if tree_native_available() else reference_attention
    >>> bool(torch.allclose(fn(q, k, v), reference_attention(q, k, v)))
    True
    """
    tree._check_inputs(q, k, v, finite=False)  # the C forward checks finiteness per row
    _check_cpu(q)
    if tol is not None:
        tree.check_tol(tol)
    return _TreeNativeAttention.apply(q, k, v, tol)


@torch.no_grad()
def tree_native_entropy_rows(q: torch.Tensor, k: torch.Tensor, *, tol: float | None = None):
    """:func:`tgem._kernels._tree.tree_entropy_rows` with the sums in C (CPU tensors).

    Examples
    --------
    >>> import torch
    >>> from tgem._kernels import attention_entropy_rows
    >>> q, k = torch.randn(2, 3, 40, dtype=torch.float64).unbind(0)
    >>> fn = tree_native_entropy_rows if tree_native_available() else attention_entropy_rows
    >>> bool(torch.allclose(fn(q, k), attention_entropy_rows(q, k)))
    True
    """
    tree._check_inputs(q, k)
    _check_cpu(q)
    return tree.entropy_rows(q, k, tol, _NativeSides)


def _unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Backend hook: None when the native tree code runs on ``device``/``dtype``, else why not."""
    disabled = _native._disabled()
    if disabled:
        return disabled
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    isa, why = _native._active_isa()
    if isa is None:
        return why
    if torch.device(device).type != "cpu":
        return (
            f"the native tree code runs on CPU tensors only, not {torch.device(device).type} "
            "(use 'tree')"
        )
    return tree.tree_unavailable(device, dtype)


def tree_native_available() -> bool:
    """Whether the native tree code can run now on CPU tensors.

    Examples
    --------
    >>> tree_native_available() in (True, False)
    True
    """
    return _unavailable(torch.device("cpu"), torch.float32) is None


def tree_native_status() -> str:
    """One line: whether the native tree code runs, and why not.

    Examples
    --------
    >>> isinstance(tree_native_status(), str)
    True
    """
    reason = _unavailable(torch.device("cpu"), torch.float32)
    if reason is not None:
        return f"native tree code unavailable: {reason}"
    isa, why = _native._active_isa()
    code = "scalar" if isa == "scalar" else "AVX2"
    return (
        f"native tree code {code} (the native kernel's {isa}: {why}), float64 sums; threads "
        f"follow torch.get_num_threads() (now {torch.get_num_threads()}); "
        f"library {_native._LIB_PATH}"
    )


# ------------------------------------------------------------------------ auto's rule
# Where the numbers come from: benchmarks/results/tree_cpu.json (bench_tree.py --threads 2;
# one attention call, forward and backward, batch 16 x 5 heads, float32, default tolerance, on
# a quiet machine), the ratio of the dense native kernel's time to this backend's:
#
#   genes               765          1,708          5,000          22,283
#   reach <= 8          0.83 (0.71)  1.57 (0.43)    3.77 (0.18)    16.78 (0.04)
#   reach > 8           0.18, 0.27   0.38, 0.43     1.07, 1.03     5.99, 4.31
#                       (641, 64099) (390, 38983)   (160, 16005)   (36, 3578)
#
# (in brackets the calls' score reach, max|q| * range(k); weights as initialised, and the
# query and key weights x30 and x300). With reach <= 2 RHO = 8 every row is one expansion
# about its centre, no sort (the cheap case, whose time grows as genes against the dense
# genes^2): the ratio grows about linearly in genes and reaches 1 at 920 genes (from the
# 765-gene row) to 1,090 (from the 1,708-gene row); at 1,000 genes either estimate puts the
# slower choice within 10 % of the faster. Sharper calls run through the tree: the ratio grows
# as about genes^0.9 from 1,708 to 5,000 genes and reaches 1 at about 4,700 (0.9 at 4,200, 1.1
# at 5,250).
#
# A second run near the thresholds (benchmarks/results/tree_auto_rule.json: bench_tree.py
# --backends tree_native native auto --genes 900 1000 1100 1708 3000 4200 4700 5200 --scales
# 1 4 10 30) moved them: at 1,000 genes the dense kernel was 1.26x faster at reach 0.64 (1.02x
# slower at 1,100), and the break-even reach grows with the genes, as the dense cost (genes^2)
# outgrows the tree's (about genes times the terms per query): dense over tree 1.13 at reach
# 6.9 and 0.48 at 43 (1,708 genes), 1.09 at 26 and 0.68 at 237 (3,000), 1.82 at 22 and 0.87
# at 202 (4,200). Hence a limit of 2 RHO up to 1,708 genes, growing as genes^2 beyond it
# (25 at 3,000, 48 at 4,200), and every call from 4,700 genes; on all 32 rows of that run the
# rule's choice is within 10 % of the faster backend by the two backends' own times (the
# closest, 3,000 genes at reach 26: dense chosen, 1.06-1.09x the tree's time in two runs).
#: From this many genes, ``"auto"`` runs the tree code on calls of score reach at most 2 RHO.
AUTO_GENES_ONE_EXPANSION = 1200
#: Above this many genes the reach limit grows as ``2 RHO * (genes / AUTO_GENES_REACH_BASE)^2``.
AUTO_GENES_REACH_BASE = 1708
#: From this many genes, ``"auto"`` runs the tree code on every call.
AUTO_GENES_TREE = 4700


def auto_reach(genes: int) -> float:
    """``"auto"``'s rule: the largest score reach at which this backend runs at ``genes``.

    ``-inf`` (never: the dense native kernel is faster) below
    :data:`AUTO_GENES_ONE_EXPANSION` genes, ``2 RHO`` (the calls whose rows are each one
    expansion) up to :data:`AUTO_GENES_REACH_BASE`, growing as the genes squared beyond it,
    and ``inf`` (every call) from :data:`AUTO_GENES_TREE`. A call's score
    reach is :func:`tgem._kernels.score_reach` of its queries and keys (the largest
    ``max|q| * range(k)`` of its batch x head rows). Measured against the dense native kernel
    in float32 at the default tolerance (see the comment above); float64, where the dense
    choice is a slower pure-PyTorch path, follows the same rule.

    Examples
    --------
    >>> auto_reach(765), auto_reach(1708), round(auto_reach(3000), 1), auto_reach(22283)
    (-inf, 8.0, 24.7, inf)
    """
    if genes >= AUTO_GENES_TREE:
        return math.inf
    if genes >= AUTO_GENES_ONE_EXPANSION:
        return 2 * tree.RHO * max(1.0, genes / AUTO_GENES_REACH_BASE) ** 2
    return -math.inf


register_backend(
    Backend(
        "tree_native",
        tree_native_attention,
        _unavailable,
        priority=-3,
        describe=tree_native_status,
        takes_tol=True,
        auto_reach=auto_reach,
    )
)
