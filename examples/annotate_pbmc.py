"""Annotating new cells: train on part of the PBMC cells, annotate the rest as an AnnData.

The model never sees the B cells ("CD19+ B"): they stand for a cell type missing from the
reference, which an annotation should leave "unassigned" rather than call something else.
The model is calibrated (``calibration="temperature"``), so its probabilities and its
rejection thresholds come from cells it did not train on, and it keeps a reference of its
training cells: ``annotate``'s default rule then leaves unassigned the cells far from all of
them (``"neighbors"``; ``"combined"`` from 100 held-out cells).

Runs offline in under a minute on one CPU core (20 epochs, fewer than the default 50; enough
on this small data set). Needs the optional extras: ``pip install "tgem[anndata,plot]"``.

    python examples/annotate_pbmc.py                    # to ./tgem_examples_output/annotate_pbmc/
    python examples/annotate_pbmc.py --figure fig.png   # the figure to fig.png
    python examples/annotate_pbmc.py --docs             # the figure of the docs' tutorial
"""

import argparse
from pathlib import Path

import anndata
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import tgem  # noqa: E402
from tgem.datasets import load_pbmc68k  # noqa: E402

UNSEEN = "CD19+ B"
DOCS_FIGURE = Path(__file__).resolve().parents[1] / "docs" / "_static" / "annotate_pbmc.png"

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--figure", type=Path, default=None, help="where to write the figure")
parser.add_argument("--docs", action="store_true", help=f"write the figure to {DOCS_FIGURE}")
args = parser.parse_args()
out = Path("tgem_examples_output") / "annotate_pbmc"
out.mkdir(parents=True, exist_ok=True)
figure_path = DOCS_FIGURE if args.docs else args.figure or out / "annotate_pbmc.png"

# --- 1. A reference: 60 % of the cells of the nine other types, with calibration ----------
X, y = load_pbmc68k(return_X_y=True, as_frame=True)  # 700 cells x 765 genes, log-normalised
seen = y.index[y != UNSEEN]
train, _ = train_test_split(seen, train_size=0.6, stratify=y[seen], random_state=0)
model = tgem.TGEMClassifier(max_epochs=20, calibration="temperature", random_state=0)
model.fit(X.loc[train], y.loc[train])  # 10 % of each type held out to calibrate on
report = model.calibration_report_
print(
    f"trained on {report['n_train']} cells, calibrated on {report['n_calibration']}: "
    f"temperature {model.temperature_:.2f}, held-out ECE {report['ece_before']:.3f} -> "
    f"{report['ece_after']:.3f}"
)

# --- 2. The query: every other cell, as an AnnData with a clustering of its own -----------
query = X.drop(index=train)
adata = anndata.AnnData(query)
adata.obs["truth"] = pd.Categorical(y.loc[query.index])  # unknown in real use; to check
adata.obsm["X_pca"] = PCA(n_components=20, random_state=0).fit_transform(adata.X)
kmeans = KMeans(n_clusters=12, n_init=10, random_state=0).fit(adata.obsm["X_pca"])
adata.obs["kmeans"] = pd.Categorical(kmeans.labels_.astype(str))
print(adata)

# --- 3. Annotate: labels, confidence, probabilities, majority vote per k-means cluster ----
tgem.annotate(adata, model, majority_voting="kmeans")
rejection = adata.uns["tgem"]["rejection"]
print(
    f"\nrule {rejection['rule']}, threshold {rejection['threshold']:.3f} "
    f"(from the {rejection['threshold_source']})"
)
print(adata.obs[["truth", "tgem_label", "tgem_neighbor_distance"]].head(8).to_string())

unassigned = adata.obs["tgem_label"] == rejection["unassigned"]
unseen = adata.obs["truth"] == UNSEEN
assigned_seen = ~unassigned & ~unseen
correct = adata.obs["tgem_label"].astype(str) == adata.obs["truth"].astype(str)
print(
    f"\nunassigned: {unassigned.sum()} of {adata.n_obs} cells; "
    f"{unassigned[unseen].mean():.0%} of the {unseen.sum()} unseen B cells, "
    f"{unassigned[~unseen].mean():.0%} of the {(~unseen).sum()} cells of seen types"
)
print(f"accuracy on the assigned cells of seen types: {correct[assigned_seen].mean():.3f}")
print("what the B cells were called:")
print(adata.obs.loc[unseen, "tgem_label"].value_counts().head(4).to_string())

# The class probabilities: one column per class, in the order of uns["tgem"]["classes"].
proba = pd.DataFrame(
    adata.obsm["tgem_probabilities"], index=adata.obs_names, columns=adata.uns["tgem"]["classes"]
)
print(f"\nobsm['tgem_probabilities']: {proba.shape}; the first two cells:")
print(proba.head(2).round(3).T.to_string())

# Majority voting: each k-means cluster's most frequent label and its share of the cluster.
votes = adata.obs.groupby("kmeans", observed=True).agg(
    cells=("tgem_label", "size"),
    majority=("tgem_majority_voting", "first"),
    vote_share=("tgem_vote_share", "first"),
    B_cells=("truth", lambda t: int((t == UNSEEN).sum())),
)
print("\nmajority voting over the k-means clusters:")
print(votes.sort_values("cells", ascending=False).round(2).to_string())

# uns["tgem"]: the model's identity, written only as values .h5ad files can hold.
print(f"\nuns['tgem'] keys: {sorted(adata.uns['tgem'])}")
print(f"gene match: {dict(adata.uns['tgem']['gene_match']['counts'])}")

# --- 4. The round trip through an .h5ad file -----------------------------------------------
path = out / "pbmc_annotated.h5ad"
adata.write_h5ad(path)
back = anndata.read_h5ad(path)
assert back.obs["tgem_label"].equals(adata.obs["tgem_label"])
np.testing.assert_array_equal(back.obsm["tgem_probabilities"], adata.obsm["tgem_probabilities"])
assert back.uns["tgem"]["rejection"]["threshold"] == rejection["threshold"]
print(f"\nwrote {path} and read it back: labels, probabilities and uns['tgem'] unchanged")

# --- 5. The figure: the embedding by true type and by tgem label, and the distance ---------
classes = list(adata.obs["tgem_label"].cat.categories)  # the model's classes, "unassigned"
colours = dict(zip(classes[:-1], plt.get_cmap("tab10").colors, strict=False))
colours[UNSEEN] = "black"  # the truth panel's unseen type
colours[rejection["unassigned"]] = "lightgrey"
pca = adata.obsm["X_pca"]
fig, axes = plt.subplots(1, 3, figsize=(16, 5.6), gridspec_kw={"width_ratios": [1, 1, 0.8]})
for ax, column, title in (
    (axes[0], "truth", f"true type ({UNSEEN} never seen in training)"),
    (axes[1], "tgem_label", "tgem.annotate label (grey: unassigned)"),
):
    for label in adata.obs[column].cat.categories:
        rows = (adata.obs[column] == label).to_numpy()
        if rows.any():
            ax.scatter(*pca[rows, :2].T, s=8, color=colours[label], label=label)
    ax.set(title=title, xlabel="PC 1", ylabel="PC 2", xticks=[], yticks=[])
handles = {}
for ax in axes[:2]:
    handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=6, fontsize=8, markerscale=2)
distance = adata.obs["tgem_neighbor_distance"]  # minus the "neighbors" rule's score
bins = np.linspace(0, float(distance.max()) * 1.02, 31)
axes[2].hist(distance[~unseen], bins=bins, alpha=0.7, label="seen types")
axes[2].hist(distance[unseen], bins=bins, alpha=0.7, color="black", label=f"{UNSEEN} (unseen)")
axes[2].axvline(-rejection["threshold"], color="red", ls="--", label="fitted threshold")
axes[2].set(title="mean distance to the 10 nearest training cells", xlabel="distance (50 PCs)")
axes[2].set_ylabel("cells")
axes[2].legend(fontsize=8)
fig.tight_layout(rect=(0, 0.1, 1, 1))
figure_path.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(figure_path, dpi=90)
print(f"figure: {figure_path}")
