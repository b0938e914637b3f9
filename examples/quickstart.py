"""Quick start: train T-GEM on the bundled PBMC data, evaluate it, save it and reload it.

Runs offline in about a minute on a 2-core laptop CPU:

    python examples/quickstart.py

Figures and the model go to ./tgem_examples_output/quickstart/.
"""

from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report
from sklearn.model_selection import train_test_split

import tgem
from tgem import TGEMClassifier
from tgem.datasets import load_pbmc68k
from tgem.plotting import plot_history

out = Path("tgem_examples_output") / "quickstart"
out.mkdir(parents=True, exist_ok=True)

# 700 cells x 765 genes (log-normalised), 10 cell types; a DataFrame keeps the gene names.
X, y = load_pbmc68k(return_X_y=True, as_frame=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)

# tgem's defaults (3 layers, 5 heads, genes standardised inside the model); 20 epochs are
# enough on this small data set (the default is 50).
clf = TGEMClassifier(max_epochs=20, random_state=0)
clf.fit(X_train, y_train)

print(f"held-out accuracy: {clf.score(X_test, y_test):.3f}")
print(classification_report(y_test, clf.predict(X_test), zero_division=0))

# Loss and accuracy per epoch.
axes = plot_history(clf)
axes[0].figure.savefig(out / "loss_curves.png", dpi=120)

# A pickle-free model file: safe to share, loads without running code.
path = out / "pbmc.tgem"
clf.save(path)
reloaded = tgem.load(path)
assert np.array_equal(reloaded.predict_proba(X_test), clf.predict_proba(X_test))
print(f"saved and reloaded {path}; figures in {out}/")
