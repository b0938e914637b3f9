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
from tgem._kernels._registry import (
    Backend,
    _layer_reach,
    check_once_differentiable,
    register_backend,
)

_ABI_VERSION = 3
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
    # x, wq, wk, f32, batch, heads, genes, reach (out)
    lib.tgem_layer_reach.argtypes = [ptr] * 3 + [cint, i64, i64, i64, ptr]
    lib.tgem_layer_reach.restype = cint
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


#: Largest size of the four float64 (N, G) arrays (``out, z, r, kk``) that a forward keeps for
#: its backward. Above it (e.g. batch 16 x 5 heads from 52,429 genes) the backward recomputes
#: them from q, k and v with the same forward call, bitwise the same numbers, for one more
#: pass of row sums: a training step at 60,000 genes then stays within about 1 GB.
SAVE_LIMIT_BYTES = 128 * 2**20


class _TreeNativeAttention(torch.autograd.Function):
    """The tree code's attention with the forward and the backward each one C call (the
    formulas of :func:`tgem._kernels._tree.tree_forward` and ``tree_backward``); past
    :data:`SAVE_LIMIT_BYTES` the backward first repeats the forward's sums."""

    @staticmethod
    def forward(ctx, q, k, v, tol):
        shape, dtype = q.shape, q.dtype
        genes = shape[-1]
        params = tree.tree_parameters(dtype, genes, tol)
        q2, k2, v2 = (x.detach().reshape(-1, genes).contiguous() for x in (q, k, v))
        need = any(ctx.needs_input_grad[:3])
        keep = need and 4 * q2.numel() * 8 <= SAVE_LIMIT_BYTES
        y, saved = _fused_forward(q2, k2, v2, params, keep)
        if need:
            ctx.save_for_backward(q2, k2, v2, *saved)
            ctx.params = params
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        check_once_differentiable("tree_native")
        q, k, v, *saved = ctx.saved_tensors
        if not saved:  # too large to keep: the forward's sums again
            saved = _fused_forward(q, k, v, ctx.params, True)[1]
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
# Where the numbers come from: bench_tree.py --threads 2 --backends tree_native native --genes
# 64 128 200 300 400 600 765 1000 1300 1708 2500 3500 4700 --scales 0.5 1 2 4 10 30 100
# (benchmarks/results/tree_auto_rule.json; one attention call, forward and backward, batch
# 16 x 5 heads, float32, default tolerance, a quiet 2-core machine, after the fused C passes
# of this backend), the ratio of the dense native kernel's time to this backend's at each
# call's score reach (max|q| * range(k), in brackets):
#
#   genes   calls the rule runs as the tree     calls it runs dense
#   200     -                                   1.17 (0.6), 1.07 (2.4), 0.78 (9.7), 0.34 (39)
#   300     1.38 (0.4), 1.27 (1.8)              1.05 (7.1), 0.41 (28), 0.23 (177)
#   400     1.63 (0.4), 1.56 (1.8), 1.23 (7.1)  0.58 (28), 0.26 (178)
#   600     1.64 (0.2) ... 1.62 (3.5)           0.99 (14), 0.39 (88), 0.44 (8,770)
#   765     2.28 (0.2) ... 1.19 (11)            0.46 (71), 0.42 (641), 0.44 (7,122)
#   1,000   2.88 (0.2) ... 1.84 (10)            0.58 (64), 0.47 (572), 0.39 (6,359)
#   1,300   3.74 (0.1) ... 2.63 (8.6)           0.69 (54), 0.56 (484), 0.56 (5,381)
#   1,708   4.98 (0.1) ... 3.55 (6.9), 1.02 (43) 0.71 (390), 0.70 (4,331)
#   2,500   7.58 (0.1) ... 1.75 (30)            0.95 (271), 0.96 (3,006)
#   3,500   11.07 (0.1) ... 1.34 (192), 1.28 (2,135): every call
#   4,700   14.08 (0.1) ... 1.64 (176), 1.65 (1,952): every call
#
# The break-even reach grows with the genes, as the dense cost (genes^2) outgrows the tree's
# (genes times the terms per query, which grow with the reach): about 8 at 400 genes, 14 at
# 600, 45 at 1,708, a few hundred at 2,500; from 3,000 genes the tree is faster at every
# reach measured. Hence the rule: from 256 genes, calls of reach at most
# 8 (genes / 400)^1.3 (4.5 at 256, 19 at 765, 53 at 1,708, 110 at 3,000 genes), and every
# call from 3,000 genes. From 256 genes the rule's choice is at most 1.05x slower than the
# faster backend on every row above, by the two backends' own times (300 genes at reach 7.1,
# dense); below, at 200 genes, the dense kernel it keeps is 1.07-1.17x slower on the nearly
# uniform calls (about 1 ms each; 1.03-1.04x in an earlier run), and faster on the others.
#: From this many genes, ``"auto"`` may run the tree code (below, the calls take a
#: millisecond either way and the dense kernel is as fast).
AUTO_GENES_MIN = 256
#: The reach limit is ``AUTO_REACH_AT_BASE * (genes / AUTO_GENES_REACH_BASE) ** AUTO_REACH_POWER``.
AUTO_GENES_REACH_BASE = 400
#: The reach limit at :data:`AUTO_GENES_REACH_BASE` genes (two expansion radii, ``2 RHO``).
AUTO_REACH_AT_BASE = 8.0
#: How fast the reach limit grows with the genes.
AUTO_REACH_POWER = 1.3
#: From this many genes, ``"auto"`` runs the tree code on every call.
AUTO_GENES_TREE = 3000


def layer_reach(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor) -> float:
    """The score reach of a layer's queries ``x * wq`` and keys ``x * wk`` ((batch, genes)
    input, (heads, genes, 1) weights): ``"auto"``'s per-layer choice.

    One pass in C on one thread for CPU float32 and float64 tensors (at 765 genes, batch 16
    and 5 heads about 30 us, where numpy takes about 300 us a layer); the same value as
    :func:`tgem._kernels.score_reach` of the products, NaN included. Elsewhere (other
    devices or dtypes, no native code) numpy or torch computes it.

    Examples
    --------
    >>> x = torch.tensor([[1.0, 2.0, -1.0]]); w = torch.tensor([[[1.0], [0.5], [2.0]]])
    >>> layer_reach(x, w, w)  # q = k = (1, 1, -2): max|q| = 2, range(k) = 3
    6.0
    """
    if (
        _LOAD_ERROR is not None
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or not (x.dtype == wq.dtype == wk.dtype)
        or x.dim() != 2
        or wq.shape != wk.shape
        or wq.shape[1:] != (x.shape[1], 1)
    ):
        return _layer_reach(x, wq, wk)
    x, wq, wk = (t.detach().contiguous() for t in (x, wq, wk))
    out = ctypes.c_double()
    code = _native._LIB.tgem_layer_reach(
        x.data_ptr(), wq.data_ptr(), wk.data_ptr(), int(x.dtype == torch.float32),
        x.shape[0], wq.shape[0], x.shape[1], ctypes.byref(out),
    )  # fmt: skip
    _raise_on(code, "reach")
    return out.value


def auto_reach(genes: int) -> float:
    """``"auto"``'s rule: the largest score reach at which this backend runs at ``genes``.

    ``-inf`` (never: the dense native kernel is as fast) below :data:`AUTO_GENES_MIN`
    genes, ``8 (genes / 400)^1.3`` from there (:data:`AUTO_REACH_AT_BASE`,
    :data:`AUTO_GENES_REACH_BASE`, :data:`AUTO_REACH_POWER`) and ``inf`` (every call) from
    :data:`AUTO_GENES_TREE`. A call's score reach is :func:`tgem._kernels.score_reach` of its
    queries and keys (the largest ``max|q| * range(k)`` of its batch x head rows). Measured
    against the dense native kernel in float32 at the default tolerance (see the comment
    above); float64, where the dense choice is a slower pure-PyTorch path, follows the same
    rule.

    Examples
    --------
    >>> auto_reach(200), round(auto_reach(765), 1), round(auto_reach(1708), 1)
    (-inf, 18.6, 52.8)
    >>> auto_reach(3000), auto_reach(22283)
    (inf, inf)
    """
    if genes >= AUTO_GENES_TREE:
        return math.inf
    if genes >= AUTO_GENES_MIN:
        return AUTO_REACH_AT_BASE * (genes / AUTO_GENES_REACH_BASE) ** AUTO_REACH_POWER
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
        layer_reach=layer_reach,
    )
)
