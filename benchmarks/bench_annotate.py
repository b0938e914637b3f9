"""Rejection of a cell type left out of training, on the bundled PBMC data (fast).

For each left-out type: train on the other types (stratified 60 % train, 20 % calibration,
20 % test of the seen types), fit each rule's threshold on the calibration cells (at most
5 % rejected), and print the AUROC of the rule's score for seen-vs-unseen cells, the share
of unseen cells rejected, the share of seen test cells rejected and the accuracy on seen test
cells that were not rejected.

    python benchmarks/bench_annotate.py [--types "CD19+ B" ...] [--epochs 15]
"""

import argparse

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

import tgem
from tgem._annotate import RULES, rejection_scores
from tgem.datasets import load_pbmc68k


def run(left_out: str, epochs: int, seed: int = 0) -> list[dict]:
    X, y = load_pbmc68k(return_X_y=True)
    seen = np.flatnonzero(y != left_out)
    unseen = np.flatnonzero(y == left_out)
    train, rest = train_test_split(seen, test_size=0.4, stratify=y[seen], random_state=seed)
    cal, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    clf = tgem.TGEMClassifier(
        max_epochs=epochs, learning_rate=1e-3, random_state=seed, standardize=True
    )
    clf.fit(X[train], y[train])
    rows = []
    for rule in RULES:
        threshold = tgem.fit_rejection_threshold(clf, X[cal], y[cal], rule=rule)
        s_seen = rejection_scores(clf, X[test], rule=rule)
        s_unseen = rejection_scores(clf, X[unseen], rule=rule)
        truth = np.r_[np.zeros(len(test)), np.ones(len(unseen))]
        kept = s_seen >= threshold
        rows.append(
            {
                "left_out": left_out,
                "rule": rule,
                "auroc": roc_auc_score(truth, -np.r_[s_seen, s_unseen]),
                "unseen_rejected": float(np.mean(s_unseen < threshold)),
                "seen_rejected": float(np.mean(~kept)),
                "seen_accuracy_kept": float(np.mean(clf.predict(X[test])[kept] == y[test][kept])),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=["CD19+ B", "CD14+ Monocyte"])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    header = "left_out rule auroc unseen_rejected seen_rejected seen_accuracy_kept"
    print(header.replace(" ", "\t"))
    for left_out in args.types:
        for row in run(left_out, args.epochs):
            print("\t".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))


if __name__ == "__main__":
    main()
