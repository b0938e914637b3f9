"""Attention figures: entropy box plots, attention heatmaps, hub-gene subnetworks."""

from __future__ import annotations

import math

import numpy as np

from tgem.attention import hub_genes
from tgem.plotting._pyplot import pyplot

__all__ = ["plot_entropy", "plot_attention_map", "plot_network"]


def _axes(ax, figsize):
    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def plot_entropy(entropy, *, n_genes: int | None = None, ax=None):
    """Box plots of attention entropy per head, grouped by layer (the paper's figure).

    Parameters
    ----------
    entropy : array-like of shape (n_values, n_layers, n_heads)
        Distribution of entropies for each head and layer, e.g.
        ``attention_entropy(clf, X, per_sample=True)`` (one value per sample).
    n_genes : int, optional
        Draws the maximum entropy ``log(n_genes)`` (uniform attention) as a dashed line.
    ax : matplotlib Axes, optional
        Where to draw (default: a new figure).

    Returns
    -------
    Axes

    Raises
    ------
    ImportError
        If matplotlib is not installed (``pip install "tgem[plot]"``).
    ValueError
        If ``entropy`` is not 3-dimensional.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from tgem.plotting import plot_entropy
    >>> ent = np.random.default_rng(0).uniform(1, 2, size=(30, 3, 5))
    >>> ax = plot_entropy(ent, n_genes=10)
    >>> len(ax.get_xticks())
    15
    """
    ent = np.asarray(entropy, dtype=float)
    if ent.ndim != 3:
        raise ValueError(
            f"entropy must have shape (n_values, n_layers, n_heads), got {ent.shape}; pass "
            "attention_entropy(clf, X, per_sample=True)."
        )
    _, n_layers, n_heads = ent.shape
    ax = _axes(ax, (max(4.0, 0.45 * n_layers * n_heads + 1.5), 3.6))
    colors = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    positions, labels = [], []
    for li in range(n_layers):
        pos = [li * (n_heads + 1) + h for h in range(n_heads)]
        parts = ax.boxplot(
            [ent[:, li, h] for h in range(n_heads)],
            positions=pos,
            widths=0.7,
            patch_artist=True,
            showfliers=False,
        )
        for box in parts["boxes"]:
            box.set_facecolor(colors[li % len(colors)])
            box.set_alpha(0.6)
        for med in parts["medians"]:
            med.set_color("black")
        positions += pos
        labels += [f"{h + 1}" for h in range(n_heads)]
    ax.set_xticks(positions, labels)
    top = ax.secondary_xaxis("top")
    top.set_xticks(
        [li * (n_heads + 1) + (n_heads - 1) / 2 for li in range(n_layers)],
        [f"layer {li + 1}" for li in range(n_layers)],
    )
    top.tick_params(length=0)
    ax.ticklabel_format(axis="y", useOffset=False)  # an offset text would hide the layer names
    ax.set_xlabel("head")
    ax.set_ylabel("attention entropy (nats)")
    if n_genes is not None:
        ax.axhline(math.log(n_genes), ls="--", color="grey", lw=1, label=f"uniform (log {n_genes})")
        ax.legend(loc="lower right", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return ax


def plot_attention_map(
    attention, genes=None, *, ax=None, cmap: str = "viridis", colorbar: bool = True
):
    """Heatmap of an attention map (query genes as rows, key genes as columns).

    Parameters
    ----------
    attention : array-like of shape (n_genes, n_genes)
        E.g. ``attention_map(clf, X, layer=0, head=0, genes=[...])``.
    genes : sequence of str, optional
        Names shown on the axes (when there are at most 60).
    ax : matplotlib Axes, optional
    cmap : str, default="viridis"
    colorbar : bool, default=True

    Returns
    -------
    Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from tgem.plotting import plot_attention_map
    >>> ax = plot_attention_map(np.eye(3)[::-1], ["a", "b", "c"])
    >>> [t.get_text() for t in ax.get_yticklabels()]
    ['a', 'b', 'c']
    """
    a = np.asarray(attention, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"attention must be a square (genes, genes) matrix, got {a.shape}.")
    g = a.shape[0]
    if genes is not None and len(genes) != g:
        raise ValueError(f"genes has {len(genes)} names for a {g} x {g} map.")
    side = min(10.0, 2.5 + 0.18 * g)
    ax = _axes(ax, (side + 1.0, side))
    off = a[~np.eye(g, dtype=bool)] if g > 1 else a.ravel()
    # the colour scale follows the off-diagonal weights: the model zeroes the diagonal
    image = ax.imshow(
        a,
        cmap=cmap,
        interpolation="nearest",
        aspect="equal",
        vmin=float(off.min()),
        vmax=float(off.max()),
    )
    if genes is not None and g <= 60:
        ax.set_xticks(range(g), [str(x) for x in genes], rotation=90, fontsize="small")
        ax.set_yticks(range(g), [str(x) for x in genes], fontsize="small")
    ax.set_xlabel("key gene")
    ax.set_ylabel("query gene")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="attention weight", shrink=0.8)
    return ax


def plot_network(
    edges, *, top: int = 20, by: str = "degree", label=None, max_edges: int = 400, ax=None
):
    """Draw the subnetwork around the hub genes of an attention network.

    The ``top`` hub genes (:func:`tgem.attention.hub_genes`) sit on an inner circle, their
    neighbours on an outer one; edges (query -> key) are coloured by layer and their width
    follows the score. No networkx needed.

    Parameters
    ----------
    edges : DataFrame
        From :func:`tgem.attention.attention_edges` or
        :func:`tgem.attention.attention_network`.
    top : int, default=20
        Number of hub genes.
    by : str, default="degree"
        Ranking key of :func:`tgem.attention.hub_genes`.
    label : class label, optional
        With a ``class`` column holding several classes, the class to draw (required then).
    max_edges : int, default=400
        Edges drawn at most (the highest scores).
    ax : matplotlib Axes, optional

    Returns
    -------
    Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas as pd
    >>> from tgem.plotting import plot_network
    >>> edges = pd.DataFrame({"layer": [0, 0, 1], "query": ["a", "c", "a"],
    ...                       "key": ["b", "a", "d"], "score": [1.0, 0.5, 0.2]})
    >>> ax = plot_network(edges, top=1)
    >>> [t.get_text() for t in ax.texts]
    ['a']
    """

    if "class" in edges and edges["class"].nunique() > 1:
        if label is None:
            raise ValueError(
                f"edges hold classes {edges['class'].unique().tolist()}; pass "
                "label= to choose the one to draw."
            )
        edges = edges[edges["class"] == label]
    elif label is not None and "class" in edges:
        edges = edges[edges["class"] == label]
    if len(edges) == 0:
        raise ValueError("edges is empty: there is no network to draw (lower the threshold).")
    plt = pyplot()
    from matplotlib.collections import LineCollection

    hubs = hub_genes(edges.drop(columns="class", errors="ignore"), top=top, by=by)
    hub_list = hubs["gene"].tolist()
    hub_set = set(hub_list)
    sub = edges[edges["query"].isin(hub_set) | edges["key"].isin(hub_set)]
    sub = sub.reindex(sub["score"].abs().sort_values(ascending=False).index).head(max_edges)
    others = []
    for q, k in zip(sub["query"], sub["key"], strict=True):
        for node in (q, k):
            if node not in hub_set and node not in others:
                others.append(node)
    pos = {}
    for i, node in enumerate(hub_list):
        t = 2 * math.pi * i / max(1, len(hub_list))
        pos[node] = (math.cos(t), math.sin(t))
    for i, node in enumerate(others):
        t = 2 * math.pi * (i + 0.5) / max(1, len(others))
        pos[node] = (2.2 * math.cos(t), 2.2 * math.sin(t))
    ax = _axes(ax, (7.0, 7.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    layers = sorted(sub["layer"].unique()) if "layer" in sub else [0]
    smax = float(sub["score"].abs().max()) or 1.0
    for li in layers:
        part = sub[sub["layer"] == li] if "layer" in sub else sub
        segs = [(pos[q], pos[k]) for q, k in zip(part["query"], part["key"], strict=True)]
        widths = 0.3 + 2.2 * part["score"].abs().to_numpy() / smax
        ax.add_collection(
            LineCollection(
                segs,
                linewidths=widths,
                alpha=0.45,
                color=colors[int(li) % len(colors)],
                label=f"layer {int(li) + 1}",
            )
        )
    degree = dict(zip(hubs["gene"], hubs["degree"], strict=True))
    hx = [pos[n][0] for n in hub_list]
    hy = [pos[n][1] for n in hub_list]
    sizes = [40 + 260 * degree[n] / max(degree.values()) for n in hub_list]
    ax.scatter(
        [pos[n][0] for n in others], [pos[n][1] for n in others], s=12, color="grey", zorder=3
    )
    ax.scatter(hx, hy, s=sizes, color="tab:red", edgecolor="black", zorder=4)
    for n in hub_list:
        x, y = pos[n]
        ax.text(x * 1.12, y * 1.12, str(n), ha="center", va="center", fontsize="small", zorder=5)
    ax.set_xlim(-2.6, 2.6)
    ax.set_ylim(-2.6, 2.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(loc="upper right", fontsize="small")
    return ax
