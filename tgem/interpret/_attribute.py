"""The one attribution verb, :func:`attribute`, and the chunked loop behind it (:func:`run`).

Attributions explain the target's **log-probability** (the network's output), as in the
original, which applied captum to the log-softmax output. Attributions and baselines are in
the units of ``X`` as passed to the classifier, one value per input gene (see the
:mod:`tgem.interpret` docstring for what the ``"zeros"`` baseline means with
``standardize=True``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from tgem._finite import RESULT_FIX, check_finite_result
from tgem._runtime import dense_batch, draw_seed, torch_threads
from tgem.interpret._ig import (
    MAX_STEPS_FACTOR,
    QUADRATURES,
    Evaluator,
    integrated_gradients,
    noise,
    smooth,
)
from tgem.interpret._resolve import (
    _as_output,
    _batch_rows,
    _fitted_module,
    _resolve_baseline,
    _resolve_method,
    _resolve_target,
)

#: Samples per chunk: enough for this many passes of ``batch_rows`` rows (sample x step
#: pairs); each chunk's inputs, noise and results are formed at once.
CHUNK_BATCHES = 4


@dataclass(frozen=True)
class Options:
    """What :func:`run` computes per sample: :func:`attribute`'s resolved arguments."""

    #: "ig" (Integrated Gradients) or "gb" (Guided Backprop)
    base: str
    #: noise tunnel: "smoothgrad_sq", "vargrad" or None
    tunnel: str | None = None
    n_steps: int = 50
    quadrature: str = "adaptive"
    tol: float = 1e-3
    stdevs: float = 0.0
    nt_samples: int = 1
    #: seed of the noise tunnel's noise (per sample: see :func:`tgem.interpret._ig.noise`)
    seed: int = 0
    #: whether the caller needs the convergence deltas of a fixed rule
    need_delta: bool = True


# ----------------------------------------------------------------------------- attribute
def attribute(
    clf,
    X,
    *,
    target="true",
    y=None,
    method: str = "integrated_gradients",
    n_steps: int = 50,
    baseline="zeros",
    quadrature: str = "adaptive",
    tol: float = 1e-3,
    stdevs: float = 0.1,
    nt_samples: int = 5,
    internal_batch_size: int | None = None,
    return_convergence_delta: bool = False,
    random_state=None,
    verbose: int = 0,
):
    """Attribute each sample's target log-probability to its genes.

    Parameters
    ----------
    clf : TGEMClassifier
        A fitted classifier. The network runs in eval mode (no dropout) on its device and
        with its ``n_threads``.
    X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_genes)
        Samples to explain (same genes as in ``fit``; never modified).
    target : "true", "predicted", a class label, or array-like of shape (n_samples,)
        Whose log-probability is explained: the true class (needs ``y``), the predicted
        class, one class for all samples, or one class per sample.
    y : array-like of shape (n_samples,), optional
        True labels, for ``target="true"``.
    method : str, default="integrated_gradients"
        ``"integrated_gradients"``, ``"ig_smoothgrad_sq"``, ``"ig_vargrad"``,
        ``"guided_backprop"``, ``"guided_backprop_smoothgrad_sq"`` or
        ``"guided_backprop_vargrad"`` (the original's ig, sg_ig, vg_ig, gb, sg_gb, vg_gb,
        also accepted). See Notes.
    n_steps : int, default=50
        Integrated Gradients: gradient evaluations per sample of the fixed rules, and the
        starting number for ``quadrature="adaptive"``.
    baseline : {"zeros", "mean"} or array-like, default="zeros"
        Integrated Gradients' reference input, in the units of ``X``: all zeros (the
        original; zero expression, also with ``standardize=True``, see the module
        docstring), the mean of the training data (available while the fitted classifier
        is in memory), or an array of shape (n_genes,) or (n_samples, n_genes).
    quadrature : str, default="adaptive"
        How the path integral is evaluated. ``"adaptive"``: Gauss-Legendre panels (5 nodes
        each, ``n_steps`` nodes to start), bisected where the completeness defect is largest
        until ``|sum(attributions) - (f(x) - f(baseline))| <= tol * max(1, |f(x) -
        f(baseline)|)`` or 20 x ``n_steps`` gradients were spent (then a ConvergenceWarning).
        ``"gausslegendre"`` (captum's default) and ``"riemann_left"``, ``"riemann_right"``,
        ``"riemann_middle"``, ``"riemann_trapezoid"``: captum's fixed rules with
        ``n_steps`` nodes, identical to ``captum.attr.IntegratedGradients``.
    tol : float, default=1e-3
        Relative completeness tolerance of the adaptive quadrature.
    stdevs : float, default=0.1
        Standard deviation of the Gaussian noise of the noise-tunnel methods (absolute, in
        the units of X, as in captum).
    nt_samples : int, default=5
        Noisy copies per sample of the noise-tunnel methods.
    internal_batch_size : int, optional
        Rows (sample x step pairs) per forward and backward pass. None sizes it for about
        256 MiB of activations.
    return_convergence_delta : bool, default=False
        Integrated Gradients only: also return ``sum(attributions) - (f(x) - f(baseline))``
        per sample, of shape (n_samples,), or (n_samples, nt_samples) for the noise tunnels
        (one per noisy copy, whose attributions are combined).
    random_state : int, RandomState instance or None
        Seeds the noise of the noise-tunnel methods. Each sample's noise depends only on the
        seed and its row number, not on the batching.
    verbose : int, default=0
        1 shows a progress bar over the samples.

    Returns
    -------
    attributions : ndarray or DataFrame of shape (n_samples, n_genes)
        float64; a DataFrame with the gene names as columns (and X's index) when the model
        was fitted on a DataFrame.
    delta : ndarray
        Only with ``return_convergence_delta``.

    Notes
    -----
    *Integrated Gradients* is ``(x - b) * integral_0^1 grad f(b + a (x - b)) da``.
    T-GEM's path integrand is not smooth: the first LayerNorm's input is exactly 0 at the
    all-zero baseline, so ``f`` changes steeply within ``a ~ 1e-6 / std`` of it, and the
    (leaky) ReLU after the last block makes the gradient jump where a gene's hidden value
    changes sign. captum's fixed 50-node rule then leaves visible completeness defects; the
    adaptive rule removes them at a small extra cost (``benchmarks/bench_attribution.py``,
    results in benchmarks/README.md).

    *Guided Backprop* returns the gradient of the target log-probability in which only
    positive gradients pass backward through rectifying units (Springenberg et al., 2015).
    T-GEM's one rectifier is the activation after the last block: for ``"relu"`` this is
    exactly captum's ``GuidedBackprop`` on a network whose activation is an ``nn.ReLU``
    module; for ``"leakyrelu"`` the same rule is applied (negative upstream gradients are
    zeroed, the local slope 1 or 0.1 is kept). With ``"gelu"`` or no activation it is the
    plain input gradient. Note: the original applied captum's GuidedBackprop to a model
    without ``nn.ReLU`` modules, so its "gb" was the plain gradient.

    The noise tunnels follow captum's ``NoiseTunnel``: ``nt_samples`` copies of each sample
    with Gaussian noise of standard deviation ``stdevs`` (the baseline and target are kept),
    combined as the mean of the squared attributions (SmoothGrad-squared) or their variance
    (VarGrad).

    Examples
    --------
    >>> import numpy as np
    >>> from tgem import TGEMClassifier
    >>> from tgem.interpret import attribute
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 6)).astype(np.float32)
    >>> y = np.where(X[:, 0] > 0, "up", "down")
    >>> clf = TGEMClassifier(n_layers=1, n_heads=2, learning_rate=1e-2, max_epochs=10,
    ...                      n_threads=1, random_state=0).fit(X, y)
    >>> attr, delta = attribute(clf, X[:3], y=y[:3], return_convergence_delta=True)
    >>> attr.shape
    (3, 6)
    >>> bool(np.all(np.abs(delta) < 1e-2))
    True
    """
    module = _fitted_module(clf)
    base, tunnel = _resolve_method(method)
    if quadrature not in QUADRATURES:
        raise ValueError(f"quadrature={quadrature!r}; choose one of {QUADRATURES}.")
    if int(n_steps) < 1:
        raise ValueError(f"n_steps={n_steps}; pass a positive number of steps.")
    if return_convergence_delta and base != "ig":
        raise ValueError(
            f"return_convergence_delta=True is only defined for Integrated "
            f"Gradients, not method={method!r}."
        )
    if tunnel is not None and (int(nt_samples) < 1 or not stdevs >= 0):
        raise ValueError(
            f"nt_samples={nt_samples} and stdevs={stdevs}; pass nt_samples >= 1 and stdevs >= 0."
        )
    X_in = X
    X = clf._validate_X(X, reset=False)
    n, g = X.shape
    targets = _resolve_target(clf, X, target, y, n)
    baselines = _resolve_baseline(clf, baseline, n, g)
    batch_rows = _batch_rows(clf, module, internal_batch_size)
    options = Options(
        base=base,
        tunnel=tunnel,
        n_steps=int(n_steps),
        quadrature=quadrature,
        tol=tol,
        stdevs=stdevs,
        nt_samples=int(nt_samples),
        seed=draw_seed(random_state) if tunnel is not None else 0,
        need_delta=return_convergence_delta,
    )
    ev = Evaluator(module, batch_rows, guided=(base == "gb"))
    attr, delta, converged = run(ev, X, targets, baselines, options, clf.n_threads, verbose)
    what = f"attribute(method={method!r})'s"
    check_finite_result(attr, f"{what} attributions", RESULT_FIX)
    if return_convergence_delta:
        check_finite_result(delta, f"{what} convergence deltas", RESULT_FIX)
    warn_unconverged(converged, delta, tol)
    out = _as_output(clf, X_in, attr)
    return (out, delta) if return_convergence_delta else out


def run(ev: Evaluator, X, targets, baselines, options: Options, n_threads, verbose, on_chunk=None):
    """Attributions of all rows of ``X``, chunk by chunk; returns (attr, delta, converged).

    ``targets`` are class indices (n,), ``baselines`` (1, genes) or (n, genes);
    ``on_chunk(rows_done)`` is called after each chunk. ``delta`` is None for Guided Backprop,
    ``converged`` None for the fixed rules and Guided Backprop; both are (n,) or
    (n, nt_samples).
    """
    o = options
    n, g = X.shape
    device = next(ev.module.parameters()).device
    copies = o.nt_samples if o.tunnel is not None else 1
    per_sample = o.n_steps * copies if o.base == "ig" else copies
    chunk = max(1, (CHUNK_BATCHES * ev.batch_rows) // per_sample)
    attr = np.empty((n, g), dtype=np.float64)
    delta = None
    if o.base == "ig" and (o.need_delta or o.quadrature == "adaptive"):
        delta = np.empty((n, copies) if o.tunnel else n, dtype=np.float64)
    converged = None
    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="tgem attribution", unit="sample", leave=verbose > 1)
    try:
        with torch_threads(n_threads):
            for start in range(0, n, chunk):
                sl = slice(start, min(n, start + chunk))
                ids = np.arange(sl.start, sl.stop)
                x = dense_batch(X, sl, device)
                b = torch.as_tensor(
                    baselines[sl] if baselines.shape[0] > 1 else baselines, device=device
                ).expand_as(x)
                t = torch.as_tensor(targets[sl], device=device)
                if o.tunnel is not None:
                    eps = torch.as_tensor(
                        noise(o.seed, ids, o.nt_samples, g, o.stdevs), device=device
                    )
                    s = x.shape[0]
                    x = (x[:, None, :] + eps).reshape(s * o.nt_samples, g)
                    b = b.repeat_interleave(o.nt_samples, 0)
                    t = t.repeat_interleave(o.nt_samples, 0)
                a, d, c = _base_attribution(ev, x, b, t, o)
                if o.tunnel is not None:
                    a = smooth(a.reshape(-1, o.nt_samples, g).transpose(0, 1), o.tunnel)
                    d = None if d is None else d.reshape(-1, o.nt_samples)
                    c = None if c is None else c.reshape(-1, o.nt_samples)
                attr[sl] = a.cpu().numpy()
                if c is not None:
                    if converged is None:
                        converged = np.ones(delta.shape, dtype=bool)
                    converged[sl] = c
                if delta is not None:
                    delta[sl] = d.numpy()
                if on_chunk is not None:
                    on_chunk(sl.stop)
                if bar is not None:
                    bar.update(sl.stop - sl.start)
    finally:
        if bar is not None:
            bar.close()
    return attr, delta, converged


def _base_attribution(ev, x, b, t, o: Options):
    if o.base == "ig":
        a, d, _, c = integrated_gradients(
            ev, x, b, t, o.n_steps, o.quadrature, o.tol, need_delta=o.need_delta
        )
        return a, d, c
    return ev.grad(x, t).double(), None, None


def warn_unconverged(converged, delta, tol):
    """A ConvergenceWarning naming the samples whose completeness defect exceeds ``tol``."""
    if converged is None or converged.all():
        return
    bad = ~converged
    warnings.warn(
        f"Integrated Gradients did not reach the completeness tolerance tol={tol:g} for "
        f"{int(bad.sum())} of {bad.size} sample(s) within {MAX_STEPS_FACTOR} x n_steps "
        f"gradients; the largest defect is {float(np.max(np.abs(delta[bad]))):.3g} "
        "log-probability. Increase n_steps or tol.",
        ConvergenceWarning,
        stacklevel=3,
    )
