"""Model-free novelty scores for cells unlike any training cell (issue 27, a next step).

The probability-based rejection rules of ``tgem.annotate`` (``max_proba``, ``energy``) reach
an AUROC of only 0.79-0.84 for CITE-seq's Mouse cells (``bench_annotate.py --mode
citeseq-unknown``): a network that never saw such a profile can still be confident. This
script measures, on the same split of the same cells (seen cells stratified 60 % train,
20 % calibration, 20 % test, seed 0; Mouse and Unknown cells never trained on), how well
scores computed from the *input* alone separate unseen from seen test cells: the number of
detected genes, the Mahalanobis distance (one Gaussian, and class-conditional with a shared
Ledoit-Wolf covariance) of the standardised profile, and the mean distance to the 10 nearest
training cells in the standardised genes, in their first 50 principal components and by
cosine on the log-normalised profile. For each score it also fits the threshold that rejects
at most 5 % of the calibration cells and reports the shares unassigned, as
``bench_annotate.py`` does. Nothing is fitted but scikit-learn's scaler, PCA and neighbours
(seconds).

    PYTHONPATH=. python benchmarks/bench_novelty.py [--quick]

Writes ``results/novelty.json`` and ``results/novelty.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_annotate  # noqa: E402

EXCLUDED = ("Mouse", "Unknown")
K = 10
N_COMPONENTS = 50
MAX_REJECTED = 0.05


def scores(X: np.ndarray, y: np.ndarray, train: np.ndarray) -> dict[str, np.ndarray]:
    """Novelty scores of every cell (higher: less like the training cells)."""
    z = StandardScaler().fit(X[train]).transform(X)
    out = {"few detected genes": -(X > 0).sum(axis=1).astype(np.float64)}
    out["mahalanobis"] = LedoitWolf().fit(z[train]).mahalanobis(z)
    classes = np.unique(y[train])
    means = np.stack([z[train][y[train] == c].mean(axis=0) for c in classes])
    resid = z[train] - means[np.searchsorted(classes, y[train])]
    precision = LedoitWolf().fit(resid).precision_
    out["class-conditional mahalanobis"] = np.min(
        [np.einsum("ij,jk,ik->i", z - m, precision, z - m) for m in means], axis=0
    )
    pcs = PCA(N_COMPONENTS, random_state=0).fit(z[train]).transform(z)
    unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    for name, space in (
        (f"{K}-NN distance, standardised genes", z),
        (f"{K}-NN distance, {N_COMPONENTS} PCs", pcs),
        (f"{K}-NN cosine distance", unit),
    ):
        dist, _ = NearestNeighbors(n_neighbors=K).fit(space[train]).kneighbors(space)
        out[name] = dist.mean(axis=1)
    return out


def figures(score, y, cal, test, unseen) -> dict:
    """AUROC per unseen group and the shares unassigned at a 5 % calibration threshold."""
    threshold = float(np.quantile(score[cal], 1 - MAX_REJECTED, method="higher"))
    row = {"threshold": threshold, "seen_rejected": float(np.mean(score[test] > threshold))}
    for group in (*EXCLUDED, "both"):
        rows = unseen if group == "both" else unseen[y[unseen] == group]
        # bench_annotate's AUROC takes confidences (higher: seen); these are novelties
        row[f"auroc_{group}"] = bench_annotate._auroc(-score[test], -score[rows])
        row[f"unassigned_{group}"] = float(np.mean(score[rows] > threshold))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=bench_annotate.DATA_DIR)
    p.add_argument("--results-dir", type=Path, default=bench_annotate.RESULTS_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2,000 cells (CI smoke run)")
    args = p.parse_args(argv)
    X, y = bench_annotate.load("citeseq", args.data_dir)
    if args.quick:
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(y))[:2000])
        X, y = X[keep], y[keep]
    X = np.asarray(X, dtype=np.float64)
    train, cal, test, unseen = bench_annotate.split(y, EXCLUDED, args.seed)
    results = {name: figures(s, y, cal, test, unseen) for name, s in scores(X, y, train).items()}
    lines = [
        "# Model-free novelty scores on CITE-seq's Mouse and Unknown cells (`bench_novelty.py`)",
        "",
        f"Generated on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
        + (" (--quick: 2,000 cells)" if args.quick else "")
        + f". Split as `bench_annotate.py --mode citeseq-unknown` (seed {args.seed}): "
        f"{len(train)} train, {len(cal)} calibration, {len(test)} test seen cells; "
        f"{np.sum(y == 'Mouse')} Mouse and {np.sum(y == 'Unknown')} Unknown cells. Threshold: "
        f"at most {MAX_REJECTED:.0%} of calibration cells rejected.",
        "",
        "| score | AUROC Mouse | AUROC Unknown | AUROC both | Mouse unassigned "
        "| Unknown unassigned | seen rejected |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['auroc_Mouse']:.3f} | {r['auroc_Unknown']:.3f} | "
            f"{r['auroc_both']:.3f} | {r['unassigned_Mouse']:.1%} | "
            f"{r['unassigned_Unknown']:.1%} | {r['seen_rejected']:.1%} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / "novelty.md").write_text(text)
        (args.results_dir / "novelty.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
