"""Attention analysis of T-GEM on the bundled PBMC data (10 immune cell types, 765 genes).

Reproduces, on tgem's bundled single-cell data, the analyses of the T-GEM paper:

1. the entropy of each head's attention, per layer (table and box plot): does the first layer
   attend more broadly (higher entropy) than the last?
2. for a few cell types, the gene network from the attention attribution (Layer Integrated
   Gradients on each layer's softmax attention, baseline 0, averaged over the held-out cells of
   the type, heads summed, each layer scaled by its largest absolute score, top 0.001 of the
   links kept), its top-20 hub genes, and Cytoscape/GraphML files;
3. a heatmap of the mean first-layer attention among one cell type's hub genes.

A ``TGEMClassifier(random_state=0)`` with tgem's defaults is trained on 75 % of the cells
(stratified split, ``random_state=0``) and analysed on the other 25 %; ``--recipe original``
trains the published configuration instead (``TGEMClassifier.original``), ``--recipe scaled``
the recipe of the earlier benchmarks (a ``StandardScaler`` fitted on the training cells, then
the original with ``learning_rate=1e-3``). Training takes a few minutes on 2 CPU cores. The
fitted model is written to ``OUT/model.tgem`` (tgem's safe model format); ``--model`` analyses
such a file instead of fitting (it must come from the same split and recipe).

Run from the repository root (the figures in ``benchmarks/README.md`` come from these)::

    PYTHONPATH=. .venv/bin/python examples/attention_pbmc.py --recipe original \
        --out benchmarks/results/attention_pbmc
    PYTHONPATH=. .venv/bin/python examples/attention_pbmc.py --recipe scaled \
        --out benchmarks/results/attention_pbmc_scaled
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import tgem
from tgem import TGEMClassifier
from tgem.attention import (
    attention_entropy,
    attention_map,
    attention_network,
    hub_genes,
    write_edges,
    write_graphml,
)
from tgem.datasets import load_pbmc68k

CELL_TYPES = ["CD14+ Monocyte", "CD19+ B", "CD56+ NK", "Dendritic"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tgem_attention_output")
    p.add_argument(
        "--recipe",
        choices=["default", "original", "scaled"],
        default="default",
        help="default: TGEMClassifier(random_state=0) on the log-normalised data; "
        "original: TGEMClassifier.original(random_state=0); scaled: a StandardScaler "
        "fitted on the training cells, then the original with learning_rate=1e-3",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own setting)"
    )
    p.add_argument("--cell-types", nargs="+", default=CELL_TYPES)
    p.add_argument("--test-size", type=float, default=0.25)
    p.add_argument(
        "--model",
        help="a model file (.tgem) written by an earlier run of this "
        "script with the same recipe, analysed instead of fitting",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    X, y = load_pbmc68k(return_X_y=True, as_frame=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=args.test_size, stratify=y, random_state=0
    )
    if args.recipe == "scaled":  # standardise each gene with the training cells' statistics
        scaler = StandardScaler().fit(X_train)
        X_train, X_test = (
            pd.DataFrame(scaler.transform(part), index=part.index, columns=part.columns)
            for part in (X_train, X_test)
        )
    t0 = time.perf_counter()
    if args.model:
        clf = tgem.load(args.model)
        print(f"loaded {args.model}: {clf!r}")
    else:
        if args.recipe == "default":
            clf = TGEMClassifier(random_state=0)
        else:
            lr = 1e-3 if args.recipe == "scaled" else 1e-4
            clf = TGEMClassifier.original(learning_rate=lr, random_state=0)
        clf.fit(X_train, y_train)
        print(f"fit {time.perf_counter() - t0:.0f} s")
        clf.save(out / "model.tgem")
    print(f"test accuracy {clf.score(X_test, y_test):.3f} ({len(y_test)} cells)")

    # 1. entropy per layer and head, and its distribution over the test cells
    per_cell = attention_entropy(clf, X_test, per_sample=True)
    table = pd.DataFrame(
        per_cell.mean(0),
        index=[f"layer {i + 1}" for i in range(per_cell.shape[1])],
        columns=[f"head {h + 1}" for h in range(per_cell.shape[2])],
    )
    table["mean"] = table.mean(axis=1)
    table.to_csv(out / "entropy.csv")
    log_g = np.log(X.shape[1])
    print(f"\nattention entropy (nats; uniform attention = log {X.shape[1]} = {log_g:.5f})")
    print(table.round(5).to_string())
    print("\nits distance to uniform, log G - entropy (millinats):")
    print((1000 * (log_g - table)).round(3).to_string())
    first, last = table["mean"].iloc[0], table["mean"].iloc[-1]
    print(
        f"first layer {first:.5f} vs last layer {last:.5f}: first "
        f"{'higher' if first > last else 'not higher'} than last"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tgem.plotting import plot_attention_map, plot_entropy, plot_network

    ax = plot_entropy(per_cell, n_genes=X.shape[1])
    ax.set_title("T-GEM attention entropy on PBMC test cells")
    ax.figure.savefig(out / "entropy_boxplot.png", dpi=150)
    plt.close(ax.figure)

    # 2. gene networks and hub genes of a few cell types (held-out cells of each type)
    t0 = time.perf_counter()
    edges = attention_network(clf, X_test, y_test, target=args.cell_types, top_fraction=0.001)
    print(
        f"\nattention networks of {len(args.cell_types)} cell types: "
        f"{time.perf_counter() - t0:.0f} s, {len(edges)} links"
    )
    write_edges(edges, out / "network.tsv")
    write_graphml(edges, out / "network.graphml")
    hubs = hub_genes(edges, top=20)
    hubs.to_csv(out / "hub_genes.csv", index=False)
    for cell_type, group in hubs.groupby("class", sort=False):
        print(f"\ntop-20 hub genes, {cell_type} ({(y_test == cell_type).sum()} test cells):")
        print(", ".join(f"{g} ({d})" for g, d in zip(group["gene"], group["degree"], strict=True)))
    label = args.cell_types[0]
    ax = plot_network(edges, label=label, top=20)
    ax.set_title(f"hub-gene subnetwork, {label}")
    ax.figure.savefig(out / "network_hubs.png", dpi=150)
    plt.close(ax.figure)

    # 3. mean first-layer attention among the hub genes of that cell type
    genes = hubs.loc[hubs["class"] == label, "gene"].tolist()
    amap = attention_map(clf, X_test[(y_test == label).to_numpy()], layer=0, head=None, genes=genes)
    ax = plot_attention_map(amap, genes)
    ax.set_title(f"mean layer-1 attention among hub genes, {label}")
    ax.figure.savefig(out / "attention_map_hubs.png", dpi=150)
    plt.close(ax.figure)
    print(f"\nwrote {sorted(p.name for p in out.iterdir())} to {out}")


if __name__ == "__main__":
    main()
