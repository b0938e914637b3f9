"""Interpreting T-GEM on the bundled PBMC data: which genes, which heads, which links.

1. Gene rankings per cell type from Integrated Gradients (baseline 0, target = true class)
   on held-out cells, with known markers to compare against;
2. the ablation study: accuracy when each cell type's top-ranked genes are set to 0, next
   to the same number of random genes (the control);
3. the attention entropy per layer and head (box plot);
4. the hub genes of the attention-attribution network of B cells.

    python examples/interpret.py

Tables and figures go to ./tgem_examples_output/interpret/. See the "Interpreting a model"
page of the documentation for what each method means and its caveats.
"""

from pathlib import Path

import matplotlib.pyplot as plt
from sklearn.model_selection import train_test_split

from tgem import TGEMClassifier
from tgem.attention import attention_entropy, attention_network, hub_genes, write_edges
from tgem.datasets import load_pbmc68k
from tgem.interpret import ablation_study, attribute, gene_ranking
from tgem.plotting import plot_ablation, plot_entropy, plot_gene_ranking

out = Path("tgem_examples_output") / "interpret"
out.mkdir(parents=True, exist_ok=True)

X, y = load_pbmc68k(return_X_y=True, as_frame=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
clf = TGEMClassifier(max_epochs=20, random_state=0).fit(X_train, y_train)
print(f"held-out accuracy: {clf.score(X_test, y_test):.3f}")

# 1. Gene rankings: mean Integrated Gradients of the true class's log-probability per type.
attributions = attribute(clf, X_test, target="true", y=y_test, random_state=0)
ranking = gene_ranking(attributions, y_test)
ranking.to_csv(out / "gene_rankings.csv", index=False)
markers = {
    "CD19+ B": ["CD79A", "CD79B", "MS4A1"],
    "CD56+ NK": ["NKG7", "GNLY", "PRF1"],
    "CD14+ Monocyte": ["LYZ", "S100A8", "S100A9"],
}
for cell_type, known in markers.items():
    rows = ranking[ranking["class"] == cell_type].set_index("gene")
    top = rows.index[:8].tolist()
    ranks = ", ".join(f"{g} #{int(rows.loc[g, 'rank'])}" for g in known if g in rows.index)
    print(f"{cell_type}: top genes {top}; known markers: {ranks}")

fig, axes = plt.subplots(1, 3, figsize=(12, 4), layout="constrained")
for ax, cell_type in zip(axes, markers, strict=True):
    plot_gene_ranking(ranking, cell_type, top=15, ax=ax)
fig.savefig(out / "top_genes.png", dpi=120)

# 2. Ablation: do the top-ranked genes matter more than random ones?
ablation = ablation_study(clf, X_test, y_test, ranking=ranking, random_state=0)
ablation.to_csv(out / "ablation.csv", index=False)
overall = ablation[ablation["class"] == "all"]
print(
    overall[["grid", "percent", "n_genes", "accuracy_top", "accuracy_random_mean"]]
    .round(3)
    .to_string(index=False)
)
axes = plot_ablation(ablation)
axes[0].figure.savefig(out / "ablation.png", dpi=120)

# 3. Attention entropy per layer and head, one value per held-out cell.
entropy = attention_entropy(clf, X_test, per_sample=True)
print("mean entropy per layer (uniform: log 765 = 6.640):", entropy.mean(axis=(0, 2)).round(4))
ax = plot_entropy(entropy, n_genes=X.shape[1])
ax.figure.savefig(out / "entropy.png", dpi=120)

# 4. Attention-attribution network of B cells and its hub genes.
b_cells = X_test[y_test == "CD19+ B"]
edges = attention_network(clf, b_cells, target="CD19+ B", top_fraction=0.001, n_steps=20)
write_edges(edges, out / "network_B.tsv")  # open in Cytoscape: File > Import > Network
print(hub_genes(edges, top=10).to_string(index=False))
print(f"tables and figures in {out}/")
