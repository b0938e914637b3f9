"""Rejection end to end through the library: a calibrated fit, then ``tgem.annotate``.

``bench_annotate.py`` scores every rule on one fixed split from cached fits. This script checks
the path a user takes on the same CITE-seq split (``bench_annotate.split``, seed 0; Mouse and
Unknown cells never trained on):

1. ``TGEMClassifier(calibration="temperature", calibration_fraction=0.25)`` is fitted on the
   seen training and calibration cells together (80 % of the seen cells), so that ``fit``
   itself holds out about as many cells as the benchmark's calibration part, builds the
   neighbours' reference from the rest and fits every rule's threshold on the held-out cells;
2. the model is saved and loaded back (model format 3);
3. ``tgem.annotate`` runs on an AnnData of the seen test cells and the unseen cells with its
   defaults (``reject="auto"``), then once per rule with the model's fitted thresholds.

Per rule: the AUROC of the score for Mouse (and Unknown) against seen test cells, the shares
unassigned, the share of seen test cells rejected and the accuracy on the seen cells kept. The
fitted model is cached in ``benchmarks/results/cache/annotate_library/`` (a rerun only
annotates); results go to ``benchmarks/results/annotate_library.{json,md}``.

    python benchmarks/bench_annotate_library.py                 # about 10 minutes, 1 thread
    python benchmarks/bench_annotate_library.py --quick         # CI smoke run: 2,000 cells
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_annotate  # noqa: E402
from bench_accuracy import machine  # noqa: E402

import tgem  # noqa: E402
from tgem._calibration import RULES  # noqa: E402

EXCLUDED = ("Mouse", "Unknown")


def fit_or_load(X, y, train, epochs: int, seed: int, cache: Path | None):
    """The calibrated model, from the cache when it holds one fitted the same way."""
    key = f"citeseq__e{epochs}__s{seed}__n{len(y)}.tgem"
    path = None if cache is None else cache / key
    if path is not None and path.exists():
        return tgem.load(path), None
    names = [f"g{j}" for j in range(X.shape[1])]
    clf = tgem.TGEMClassifier(
        calibration="temperature",
        calibration_fraction=0.25,
        max_epochs=epochs,
        random_state=seed,
        n_threads=1,
    )
    t0 = time.perf_counter()
    clf.fit(pd.DataFrame(X[train], columns=names), y[train])
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        clf.save(path)
        clf = tgem.load(path)  # what a user loads
    return clf, seconds


def run(X, y, epochs: int, seed: int, cache: Path | None) -> dict:
    import anndata

    train, cal, test, unseen = bench_annotate.split(y, EXCLUDED, seed)
    fit_rows = np.sort(np.r_[train, cal])  # fit holds out its own calibration cells
    model, seconds = fit_or_load(X, y, fit_rows, epochs, seed, cache)
    rows = np.r_[test, unseen]
    adata = anndata.AnnData(X[rows].astype(np.float32))
    adata.var_names = list(model.feature_names_in_)
    truth = y[rows]
    seen = np.arange(len(test))
    groups = {g: len(test) + np.flatnonzero(y[unseen] == g) for g in EXCLUDED}
    results = []
    for rule in ("auto", *RULES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tgem.annotate(adata, model, reject=rule)
        record = adata.uns["tgem"]["rejection"]
        labels = adata.obs["tgem_label"].astype(str).to_numpy()
        scores = tgem.rejection_scores(model, adata.to_df(), rule=record["rule"])
        kept = labels[seen] != "unassigned"
        row = {
            "rule": rule,
            "resolved": record["rule"],
            "threshold": float(record["threshold"]),
            "threshold_source": record["threshold_source"],
            "seen_rejected": float(np.mean(~kept)),
            "seen_accuracy": float(np.mean(model.predict(adata.to_df())[seen] == truth[seen])),
            "seen_accuracy_kept": float(np.mean(labels[seen][kept] == truth[seen][kept])),
        }
        for g, idx in groups.items():
            row[f"auroc_{g}"] = bench_annotate._auroc(scores[seen], scores[idx])
            row[f"unassigned_{g}"] = float(np.mean(labels[idx] == "unassigned"))
        results.append(row)
    report = model.calibration_report_
    return {
        "n_fit": len(fit_rows),
        "n_train": report["n_train"],
        "n_calibration": report["n_calibration"],
        "n_test_seen": len(test),
        "n_unseen": {g: len(i) for g, i in groups.items()},
        "fit_seconds": seconds,
        "epochs": epochs,
        "seed": seed,
        "reference_cells": int(model.neighbor_reference_.cells.shape[0]),
        "rules": results,
    }


def table(out: dict) -> list[str]:
    lines = [
        f"Fit on {out['n_fit']} seen cells ({out['n_train']} trained on, {out['n_calibration']} "
        f"held out by `fit`), {out['epochs']} epochs; annotated {out['n_test_seen']} seen test "
        f"cells, {out['n_unseen']['Mouse']} Mouse and {out['n_unseen']['Unknown']} Unknown "
        "cells. Thresholds: the model's own (`rejection_thresholds_`).",
        "",
        "| reject= | rule used | AUROC Mouse | AUROC Unknown | Mouse unassigned | "
        "Unknown unassigned | seen rejected | seen accuracy (all) | seen accuracy (kept) "
        "| threshold |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rules"]:
        lines.append(
            f"| {r['rule']} | {r['resolved']} | {r['auroc_Mouse']:.3f} | "
            f"{r['auroc_Unknown']:.3f} | {r['unassigned_Mouse']:.1%} | "
            f"{r['unassigned_Unknown']:.1%} | {r['seen_rejected']:.1%} | "
            f"{r['seen_accuracy']:.3f} | {r['seen_accuracy_kept']:.3f} | {r['threshold']:.4g} |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=bench_annotate.DATA_DIR)
    p.add_argument("--results-dir", type=Path, default=bench_annotate.RESULTS_DIR)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2,000 cells, 1 epoch, no cache")
    args = p.parse_args(argv)
    X, y = bench_annotate.load("citeseq", args.data_dir)
    cache = args.results_dir / "cache" / "annotate_library"
    if args.quick:
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(y))[:2000])
        X, y, args.epochs, cache = X[keep], y[keep], 1, None
        args.results_dir = Path(tempfile.mkdtemp(prefix="bench_annotate_library_"))
    out = run(np.asarray(X), np.asarray(y), args.epochs, args.seed, cache)
    out["machine"] = machine()
    out["quick"] = args.quick
    lines = table(out)
    print("\n".join(lines))
    bench_annotate.save_outputs(
        args.results_dir / "annotate_library",
        out,
        "Rejection through the library: a calibrated fit, then `tgem.annotate`",
        "bench_annotate_library.py",
        argv,
        "",
        lines,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
