"""Gene attributions of a fitted T-GEM model, per-class gene rankings and the ablation study.

* :func:`attribute` — one verb for the original's six attribution methods (Integrated
  Gradients, its SmoothGrad-squared and VarGrad noise tunnels, Guided Backprop and its noise
  tunnels), memory-bounded and reproducible, for any target.
* :func:`gene_ranking` — per class, the mean and median attribution of each gene over the
  class's samples, ranked (the original's "gene importance rank for each cancer");
  :func:`write_rnk` exports each class as a GSEA pre-ranked ``.rnk`` file.
* :func:`ablation_study` — per class, the accuracy drop when the class's top-ranked genes are
  set to 0, next to the same number of random genes.
* :func:`training_importances` — what ``TGEMClassifier.feature_importances_`` returns.

Attributions explain the target's **log-probability** (the network's output), as in the
original, which applied captum to the log-softmax output.

Attributions and baselines are in the units of ``X`` as passed to the classifier, one value
per input gene. The ``"zeros"`` baseline is an input of zeros in those units (zero
expression on log-normalised data), also for a model fitted with ``standardize=True``: its
per-gene standardisation is the network's first operation, so the path from the baseline
to ``x`` runs through the standardised values ``(0 - mean) / scale`` to ``(x - mean) /
scale`` and the gradients include the ``1 / scale`` factors. To ask "compared with average
expression" pass ``baseline="mean"``.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils.validation import check_is_fitted

from tgem import _ig
from tgem._finite import RESULT_FIX, check_finite_input, check_finite_result
from tgem._naming import default_gene_names, encode_labels
from tgem._runtime import dense_batch, draw_seed, torch_threads
from tgem._sampling import MIN_PER_CLASS, stratified_subsample  # noqa: F401 - old import path

__all__ = [
    "METHODS",
    "GRIDS",
    "attribute",
    "gene_ranking",
    "write_rnk",
    "ablation_study",
    "training_importances",
]

logger = logging.getLogger(__name__)

#: Attribution methods and the original's short names for them.
METHODS = {
    "integrated_gradients": "ig",
    "ig_smoothgrad_sq": "sg_ig",
    "ig_vargrad": "vg_ig",
    "guided_backprop": "gb",
    "guided_backprop_smoothgrad_sq": "sg_gb",
    "guided_backprop_vargrad": "vg_gb",
}
_ALIASES = {short: name for name, short in METHODS.items()}

#: The original's two ablation grids: percentages of the genes set to 0.
GRIDS = {
    "0.5-5%": tuple(np.round(np.linspace(0.5, 5.0, 10), 2)),
    "1-10%": tuple(np.round(np.linspace(1.0, 10.0, 10), 2)),
}

#: Activation memory (bytes) one forward+backward pass may use when ``internal_batch_size``
#: is None.
MEMORY_BUDGET = 256 << 20


# ----------------------------------------------------------------------------- helpers
def _fitted_module(clf):
    check_is_fitted(clf, "module_")
    module = clf.module_
    module.eval()
    return module


def _resolve_method(method: str) -> tuple[str, str | None]:
    """``(base, noise_tunnel)`` with base in {"ig", "gb"} and the tunnel type or None."""
    name = _ALIASES.get(method, method)
    if name not in METHODS:
        raise ValueError(
            f"method={method!r} is not an attribution method; choose one of "
            f"{sorted(METHODS)} (or the original's short names {sorted(_ALIASES)})."
        )
    base = "ig" if name.startswith(("integrated", "ig")) else "gb"
    tunnel = (
        "smoothgrad_sq"
        if name.endswith("smoothgrad_sq")
        else "vargrad"
        if name.endswith("vargrad")
        else None
    )
    return base, tunnel


def _resolve_target(clf, X, target, y, n: int) -> np.ndarray:
    """Class indices (n,) for ``target`` ("true", "predicted", a label or per-sample labels)."""
    if isinstance(target, str) and target == "true":
        if y is None:
            raise ValueError(
                "target='true' needs the true labels: pass y=... (one label per row of X), "
                "or use target='predicted' or a class label."
            )
        y = np.asarray(y).ravel()
        if y.shape[0] != n:
            raise ValueError(
                f"y has {y.shape[0]} labels but X has {n} rows; pass one label per row."
            )
        return encode_labels(clf.classes_, y, "y")
    if isinstance(target, str) and target == "predicted":
        return np.argmax(clf._log_proba(X), axis=1).astype(np.int64)
    arr = np.asarray(target)
    if arr.ndim == 0:
        return np.full(n, encode_labels(clf.classes_, arr[None], "target")[0], dtype=np.int64)
    if arr.shape != (n,):
        raise ValueError(
            f"target has shape {arr.shape}; pass 'true', 'predicted', one class "
            f"label, or one label per row of X ({n},)."
        )
    return encode_labels(clf.classes_, arr, "target")


def _training_mean(clf) -> np.ndarray:
    sample = clf.__dict__.get("_training_sample")
    if sample is None:
        raise ValueError(
            "baseline='mean' uses the mean of the training data, which a loaded or unpickled "
            "model does not keep (it is patient data). Pass the mean as an array instead: "
            "baseline=X_train.mean(axis=0)."
        )
    return sample.mean


def _resolve_baseline(clf, baseline, n: int, n_genes: int) -> np.ndarray:
    """Baselines as a float32 array of shape (1, genes) or (n, genes)."""
    if isinstance(baseline, str):
        if baseline == "zeros":
            return np.zeros((1, n_genes), dtype=np.float32)
        if baseline == "mean":
            return _training_mean(clf).astype(np.float32)[None, :]
        raise ValueError(
            f"baseline={baseline!r}; pass 'zeros', 'mean' or an array of shape "
            f"({n_genes},) or ({n}, {n_genes})."
        )
    arr = np.asarray(baseline, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != n_genes or arr.shape[0] not in (1, n):
        raise ValueError(
            f"baseline has shape {np.shape(baseline)}; pass 'zeros', 'mean' or an "
            f"array of shape ({n_genes},) or ({n}, {n_genes})."
        )
    check_finite_input(
        arr, "baseline", "Pass 'zeros', 'mean' or an array of finite values in X's range."
    )
    return arr


def _batch_rows(clf, module, internal_batch_size: int | None) -> int:
    if internal_batch_size is not None:
        if int(internal_batch_size) < 1:
            raise ValueError(
                f"internal_batch_size={internal_batch_size}; pass a positive "
                "number of rows or None."
            )
        return int(internal_batch_size)
    layer = module.layers[0]
    return _ig.rows_budget(module.n_genes, layer.WQ.shape[0], len(module.layers), MEMORY_BUDGET)


def _as_output(clf, X_in, values: np.ndarray):
    names = getattr(clf, "feature_names_in_", None)
    if names is None:
        return values
    index = X_in.index if isinstance(X_in, pd.DataFrame) else None
    return pd.DataFrame(values, index=index, columns=pd.Index(names, name="gene"))


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
    changes sign. captum's fixed 50-node rule then leaves completeness defects of 0.01-0.5
    log-probability on random models (about 2e-3 on a fitted PBMC model); the adaptive rule
    removes them at about 1.2x the cost on fitted models.

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
    if quadrature not in _ig.QUADRATURES:
        raise ValueError(f"quadrature={quadrature!r}; choose one of {_ig.QUADRATURES}.")
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
    seed = draw_seed(random_state) if tunnel is not None else 0
    ev = _ig.Evaluator(module, batch_rows, guided=(base == "gb"))
    attr, delta, converged = _run(
        ev,
        X,
        targets,
        baselines,
        base,
        tunnel,
        int(n_steps),
        quadrature,
        tol,
        stdevs,
        int(nt_samples),
        seed,
        clf.n_threads,
        verbose,
        need_delta=return_convergence_delta,
    )
    what = f"attribute(method={method!r})'s"
    check_finite_result(attr, f"{what} attributions", RESULT_FIX)
    if return_convergence_delta:
        check_finite_result(delta, f"{what} convergence deltas", RESULT_FIX)
    _warn_unconverged(converged, delta, tol)
    out = _as_output(clf, X_in, attr)
    return (out, delta) if return_convergence_delta else out


def _run(
    ev,
    X,
    targets,
    baselines,
    base,
    tunnel,
    n_steps,
    quadrature,
    tol,
    stdevs,
    nt_samples,
    seed,
    n_threads,
    verbose,
    need_delta=True,
    on_chunk=None,
):
    """Attributions of all rows, chunk by chunk; returns (attr, delta, converged).

    ``delta`` is None for Guided Backprop, ``converged`` None for the fixed rules and Guided
    Backprop; both are (n,) or (n, nt_samples).
    """
    n, g = X.shape
    device = next(ev.module.parameters()).device
    copies = nt_samples if tunnel is not None else 1
    per_sample = n_steps * copies if base == "ig" else copies
    chunk = max(1, (4 * ev.batch_rows) // per_sample)
    attr = np.empty((n, g), dtype=np.float64)
    delta = None
    if base == "ig" and (need_delta or quadrature == "adaptive"):
        delta = np.empty((n, copies) if tunnel else n, dtype=np.float64)
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
                if tunnel is not None:
                    eps = torch.as_tensor(
                        _ig.noise(seed, ids, nt_samples, g, stdevs), device=device
                    )
                    s = x.shape[0]
                    x = (x[:, None, :] + eps).reshape(s * nt_samples, g)
                    b = b.repeat_interleave(nt_samples, 0)
                    t = t.repeat_interleave(nt_samples, 0)
                a, d, c = _base_attribution(ev, x, b, t, base, n_steps, quadrature, tol, need_delta)
                if tunnel is not None:
                    a = _ig.smooth(a.reshape(-1, nt_samples, g).transpose(0, 1), tunnel)
                    d = None if d is None else d.reshape(-1, nt_samples)
                    c = None if c is None else c.reshape(-1, nt_samples)
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


def _base_attribution(ev, x, b, t, base, n_steps, quadrature, tol, delta_needed=True):
    if base == "ig":
        a, d, _, c = _ig.integrated_gradients(
            ev, x, b, t, n_steps, quadrature, tol, need_delta=delta_needed
        )
        return a, d, c
    return ev.grad(x, t).double(), None, None


def _warn_unconverged(converged, delta, tol):
    if converged is None or converged.all():
        return
    bad = ~converged
    warnings.warn(
        f"Integrated Gradients did not reach the completeness tolerance tol={tol:g} for "
        f"{int(bad.sum())} of {bad.size} sample(s) within {_ig.MAX_STEPS_FACTOR} x n_steps "
        f"gradients; the largest defect is {float(np.max(np.abs(delta[bad]))):.3g} "
        "log-probability. Increase n_steps or tol.",
        ConvergenceWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------- rankings
def gene_ranking(
    attributions, y, *, genes=None, absolute: bool = False, rank_by: str = "mean"
) -> pd.DataFrame:
    """Per class, the mean and the median attribution of each gene, ranked.

    Parameters
    ----------
    attributions : ndarray or DataFrame of shape (n_samples, n_genes)
        Output of :func:`attribute`.
    y : array-like of shape (n_samples,)
        The class of each sample (usually the true labels, as in the original).
    genes : array-like of shape (n_genes,), optional
        Gene names; default: the DataFrame's columns, else ``"gene_0"``, ``"gene_1"``, ...
    absolute : bool, default=False
        Average ``|attribution|`` instead of the signed values (the original's ``--abs``).
    rank_by : {"mean", "median"}, default="mean"
        The statistic ranked (1 = largest; ties by gene order).

    Returns
    -------
    DataFrame
        Tidy: one row per (class, gene) with columns ``gene, class, mean, median, rank``,
        sorted by class and rank.

    Examples
    --------
    >>> import numpy as np
    >>> from tgem.interpret import gene_ranking
    >>> attr = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, 0.5], [0.0, 1.0, 2.0]])
    >>> gene_ranking(attr, ["a", "a", "b"], genes=["G1", "G2", "G3"])
      gene class  mean  median  rank
    0   G1     a   2.0     2.0     1
    1   G3     a   0.5     0.5     2
    2   G2     a  -1.0    -1.0     3
    3   G3     b   2.0     2.0     1
    4   G2     b   1.0     1.0     2
    5   G1     b   0.0     0.0     3
    """
    if rank_by not in ("mean", "median"):
        raise ValueError(f"rank_by={rank_by!r}; choose 'mean' or 'median'.")
    if genes is None and isinstance(attributions, pd.DataFrame):
        genes = attributions.columns
    values = np.asarray(attributions, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"attributions must be 2-d (samples x genes); got shape {values.shape}.")
    check_finite_input(
        values, "attributions", "Pass the finite output of attribute() to rank.", limit=None
    )
    n, g = values.shape
    genes = np.asarray(default_gene_names(g) if genes is None else genes)
    if genes.shape != (g,):
        raise ValueError(f"genes has {genes.size} names for {g} attribution columns.")
    y = np.asarray(y).ravel()
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} labels for {n} rows of attributions.")
    if absolute:
        values = np.abs(values)
    frames = []
    for cls in np.unique(y):
        rows = values[y == cls]
        stats = pd.DataFrame(
            {"gene": genes, "class": cls, "mean": rows.mean(0), "median": np.median(rows, axis=0)}
        )
        order = np.argsort(-stats[rank_by].to_numpy(), kind="stable")
        stats = stats.iloc[order]
        stats["rank"] = np.arange(1, g + 1)
        frames.append(stats)
    return pd.concat(frames, ignore_index=True)


def write_rnk(ranking: pd.DataFrame, directory, *, score: str = "mean", prefix: str = "") -> dict:
    """Write each class of a :func:`gene_ranking` table as a GSEA pre-ranked ``.rnk`` file.

    Each file has one ``gene<TAB>score`` line per gene, sorted by decreasing score, no
    header, as GSEA's "GSEAPreranked" expects.

    Parameters
    ----------
    ranking : DataFrame
        Output of :func:`gene_ranking`.
    directory : str or path
        Created if missing.
    score : {"mean", "median"}, default="mean"
    prefix : str, default=""
        Prepended to each file name (``<prefix><class>.rnk``; characters other than
        letters, digits, ``.``, ``-`` and ``_`` become ``_``).

    Returns
    -------
    dict
        Class label -> path written.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from tgem.interpret import gene_ranking, write_rnk
    >>> table = gene_ranking(np.array([[1.0, -1.0], [2.0, 0.0]]), ["B cell", "B cell"],
    ...                      genes=["CD79A", "LYZ"])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     paths = write_rnk(table, d)
    ...     print(paths["B cell"].name, paths["B cell"].read_text().split())
    B_cell.rnk ['CD79A', '1.5', 'LYZ', '-0.5']
    """

    if score not in ("mean", "median"):
        raise ValueError(f"score={score!r}; choose 'mean' or 'median'.")
    missing = {"gene", "class", score} - set(ranking.columns)
    if missing:
        raise ValueError(
            f"ranking lacks the columns {sorted(missing)}; pass the output of "
            "tgem.interpret.gene_ranking."
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for cls, part in ranking.groupby("class", sort=True):
        part = part.sort_values(score, ascending=False, kind="stable")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{prefix}{cls}") + ".rnk"
        path = out / name
        lines = [f"{gene}\t{value:.10g}" for gene, value in zip(part["gene"], part[score])]
        path.write_text("\n".join(lines) + "\n")
        paths[cls] = path
    return paths


# ----------------------------------------------------------------------------- ablation
@torch.no_grad()
def _accuracy_counts(
    module, x: torch.Tensor, target: int, masks: torch.Tensor, batch_rows: int
) -> np.ndarray:
    """Correct predictions of class ``target`` on ``x`` (s, genes) under each zeroing mask.

    ``masks`` is (m, genes), True where a gene is set to 0; returns (m,) counts.
    """
    s = x.shape[0]
    per = max(1, batch_rows // max(1, s))
    counts = np.empty(masks.shape[0], dtype=np.int64)
    for i in range(0, masks.shape[0], per):
        mk = masks[i : i + per]
        rows = x[None, :, :].masked_fill(mk[:, None, :], 0.0).reshape(-1, x.shape[1])
        pred = module(rows).argmax(1).reshape(mk.shape[0], s)
        counts[i : i + per] = (pred == target).sum(1).cpu().numpy()
    return counts


def ablation_study(
    clf,
    X,
    y,
    *,
    ranking: pd.DataFrame | None = None,
    score: str = "mean",
    grids: dict | None = None,
    n_random: int = 10,
    random_state=None,
    batch_size: int = 1024,
    verbose: int = 0,
    **attribute_kw,
) -> pd.DataFrame:
    """Accuracy drop when each class's top-ranked genes are set to 0, against random genes.

    For each class, the class's own ranking is applied to the class's own samples: the top
    k % of the genes are set to 0 and the accuracy on those samples is compared with the
    unmodified accuracy. As a control, the same number of genes drawn at random (``n_random``
    draws per k) is set to 0. Overall figures pool all samples, each with its class's genes.

    Parameters
    ----------
    clf : TGEMClassifier
        Fitted classifier.
    X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_genes)
        Samples, typically held-out ones.
    y : array-like of shape (n_samples,)
        Their true labels.
    ranking : DataFrame, optional
        A :func:`gene_ranking` table (genes named as the model's genes, or ``gene_<j>``).
        Default: Integrated Gradients of ``X`` for the true class (``attribute_kw`` are
        passed to :func:`attribute`), ranked by signed mean.
    score : {"mean", "median"}, default="mean"
        Which statistic of ``ranking`` orders the genes.
    grids : dict of name -> sequence of percentages, optional
        Default :data:`GRIDS`: the original's 0.5-5 % and 1-10 % in 10 steps each.
    n_random : int, default=10
        Random draws per class and percentage.
    random_state : int, RandomState instance or None
        Seeds the random genes.
    batch_size : int, default=1024
        Rows per inference pass.
    verbose : int, default=0

    Returns
    -------
    DataFrame
        One row per (grid, class, percent) and per (grid, percent) for all samples
        (``class == "all"``, ``overall`` True), with ``n_genes`` set to 0, ``n_samples``,
        ``accuracy`` (unmodified), ``accuracy_top``, ``accuracy_random_mean``,
        ``accuracy_random_std`` and the drops ``drop_top``, ``drop_random_mean``,
        ``drop_random_std`` (accuracy minus modified accuracy; positive = worse).

    Examples
    --------
    >>> import numpy as np
    >>> from tgem import TGEMClassifier
    >>> from tgem.interpret import ablation_study
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(60, 20)).astype(np.float32) + 1
    >>> y = np.where(X[:, 0] > 1, "up", "down")
    >>> clf = TGEMClassifier(n_layers=1, n_heads=2, learning_rate=1e-2, max_epochs=10,
    ...                      n_threads=1, random_state=0).fit(X, y)
    >>> res = ablation_study(clf, X, y, grids={"5-10%": [5, 10]}, n_random=3,
    ...                      random_state=0)
    >>> res[["grid", "class", "percent", "n_genes"]].head(3)
        grid class  percent  n_genes
    0  5-10%  down      5.0        1
    1  5-10%  down     10.0        2
    2  5-10%    up      5.0        1
    """
    module = _fitted_module(clf)
    grids = GRIDS if grids is None else grids
    if int(n_random) < 1:
        raise ValueError(
            f"n_random={n_random}; pass at least 1 random draw (10 or more for a useful spread)."
        )
    X_in = X
    X = clf._validate_X(X, reset=False)
    n, g = X.shape
    y = np.asarray(y).ravel()
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} labels but X has {n} rows.")
    y_enc = encode_labels(clf.classes_, y, "y")
    if ranking is None:
        attr = attribute(clf, X_in, target="true", y=y, verbose=verbose, **attribute_kw)
        ranking = gene_ranking(attr, y, genes=_gene_names(clf))
    orders = _class_orders(clf, ranking, score, g)
    rng = np.random.default_rng(draw_seed(random_state))
    device = next(module.parameters()).device
    percents = sorted({float(p) for grid in grids.values() for p in grid})
    for p in percents:
        if not 0 < p <= 100:
            raise ValueError(f"ablation percentages must be in (0, 100]; got {p}.")
    sizes = {p: max(1, int(round(p / 100.0 * g))) for p in percents}
    results = {}  # (class index, percent) -> (n, base correct, top correct, random corrects)
    present = np.unique(y_enc)
    with torch_threads(clf.n_threads):
        for c in present:
            idx = np.flatnonzero(y_enc == c)
            label = clf.classes_[c]
            if label not in orders:
                raise ValueError(
                    f"ranking has no genes for class {label!r}; rank the genes "
                    "on samples of every class in y."
                )
            x = dense_batch(X, idx, device)
            masks = [np.zeros(g, dtype=bool)]
            for p in percents:
                top = np.zeros(g, dtype=bool)
                top[orders[label][: sizes[p]]] = True
                masks.append(top)
                for _ in range(int(n_random)):
                    rand = np.zeros(g, dtype=bool)
                    rand[rng.choice(g, size=sizes[p], replace=False)] = True
                    masks.append(rand)
            counts = _accuracy_counts(
                module, x, int(c), torch.as_tensor(np.stack(masks), device=device), batch_size
            )
            base, rest = counts[0], counts[1:].reshape(len(percents), 1 + int(n_random))
            for j, p in enumerate(percents):
                results[(c, p)] = (len(idx), base, rest[j, 0], rest[j, 1:])
    rows = []
    for grid_name, grid in grids.items():
        for c in present:
            for p in grid:
                m, base, top, rand = results[(c, float(p))]
                rows.append(
                    _ablation_row(
                        grid_name,
                        clf.classes_[c],
                        False,
                        float(p),
                        sizes[float(p)],
                        m,
                        base,
                        top,
                        rand,
                    )
                )
        for p in grid:
            parts = [results[(c, float(p))] for c in present]
            m = sum(r[0] for r in parts)
            rows.append(
                _ablation_row(
                    grid_name,
                    "all",
                    True,
                    float(p),
                    sizes[float(p)],
                    m,
                    sum(r[1] for r in parts),
                    sum(r[2] for r in parts),
                    np.sum([r[3] for r in parts], axis=0),
                )
            )
    return pd.DataFrame(rows)


def _ablation_row(grid, cls, overall, percent, n_genes, m, base, top, rand) -> dict:
    acc = base / m
    rand_acc = np.asarray(rand, dtype=np.float64) / m
    return {
        "grid": grid,
        "class": cls,
        "overall": overall,
        "percent": percent,
        "n_genes": n_genes,
        "n_samples": m,
        "accuracy": acc,
        "accuracy_top": top / m,
        "accuracy_random_mean": rand_acc.mean(),
        "accuracy_random_std": rand_acc.std(),
        "drop_top": acc - top / m,
        "drop_random_mean": acc - rand_acc.mean(),
        "drop_random_std": rand_acc.std(),
    }


def _gene_names(clf) -> np.ndarray:
    names = getattr(clf, "feature_names_in_", None)
    if names is not None:
        return np.asarray(names)
    return default_gene_names(clf.n_features_in_)


def _class_orders(clf, ranking: pd.DataFrame, score: str, g: int) -> dict:
    """Class label -> gene column indices from the best to the worst ranked."""
    missing = {"gene", "class", score} - set(ranking.columns)
    if missing:
        raise ValueError(
            f"ranking lacks the columns {sorted(missing)}; pass the output of "
            "tgem.interpret.gene_ranking."
        )
    position = {name: j for j, name in enumerate(_gene_names(clf).tolist())}
    orders = {}
    for cls, part in ranking.groupby("class", sort=False):
        part = part.sort_values(score, ascending=False, kind="stable")
        try:
            cols = np.array([position[gname] for gname in part["gene"].tolist()])
        except KeyError as exc:
            raise ValueError(
                f"ranking names gene {exc.args[0]!r}, which the model was not "
                "fitted on; rank the model's own genes."
            ) from None
        if len(cols) != g:
            raise ValueError(
                f"ranking ranks {len(cols)} genes for class {cls!r}; the model "
                f"has {g}. Rank all genes."
            )
        orders[cls] = cols
    return orders


# ----------------------------------------------------------------------------- importances
def training_importances(clf) -> np.ndarray:
    """Gene importances of a fitted classifier from Integrated Gradients on training data.

    The stratified subsample of the training rows that ``fit`` copied
    (``clf.importance_n_samples``, at least 20 per class where the class has them, drawn from
    ``clf.random_state``; see :class:`tgem._sampling.TrainingSample`) is attributed with
    :func:`attribute` (target: the true class; baseline ``clf.importance_baseline``:
    "zeros" or the training mean; adaptive quadrature, 50 steps). The mean absolute
    attribution of each gene, normalised to sum to 1, is returned. This is what
    ``TGEMClassifier.feature_importances_`` computes (once, then cached).

    Parameters
    ----------
    clf : TGEMClassifier
        Fitted in this session (the subsample is kept in memory only, never saved).

    Returns
    -------
    ndarray of shape (`n_features_in_`,)
        Non-negative, summing to 1 (all zeros if every attribution is 0).

    Examples
    --------
    >>> import numpy as np
    >>> from tgem import TGEMClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(60, 5)).astype(np.float32)
    >>> y = np.where(X[:, 0] > 0, "up", "down")
    >>> clf = TGEMClassifier(n_layers=1, n_heads=2, learning_rate=1e-2, max_epochs=10,
    ...                      importance_n_samples=30, n_threads=1, random_state=0).fit(X, y)
    >>> imp = clf.feature_importances_
    >>> imp.shape, round(float(imp.sum()), 6), bool(np.all(imp >= 0))
    ((5,), 1.0, True)
    """
    module = _fitted_module(clf)
    sample = clf.__dict__.get("_training_sample")
    if sample is None:
        raise NotFittedError(
            "feature_importances_ was not computed before this model was saved or pickled, "
            "and the training data is not kept in model files. Refit the model (or compute "
            "feature_importances_ before saving), or use tgem.interpret.attribute on data "
            "you have."
        )
    X, y_enc = sample.X, sample.y  # the stratified rows fit copied (tgem._sampling)
    n_rows = X.shape[0]
    baseline = (
        _training_mean(clf).astype(np.float32)[None, :]
        if clf.importance_baseline == "mean"
        else np.zeros((1, X.shape[1]), dtype=np.float32)
    )
    n_steps = 50
    batch_rows = _batch_rows(clf, module, None)
    logger.info(
        "computing feature_importances_: Integrated Gradients on %d training samples x %d "
        "genes, %d classes, %d steps (at least %d gradient evaluations; adaptive refinement "
        "adds some)",
        n_rows,
        X.shape[1],
        len(clf.classes_),
        n_steps,
        n_rows * n_steps,
    )
    t0 = time.perf_counter()
    reported = []

    def on_chunk(done):
        if not reported and done < n_rows:
            elapsed = time.perf_counter() - t0
            reported.append(done)
            logger.info(
                "feature_importances_: %d/%d samples in %.1f s, about %.0f s left",
                done,
                n_rows,
                elapsed,
                elapsed * (n_rows - done) / done,
            )

    ev = _ig.Evaluator(module, batch_rows)
    attr, delta, converged = _run(
        ev,
        X,
        y_enc,
        baseline,
        "ig",
        None,
        n_steps,
        "adaptive",
        1e-3,
        0.0,
        1,
        0,
        clf.n_threads,
        clf.verbose,
        need_delta=False,
        on_chunk=on_chunk,
    )
    check_finite_result(attr, "feature_importances_'s attributions", RESULT_FIX)
    _warn_unconverged(converged, delta, 1e-3)
    imp = np.abs(attr).mean(0)
    total = imp.sum()
    logger.info("feature_importances_ computed in %.1f s", time.perf_counter() - t0)
    return imp / total if total > 0 else imp
