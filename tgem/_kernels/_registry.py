"""The attention backend registry: the seam between the model and the kernels.

A backend is a :class:`Backend` record; its module calls :func:`register_backend` when it is
imported. This module names no implementation: the package ``tgem._kernels`` imports the
backend modules (the always-available ones at once, the optional ones on the first question
asked here, through the loader it installs with :func:`set_loader`). A backend module that
fails to import is reported by :func:`backend_status` and never breaks tgem.

Two things a call may pass through the seam besides the device and dtype: the number of genes,
with which ``"auto"`` may choose per call between its dense choice and a backend that declares
an ``auto_reach`` rule (:func:`resolve_backend`), and a tolerance, bound to the backends that
take one (``takes_tol``; :data:`TOL_RANGE`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Accepted range of the tolerance of a backend that takes one (``takes_tol``), both ends
#: included. The upper end keeps the tree code's expansions meaningful; below the lower end
#: float64's own rounding in the expansions sets the error, so a tighter tolerance would
#: only cost time (see :mod:`tgem._kernels._tree`).
TOL_RANGE = (1e-13, 0.1)


def check_tolerance(tol, name: str = "tree_tolerance") -> float | None:
    """``tol`` as a float (``None`` stays ``None``), or ``ValueError`` naming the range.

    Examples
    --------
    >>> check_tolerance(1e-6), check_tolerance(None)
    (1e-06, None)
    """
    if tol is None:
        return None
    low, high = TOL_RANGE
    try:
        value = float(tol)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(tol, bool) or not low <= value <= high:
        raise ValueError(
            f"{name} must be a number between {low:g} and {high:g} (or None for the dtype's "
            f"default), got {tol!r}; pass e.g. 1e-6."
        )
    return value


def score_reach(q: torch.Tensor, k: torch.Tensor) -> float:
    """The largest ``max|q| * (max k - min k)`` over the rows: how sharp the attention can be.

    ``q`` and ``k`` are (..., genes); each row's scores ``q_i k_j`` span at most
    ``|q_i| * range(k)``, so a small reach means nearly uniform attention. Cheap (two passes
    over ``q`` and ``k``, one host synchronisation): ``"auto"`` computes it on every call.

    Examples
    --------
    >>> q = torch.tensor([[1.0, -2.0, 0.5]]); k = torch.tensor([[0.0, 1.0, 3.0]])
    >>> score_reach(q, k)
    6.0
    """
    if q.numel() == 0:
        return 0.0
    with torch.no_grad():
        return _reach(*torch.aminmax(q, dim=-1), *torch.aminmax(k, dim=-1))


def _reach(q_min, q_max, k_min, k_max) -> float:
    """:func:`score_reach` from the rows' extremes of q and k (two passes over the big
    tensors instead of four: on the CPU each pass wakes the thread pool)."""
    return float((torch.maximum(q_max.abs(), q_min.abs()) * (k_max - k_min)).max())


def check_once_differentiable(name: str) -> None:
    """Raise the exact backends' error when a backward pass is itself being differentiated."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"The {name} T-GEM attention is differentiable once; double backward "
            "(create_graph=True) is not implemented. Use attention_backend='reference' "
            "for higher-order gradients."
        )


@dataclass(frozen=True)
class Backend:
    """An attention implementation registered with :func:`register_backend`.

    ``fn(q, k, v)`` takes and returns ``(batch, heads, genes)`` tensors and is differentiable.
    ``unavailable(device, dtype)`` returns ``None`` when the backend can run on that device and
    dtype, otherwise the reason it cannot (shown by :func:`tgem.show_versions`). ``auto``
    picks, among the available ``exact`` backends, the one with the highest ``priority``.
    ``layer_fn(x, WQ, WK, WV, W_0)``, when given, computes a whole layer's mixed attention
    output ``(batch, genes)`` from its input ``(batch, genes)`` and weights (``(heads, genes,
    1)`` and ``(heads,)``) in one differentiable call; it must equal ``fn`` applied to
    ``x WQ, x WK, x WV`` mixed by ``W_0`` (to rounding). The model uses it when present.
    ``describe()``, when given, says in one line how the backend is built (its library, its
    instruction set); :func:`tgem.show_versions` shows it.

    ``takes_tol``: ``fn`` takes a keyword ``tol`` (``None``: the backend's default for the
    dtype; otherwise within :data:`TOL_RANGE`) that bounds its error; :func:`resolve_backend`
    binds the caller's. ``auto_reach(genes)``, when given, is ``"auto"``'s rule for this
    backend: at ``genes`` genes, ``auto`` runs it instead of its dense choice on the calls
    whose :func:`score_reach` is at most ``auto_reach(genes)`` (``-inf``: never, ``inf``:
    always). Only exact backends take part. ``layer_reach(x, WQ, WK)``, when given, is that
    score reach for a whole layer's queries ``x WQ`` and keys ``x WK`` (the same value as
    :func:`score_reach` of the products, computed faster); ``auto`` uses it for its
    per-layer choice, numpy or torch otherwise.
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    unavailable: Callable[[torch.device, torch.dtype], str | None]
    priority: int = 0
    exact: bool = True
    layer_fn: Callable[..., torch.Tensor] | None = None
    describe: Callable[[], str] | None = None
    takes_tol: bool = False
    auto_reach: Callable[[int], float] | None = None
    layer_reach: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float] | None = None


_BACKENDS: dict[str, Backend] = {}
_plugin_errors: dict[str, str] = {}
_loader: Callable[[], None] | None = None
_plugins_loaded = False


def register_backend(backend: Backend) -> None:
    """Add (or replace) an attention backend under ``backend.name``."""
    _BACKENDS[backend.name] = backend


def always_available(device: torch.device, dtype: torch.dtype) -> str | None:
    """The ``unavailable`` rule of a backend that runs on every device and dtype."""
    return None


def set_loader(loader: Callable[[], None]) -> None:
    """Install the function that imports the optional backend modules (called once, lazily).

    The kernels package installs it, so that importing tgem does not pay for the optional
    backends (torch.compile's import alone takes over a second); they are imported on the
    first call to :func:`backend_names`, :func:`backend_status` or :func:`resolve_backend`.
    """
    global _loader, _plugins_loaded
    _loader = loader
    _plugins_loaded = False


def import_failed(module: str, exc: BaseException) -> None:
    """Record that the backend module ``module`` could not be imported (shown by status)."""
    _plugin_errors[module] = f"{type(exc).__name__}: {exc}"
    logger.debug("attention backend module %s not loaded: %s", module, exc)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded or _loader is None:
        return
    _plugins_loaded = True  # first: a backend module that asks the registry does not recurse
    _loader()


def backend_names() -> list[str]:
    """Names accepted by ``attention_backend`` (besides ``"auto"``)."""
    _load_plugins()
    return sorted(_BACKENDS)


def backend_status(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, str | None]:
    """For each registered backend, ``None`` if usable on ``device``/``dtype``, else why not."""
    _load_plugins()
    device = torch.device(device)
    status = {name: b.unavailable(device, dtype) for name, b in sorted(_BACKENDS.items())}
    for mod, err in _plugin_errors.items():
        status[mod] = f"failed to import: {err}"
    return status


def backend_details() -> dict[str, str]:
    """``describe()`` of each registered backend that has one, by name.

    A backend whose ``describe`` raises is shown with the error: a report never fails.
    """
    _load_plugins()
    details = {}
    for name, backend in sorted(_BACKENDS.items()):
        if backend.describe is not None:
            try:
                details[name] = backend.describe()
            except Exception as exc:  # noqa: BLE001 - show_versions must not fail
                details[name] = f"failed: {type(exc).__name__}: {exc}"
    return details


def resolve_backend(
    name: str,
    device: str | torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    genes: int | None = None,
    tol: float | None = None,
) -> Backend:
    """The backend that ``attention_backend=name`` means on ``device`` and ``dtype``.

    ``"auto"`` means the available exact backend with the highest priority (its dense
    choice). Given ``genes``, it may mean instead an available exact backend with an
    ``auto_reach`` rule (the highest-priority one): always where the rule says ``inf`` at
    ``genes``, never where it says ``-inf``, and otherwise a backend named
    ``"<dense>+<other>"`` that picks one of the two on each call by the rule (a fixed
    function of the call's :func:`score_reach`, never a timing, so fits stay repeatable). A
    named backend that cannot run there raises ``ValueError`` with the reason. ``tol`` is
    bound to the backends that take one (``takes_tol``) and ignored by the others.

    Examples
    --------
    >>> resolve_backend("exact", "cpu").name
    'exact'
    >>> resolve_backend("auto", "cpu", genes=10).exact
    True
    """
    _load_plugins()
    device = torch.device(device)
    if name == "auto":
        usable = [b for b in _BACKENDS.values() if b.exact and b.unavailable(device, dtype) is None]
        dense = max(usable, key=lambda b: b.priority)
        ruled = [b for b in usable if b.auto_reach is not None and b is not dense]
        if genes is None or not ruled:
            return _with_tol(dense, tol)
        other = _with_tol(max(ruled, key=lambda b: b.priority), tol)
        limit = float(other.auto_reach(genes))
        if limit == math.inf:
            return other
        if limit < 0:
            return _with_tol(dense, tol)
        return _per_call(_with_tol(dense, tol), other, limit)
    if name not in _BACKENDS:
        raise ValueError(
            f"Unknown attention_backend={name!r}; choose 'auto' or one of {backend_names()}."
        )
    backend = _BACKENDS[name]
    reason = backend.unavailable(device, dtype)
    if reason is not None:
        raise ValueError(
            f"attention_backend={name!r} cannot run on {device} with {dtype}: {reason}. "
            "Use attention_backend='auto' to pick an available one."
        )
    return _with_tol(backend, tol)


def _with_tol(backend: Backend, tol: float | None) -> Backend:
    """``backend`` with ``tol`` bound to its ``fn`` when it takes one."""
    if not backend.takes_tol or tol is None:
        return backend
    return replace(backend, fn=partial(backend.fn, tol=check_tolerance(tol)))


def _layer_reach(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor) -> float:
    """:func:`score_reach` of a layer's queries ``x * wq`` and keys ``x * wk`` ((batch,
    genes) input, (heads, genes, 1) weights), the same products and so the same value. On the
    CPU in numpy: one thread, where torch's passes would each wake its thread pool, which costs
    more than the passes themselves at a few thousand genes."""
    if x.numel() == 0:
        return 0.0
    with torch.no_grad():
        x, wq, wk = x.detach(), wq.detach()[..., 0], wk.detach()[..., 0]
        if x.device.type == "cpu":  # the same operations as _reach, in the same dtype
            products = x.numpy()[:, None, None, :] * np.stack([wq.numpy(), wk.numpy()])
            lo, hi = products.min(-1), products.max(-1)
            q_top = np.maximum(np.abs(hi[:, 0]), np.abs(lo[:, 0]))
            return float((q_top * (hi[:, 1] - lo[:, 1])).max())
        else:
            lo, hi = torch.aminmax(x[:, None, None, :] * torch.stack([wq, wk]), dim=-1)
        return _reach(lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1])


def _per_call(dense: Backend, other: Backend, limit: float) -> Backend:
    """``auto``'s backend that runs ``other`` on calls whose score reach is at most ``limit``
    and ``dense`` on the others (both exact, so the choice never changes what is computed
    beyond their tolerances)."""

    def pick(q: torch.Tensor, k: torch.Tensor) -> Backend:
        return other if score_reach(q, k) <= limit else dense

    def fn(q, k, v):
        return pick(q, k).fn(q, k, v)

    reach = other.layer_reach or _layer_reach

    def layer_fn(x, wq, wk, wv, w0):
        # the reach of the layer's queries and keys, (batch, heads, genes), by the Backend
        # contract's formula: the same values as q and k
        with torch.no_grad():
            chosen = other if reach(x, wq, wk) <= limit else dense
        if chosen.layer_fn is not None:
            return chosen.layer_fn(x, wq, wk, wv, w0)
        xb = x.unsqueeze(1)
        heads = chosen.fn(xb * wq[..., 0], xb * wk[..., 0], xb * wv[..., 0])
        return torch.einsum("bhg,h->bg", heads, w0)

    def describe() -> str:
        return (
            f"{other.name} on calls whose max|q| * range(k) is at most {limit:g}, "
            f"{dense.name} on the others"
        )

    return Backend(
        f"{dense.name}+{other.name}",
        fn,
        dense.unavailable,
        priority=dense.priority,
        layer_fn=layer_fn,
        describe=describe,
    )
