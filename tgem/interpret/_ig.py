"""The numerical core of tgem's attributions: batched gradients, quadrature, noise tunnel.

Everything here works on torch tensors of one chunk of samples;
:mod:`tgem.interpret._attribute` does the input checking, chunking, labelling and progress
reporting.

Integrated Gradients (Sundararajan et al., 2017) of sample ``x`` against baseline ``b`` for
the target's log-probability ``f`` is ``(x - b) * integral_0^1 grad f(b + a (x - b)) da``.
The integral is evaluated on (sample, alpha) pairs: the input rows ``b + a (x - b)`` of many
pairs go through the network together, in batches of at most ``batch_rows`` rows, so memory
is bounded whatever the number of samples and steps.

Two kinds of quadrature:

* the fixed rules of captum (``"gausslegendre"``, captum's default, and the Riemann sums),
  with captum's nodes and weights (:func:`tgem._quadrature.fixed_rule`);
* ``"adaptive"``: composite Gauss-Legendre panels, bisected where the completeness defect
  ``integral - (f(end) - f(start))`` of a panel is largest until the whole defect of the
  sample is within ``tol * max(1, |f(x) - f(b)|)``. T-GEM needs this: its LayerNorm input is
  exactly 0 at the all-zero baseline, so ``f`` jumps within ``a ~ 1e-6 / std`` of the start,
  and its (leaky) ReLU makes the gradient discontinuous wherever a gene's last hidden value
  changes sign. A fixed 50-node rule misses both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tgem._quadrature import FIXED_RULES, fixed_rule

#: Nodes per panel of the adaptive rule.
PANEL_NODES = 5
#: Where a panel starting at alpha = 0 is split (fraction of its width).
START_SPLIT = 0.05
#: The adaptive rule stops refining a sample after this many times ``n_steps`` gradients.
MAX_STEPS_FACTOR = 20

QUADRATURES = ("adaptive",) + FIXED_RULES

#: Rows of a pass without gradients, in units of ``batch_rows``: inference keeps no
#: activations for a backward pass.
INFERENCE_ROWS_FACTOR = 4


# ----------------------------------------------------------------------------- gradients
class _GuidedRectifier(torch.autograd.Function):
    """(Leaky) ReLU whose backward passes only positive gradients (the guided rule)."""

    @staticmethod
    def forward(ctx, h, slope):
        ctx.save_for_backward(h)
        ctx.slope = slope
        return F.leaky_relu(h, slope) if slope else F.relu(h)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        local = torch.where(h > 0, torch.ones_like(h), torch.full_like(h, ctx.slope))
        return grad.clamp(min=0) * local, None


_RECTIFIER_SLOPE = {"relu": 0.0, "leakyrelu": 0.1}


def guided_log_proba(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with the guided-backprop rule at the network's rectifier (if any).

    The forward value is unchanged. T-GEM has one rectifier, the activation after the last
    block; with ``activation`` "gelu" or None there is none and this is ``module(x)``.
    """
    slope = _RECTIFIER_SLOPE.get(module.activation)
    if slope is None:
        return module(x)
    _, states = module(x, return_layers=True)
    h = _GuidedRectifier.apply(states[-1], slope)
    return F.log_softmax(module.classifier(h), dim=-1)


@dataclass
class Evaluator:
    """Gradients and values of the target log-probability, ``batch_rows`` rows at a time."""

    module: torch.nn.Module
    batch_rows: int
    guided: bool = False

    def _forward(self, x):
        return guided_log_proba(self.module, x) if self.guided else self.module(x)

    def values(self, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Target log-probabilities (float64) of ``rows``, no gradient."""
        out = torch.empty(rows.shape[0], dtype=torch.float64)
        step = INFERENCE_ROWS_FACTOR * self.batch_rows
        with torch.no_grad():
            for i in range(0, rows.shape[0], step):
                lp = self.module(rows[i : i + step])
                out[i : i + step] = lp.gather(1, target[i : i + step, None])[:, 0].double().cpu()
        return out

    def grad(self, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Gradient of each row's target log-probability with respect to the row."""
        with torch.enable_grad():
            r = rows.detach().requires_grad_(True)
            lp = self._forward(r)
            (g,) = torch.autograd.grad(lp.gather(1, target[:, None]).sum(), r)
        return g

    def weighted_grads(self, x, b, target, sample, alpha, weight, total) -> None:
        """``total[sample] += weight * grad f(b + alpha (x - b))`` over (sample, alpha) pairs.

        ``x, b`` are (s, genes); ``sample, alpha, weight`` describe the pairs (1-d tensors).
        """
        diff = x - b
        for i in range(0, sample.shape[0], self.batch_rows):
            sl = slice(i, i + self.batch_rows)
            s = sample[sl]
            a = alpha[sl].to(x.dtype)[:, None]
            rows = b[s] + a * diff[s]
            g = self.grad(rows, target[s])
            total.index_add_(0, s, (g * weight[sl].to(g.dtype)[:, None]).to(total.dtype))

    def path_values(self, x, b, target, sample, alpha) -> torch.Tensor:
        """``f(b + alpha (x - b))`` over (sample, alpha) pairs, float64."""
        diff = x - b
        rows = b[sample] + alpha.to(x.dtype)[:, None] * diff[sample]
        return self.values(rows, target[sample])


# ----------------------------------------------------------------------------- IG
def integrated_gradients(
    ev: Evaluator,
    x: torch.Tensor,
    b: torch.Tensor,
    target: torch.Tensor,
    n_steps: int,
    quadrature: str,
    tol: float = 1e-3,
    need_delta: bool = True,
):
    """Integrated Gradients of the rows of ``x`` (s, genes) against baselines ``b``.

    Returns ``(attributions, delta, n_gradients, converged)``: float64 (s, genes), the
    convergence deltas ``sum(attributions) - (f(x) - f(b))`` (s,) (None when not needed with
    a fixed rule), the number of gradients evaluated per sample (s,) and, for the adaptive
    rule, whether each sample met the tolerance (None for the fixed rules).
    """
    if quadrature == "adaptive":
        return _adaptive_ig(ev, x, b, target, n_steps, tol)
    s, g = x.shape
    alphas, weights = fixed_rule(quadrature, n_steps, argument="quadrature")
    sample = torch.arange(s, device=x.device).repeat_interleave(len(alphas))
    alpha = torch.as_tensor(np.tile(alphas, s), device=x.device)
    weight = torch.as_tensor(np.tile(weights, s), device=x.device)
    total = torch.zeros(s, g, dtype=torch.float64, device=x.device)
    ev.weighted_grads(x, b, target, sample, alpha, weight, total)
    attr = total * (x - b).double()
    delta = None
    if need_delta:
        delta = attr.sum(1).cpu() - _end_to_end(ev, x, b, target)
    return attr, delta, np.full(s, len(alphas)), None


def _end_to_end(ev, x, b, target) -> torch.Tensor:
    fx = ev.values(x, target)
    fb = ev.values(b, target)
    return fx - fb


def _adaptive_ig(ev: Evaluator, x, b, target, n_steps: int, tol: float):
    """Composite Gauss-Legendre IG with bisection of the panels with the largest defects."""
    s, g = x.shape
    dev = x.device
    m = min(PANEL_NODES, n_steps)
    n_panels = max(1, n_steps // m)
    gl_x, gl_w = np.polynomial.legendre.leggauss(m)
    # leaf panels as flat arrays: owner sample, [lo, hi], f(lo), f(hi), integral, contribution
    breaks = np.linspace(0.0, 1.0, n_panels + 1)
    owner = np.repeat(np.arange(s), n_panels)
    lo, hi = np.tile(breaks[:-1], s), np.tile(breaks[1:], s)

    # f at all initial breakpoints
    f_lo, f_hi = _panel_end_values(ev, x, b, target, owner, lo, hi)
    end_to_end = _end_to_end(ev, x, b, target).numpy()
    scale = tol * np.maximum(1.0, np.abs(end_to_end))
    n_grads = np.zeros(s, dtype=np.int64)
    max_grads = MAX_STEPS_FACTOR * n_steps

    contrib, integral = _evaluate_panels(ev, x, b, target, owner, lo, hi, gl_x, gl_w)
    n_grads += np.bincount(owner, minlength=s) * m
    while True:
        defect = integral - (f_hi - f_lo)
        delta = np.bincount(owner, weights=defect, minlength=s)
        todo = (np.abs(delta) > scale) & (n_grads + 2 * m <= max_grads)
        if not todo.any():
            break
        split = _panels_to_split(owner, defect, todo, n_grads, max_grads, m)
        # a panel at the path's start is split geometrically: at the all-zero baseline the
        # steep LayerNorm transition sits at alpha ~ 1e-6 / std, far below a half
        mid = np.where(lo[split] == 0.0, START_SPLIT * hi[split], 0.5 * (lo[split] + hi[split]))
        f_mid = ev.path_values(
            x,
            b,
            target,
            torch.as_tensor(owner[split], device=dev),
            torch.as_tensor(mid, device=dev),
        ).numpy()
        new_owner = np.concatenate([owner[split], owner[split]])
        new_lo = np.concatenate([lo[split], mid])
        new_hi = np.concatenate([mid, hi[split]])
        new_flo = np.concatenate([f_lo[split], f_mid])
        new_fhi = np.concatenate([f_mid, f_hi[split]])
        new_contrib, new_integral = _evaluate_panels(
            ev, x, b, target, new_owner, new_lo, new_hi, gl_x, gl_w
        )
        n_grads += np.bincount(new_owner, minlength=s) * m
        keep = np.ones(len(owner), dtype=bool)
        keep[split] = False
        owner = np.concatenate([owner[keep], new_owner])
        lo, hi = np.concatenate([lo[keep], new_lo]), np.concatenate([hi[keep], new_hi])
        f_lo, f_hi = np.concatenate([f_lo[keep], new_flo]), np.concatenate([f_hi[keep], new_fhi])
        contrib = torch.cat([contrib[torch.as_tensor(keep, device=dev)], new_contrib])
        integral = np.concatenate([integral[keep], new_integral])

    total = torch.zeros(s, g, dtype=torch.float64, device=dev)
    total.index_add_(0, torch.as_tensor(owner, device=dev), contrib.double())
    attr = total * (x - b).double()
    # the defect is computed from the attributions themselves, as captum does
    delta = attr.sum(1).cpu() - torch.as_tensor(end_to_end)
    converged = np.abs(delta.numpy()) <= scale
    return attr, delta, n_grads, converged


def _panel_end_values(ev, x, b, target, owner, lo, hi):
    """f at each panel's ends, evaluating each distinct (sample, alpha) once."""
    pts = np.unique(np.stack([np.concatenate([owner, owner]), np.concatenate([lo, hi])], 1), axis=0)
    dev = x.device
    vals = ev.path_values(
        x,
        b,
        target,
        torch.as_tensor(pts[:, 0].astype(np.int64), device=dev),
        torch.as_tensor(pts[:, 1], device=dev),
    ).numpy()
    lookup = {(int(o), float(a)): v for (o, a), v in zip(pts, vals)}
    f_lo = np.array([lookup[(int(o), float(a))] for o, a in zip(owner, lo)])
    f_hi = np.array([lookup[(int(o), float(a))] for o, a in zip(owner, hi)])
    return f_lo, f_hi


def _evaluate_panels(ev, x, b, target, owner, lo, hi, gl_x, gl_w):
    """Per panel: its gradient contribution (panels, genes) and its path integral."""
    dev = x.device
    m = len(gl_x)
    n = len(owner)
    half = 0.5 * (hi - lo)
    alpha = (lo[:, None] + half[:, None] * (1.0 + gl_x[None, :])).ravel()
    weight = (half[:, None] * gl_w[None, :]).ravel()
    panel = torch.arange(n, device=dev).repeat_interleave(m)
    sample = torch.as_tensor(np.repeat(owner, m), device=dev)
    contrib = torch.zeros(n, x.shape[1], dtype=torch.float32, device=dev)
    dfda = torch.empty(n * m, dtype=torch.float64)
    # accumulate per panel: rows are indexed by sample, the sums by panel
    diff = x - b
    for i in range(0, n * m, ev.batch_rows):
        sl = slice(i, i + ev.batch_rows)
        s = sample[sl]
        rows = b[s] + torch.as_tensor(alpha[sl], device=dev).to(x.dtype)[:, None] * diff[s]
        gr = ev.grad(rows, target[s])
        w = torch.as_tensor(weight[sl], device=dev)
        contrib.index_add_(0, panel[sl], gr * w.to(gr.dtype)[:, None])
        dfda[sl] = (gr * diff[s]).sum(1).double().cpu()
    integral = (dfda.numpy() * weight).reshape(n, m).sum(1)
    return contrib, integral


def _panels_to_split(owner, defect, todo, n_grads, max_grads, m) -> np.ndarray:
    """Indices of the panels to bisect: per unfinished sample, its worst panels.

    The panels are taken in decreasing ``|defect|`` until they hold half of the sample's
    total ``|defect|``, within the sample's remaining gradient budget.
    """
    chosen = []
    for i in np.flatnonzero(todo):
        idx = np.flatnonzero(owner == i)
        d = np.abs(defect[idx])
        order = idx[np.argsort(-d, kind="stable")]
        budget = (max_grads - n_grads[i]) // (2 * m)
        cum = np.cumsum(np.sort(d)[::-1])
        k = int(np.searchsorted(cum, 0.5 * cum[-1]) + 1)
        chosen.append(order[: max(1, min(k, budget))])
    return np.concatenate(chosen)


# ----------------------------------------------------------------------------- noise tunnel
def noise(
    seed: int, sample_ids: np.ndarray, nt_samples: int, n_genes: int, stdevs: float
) -> np.ndarray:
    """Gaussian noise (len(sample_ids), nt_samples, genes), float32, one stream per sample.

    Sample ``i``'s noise depends only on ``(seed, i)``, not on how samples are chunked.
    """
    out = np.empty((len(sample_ids), nt_samples, n_genes), dtype=np.float32)
    for r, i in enumerate(sample_ids):
        rng = np.random.default_rng([seed, int(i)])
        out[r] = rng.normal(0.0, stdevs, size=(nt_samples, n_genes))
    return out


def smooth(attrs: torch.Tensor, kind: str) -> torch.Tensor:
    """Combine (nt_samples, s, genes) noisy attributions as captum's NoiseTunnel does."""
    mean = attrs.mean(0)
    mean_sq = (attrs * attrs).mean(0)
    if kind == "smoothgrad_sq":
        return mean_sq
    if kind == "vargrad":
        return mean_sq - mean * mean
    raise ValueError(f"unknown noise-tunnel type {kind!r}")


def rows_budget(n_genes: int, n_heads: int, n_layers: int, budget_bytes: int) -> int:
    """Rows per forward+backward pass that fit ``budget_bytes`` of activations (estimate).

    Per row and layer the exact attention keeps about 8 (heads, genes) tensors for the
    backward pass and the block about 12 (genes,) ones; float32.
    """
    per_row = 4 * n_genes * (n_layers * (8 * n_heads + 12) + 8)
    return max(1, math.floor(budget_bytes / per_row))
