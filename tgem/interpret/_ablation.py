"""The ablation study: accuracy drop when each class's top-ranked genes are set to 0."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tgem._naming import encode_labels, model_gene_names
from tgem._runtime import dense_batch, draw_seed, torch_threads
from tgem.interpret._attribute import attribute
from tgem.interpret._ranking import gene_ranking
from tgem.interpret._resolve import _fitted_module

#: The original's two ablation grids: percentages of the genes set to 0.
GRIDS = {
    "0.5-5%": tuple(np.round(np.linspace(0.5, 5.0, 10), 2)),
    "1-10%": tuple(np.round(np.linspace(1.0, 10.0, 10), 2)),
}


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
        ranking = gene_ranking(attr, y, genes=model_gene_names(clf))
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


def _class_orders(clf, ranking: pd.DataFrame, score: str, g: int) -> dict:
    """Class label -> gene column indices from the best to the worst ranked."""
    missing = {"gene", "class", score} - set(ranking.columns)
    if missing:
        raise ValueError(
            f"ranking lacks the columns {sorted(missing)}; pass the output of "
            "tgem.interpret.gene_ranking."
        )
    position = {name: j for j, name in enumerate(model_gene_names(clf).tolist())}
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
