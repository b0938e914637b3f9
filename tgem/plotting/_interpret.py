"""Figures for gene attributions: the ablation curves and a class's top-ranked genes."""

from __future__ import annotations

import numpy as np

from tgem.plotting._pyplot import pyplot

__all__ = ["plot_ablation", "plot_gene_ranking"]

_ABLATION_COLUMNS = {
    "grid",
    "class",
    "overall",
    "percent",
    "drop_top",
    "drop_random_mean",
    "drop_random_std",
}


def plot_ablation(result, *, classes=None, axes=None):
    """Accuracy drop against the percentage of genes set to 0: top-ranked vs random genes.

    One panel per grid of the study. The solid line is the drop when the top-ranked genes
    are zeroed; the dashed line and band are the mean and standard deviation over the random
    draws of the same number of genes.

    Parameters
    ----------
    result : DataFrame
        Output of :func:`tgem.interpret.ablation_study`.
    classes : None, "all" or list of labels, default=None
        None draws the overall curves (all samples); "all" adds one curve per class; a list
        draws those classes.
    axes : sequence of matplotlib Axes, optional
        One per grid; created otherwise.

    Returns
    -------
    ndarray of matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas as pd
    >>> from tgem.plotting import plot_ablation
    >>> res = pd.DataFrame({"grid": "1-10%", "class": "all", "overall": True,
    ...                     "percent": [1.0, 2.0], "drop_top": [0.1, 0.3],
    ...                     "drop_random_mean": [0.0, 0.01], "drop_random_std": [0.0, 0.01]})
    >>> plot_ablation(res).shape
    (1,)
    """
    missing = _ABLATION_COLUMNS - set(getattr(result, "columns", ()))
    if missing:
        raise ValueError(
            f"plot_ablation needs the output of tgem.interpret.ablation_study; "
            f"the table lacks {sorted(missing)}."
        )
    plt = pyplot()
    grids = list(dict.fromkeys(result["grid"]))
    if axes is None:
        _, axes = plt.subplots(1, len(grids), figsize=(5 * len(grids), 3.8), squeeze=False)
        axes = axes[0]
    axes = np.atleast_1d(np.asarray(axes, dtype=object))
    if len(axes) != len(grids):
        raise ValueError(
            f"axes has {len(axes)} Axes for {len(grids)} grids {grids}; pass one per grid."
        )
    if classes is None:
        wanted = []
    elif isinstance(classes, str) and classes == "all":
        wanted = list(dict.fromkeys(result.loc[~result["overall"], "class"]))
    else:
        wanted = list(classes)
    for ax, grid in zip(axes, grids):
        part = result[result["grid"] == grid]
        overall = part[part["overall"]].sort_values("percent")
        line = ax.plot(
            overall["percent"],
            overall["drop_top"],
            "-o",
            color="C0",
            label="top-ranked genes (all samples)",
        )[0]
        mean, std = overall["drop_random_mean"], overall["drop_random_std"]
        ax.plot(overall["percent"], mean, "--", color=line.get_color(), label="random genes")
        ax.fill_between(
            overall["percent"], mean - std, mean + std, color=line.get_color(), alpha=0.2
        )
        for i, cls in enumerate(wanted, start=1):
            rows = part[(~part["overall"]) & (part["class"] == cls)].sort_values("percent")
            if rows.empty:
                raise ValueError(f"class {cls!r} is not in the ablation result.")
            color = f"C{i % 10}"
            ax.plot(rows["percent"], rows["drop_top"], "-", color=color, lw=1, label=str(cls))
            ax.plot(rows["percent"], rows["drop_random_mean"], ":", color=color, lw=1)
        ax.set_xlabel("genes set to 0 (%)")
        ax.set_ylabel("accuracy drop")
        ax.set_title(f"ablation {grid}")
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.legend(fontsize="small")
    return axes


def plot_gene_ranking(ranking, cls, *, top: int = 20, score: str = "mean", ax=None):
    """Horizontal bars of one class's top-ranked genes from a gene-ranking table.

    Parameters
    ----------
    ranking : DataFrame
        Output of :func:`tgem.interpret.gene_ranking`.
    cls : label
        The class to draw.
    top : int, default=20
        Number of genes.
    score : {"mean", "median"}, default="mean"
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from tgem.interpret import gene_ranking
    >>> from tgem.plotting import plot_gene_ranking
    >>> table = gene_ranking(np.array([[1.0, -1.0, 0.2]]), ["B"], genes=["CD79A", "LYZ", "MS4A1"])
    >>> [t.get_text() for t in plot_gene_ranking(table, "B", top=2).get_yticklabels()]
    ['CD79A', 'MS4A1']
    """
    missing = {"gene", "class", score} - set(getattr(ranking, "columns", ()))
    if missing:
        raise ValueError(
            f"plot_gene_ranking needs the output of tgem.interpret.gene_ranking; "
            f"the table lacks {sorted(missing)}."
        )
    part = ranking[ranking["class"] == cls]
    if part.empty:
        raise ValueError(
            f"class {cls!r} is not in the ranking; it has {list(dict.fromkeys(ranking['class']))}."
        )
    plt = pyplot()
    part = part.sort_values(score, ascending=False, kind="stable").head(int(top))
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 0.25 * len(part) + 1.2))
    pos = np.arange(len(part))[::-1]
    values = part[score].to_numpy()
    ax.barh(pos, values, color=np.where(values >= 0, "C3", "C0"))
    ax.set_yticks(pos, part["gene"].astype(str).tolist())
    ax.set_xlabel(f"{score} attribution")
    ax.set_title(f"top {len(part)} genes: {cls}")
    return ax
