"""Cost of the attention attribution (gene network) of one class, at 1708 and 12,625 genes.

Data: the ALL leukaemia microarrays (../shared/data/all_leukemia.npz, 128 patients x 12,625
probes), labels ``y_mol_biol`` restricted to the subtypes with at least 5 patients. The 1708-gene
case uses a fixed random subset of the probes (seed 0), the size of the original T-GEM model.

Each case runs in fresh processes: one trains a default-shaped model briefly (3 layers, 5 heads;
the point is the cost of the analysis, not the model) and pickles it; a second loads it and runs
``attention_attribution`` (50 Gauss-Legendre steps, as captum's default) for the samples of one
class, then ``attention_edges`` (top 0.001) and ``hub_genes``. Its wall time and peak resident
memory (``ru_maxrss``, the whole process: Python, torch, data and the analysis) are reported.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_attention_attribution.py
    PYTHONPATH=. .venv/bin/python benchmarks/bench_attention_attribution.py --genes 300 \
        --n-samples 2 --out /tmp/quick.json

Prints a table and writes JSON to benchmarks/results/bench_attention_attribution.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "all_leukemia.npz"


def load(n_genes: int):
    with np.load(DATA) as d:
        X, y = d["X"], d["y_mol_biol"].astype(str)
        probes = d["features"].astype(str)
    keep_classes = [c for c, n in zip(*np.unique(y, return_counts=True), strict=True) if n >= 5]
    rows = np.isin(y, keep_classes)
    X, y = X[rows], y[rows]
    if n_genes < X.shape[1]:
        cols = np.sort(np.random.default_rng(0).choice(X.shape[1], n_genes, replace=False))
        X, probes = X[:, cols], probes[cols]
    return np.ascontiguousarray(X), y, probes


def train_child(args) -> dict:
    import torch

    from tgem import TGEMClassifier

    torch.set_num_threads(args.threads)
    X, y, _ = load(args.genes)
    t0 = time.perf_counter()
    clf = TGEMClassifier(max_epochs=args.epochs, random_state=0, device="cpu").fit(X, y)
    fit_s = time.perf_counter() - t0
    with open(args.model, "wb") as fh:
        pickle.dump(clf, fh)
    return {"fit_s": fit_s, "train_accuracy": float(clf.score(X, y))}


def attribute_child(args) -> dict:
    import torch

    from tgem.attention import attention_attribution, attention_edges, hub_genes

    torch.set_num_threads(args.threads)
    X, y, probes = load(args.genes)
    with open(args.model, "rb") as fh:
        clf = pickle.load(fh)
    Xc = X[y == args.target][: args.n_samples]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    scores, delta = attention_attribution(
        clf, Xc, args.target, n_steps=args.n_steps, return_convergence_delta=True
    )
    attr_s = time.perf_counter() - t0
    attr_cpu_s = time.process_time() - cpu0
    t1 = time.perf_counter()
    edges = attention_edges(scores, probes, top_fraction=0.001)
    hubs = hub_genes(edges, top=5)
    edges_s = time.perf_counter() - t1
    return {
        "n_samples": int(Xc.shape[0]),
        "attribution_s": attr_s,
        "s_per_sample": attr_s / Xc.shape[0],
        "cpu_s": attr_cpu_s,
        "cpu_s_per_sample": attr_cpu_s / Xc.shape[0],
        "edges_s": edges_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_before_gib": rss0 / 2**20,
        "scores_gib": scores.nbytes / 2**30,
        "max_abs_delta": float(np.abs(delta).max()),
        "n_edges": int(len(edges)),
        "top_hubs": hubs["gene"].tolist(),
    }


def run_child(stage: str, args, genes: int, model: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        stage,
        "--genes",
        str(genes),
        "--model",
        model,
        "--threads",
        str(args.threads),
        "--epochs",
        str(args.epochs),
        "--target",
        args.target,
        "--n-samples",
        str(args.n_samples),
        "--n-steps",
        str(args.n_steps),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genes", type=int, nargs="+", default=[1708, 12625])
    p.add_argument("--target", default="ALL1/AF4", help="class whose samples are attributed")
    p.add_argument("--n-samples", type=int, default=10)
    p.add_argument("--n-steps", type=int, default=50)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "bench_attention_attribution.json")
    )
    p.add_argument("--child", choices=["train", "attribute"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.genes = args.genes[0]
        fn = train_child if args.child == "train" else attribute_child
        print(json.dumps(fn(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for genes in args.genes:
            model = str(Path(tmp) / f"model_{genes}.pkl")
            row = {
                "genes": genes,
                "target": args.target,
                "n_steps": args.n_steps,
                **run_child("train", args, genes, model),
                **run_child("attribute", args, genes, model),
            }
            rows.append(row)
            print(f"done {genes} genes: {row['attribution_s']:.1f} s", file=sys.stderr)
    header = (
        f"{'genes':>6} {'samples':>7} {'attr s':>8} {'s/sample':>8} {'cpu s/smp':>9} "
        f"{'edges s':>7} "
        f"{'peak RSS GiB':>12} {'scores GiB':>10} {'max|delta|':>10} {'edges':>7}"
    )
    print(
        f"attention attribution of class {args.target!r}, {args.n_steps} steps, "
        f"{args.threads} threads, {platform.processor() or platform.machine()}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['genes']:>6} {r['n_samples']:>7} {r['attribution_s']:>8.1f} "
            f"{r['s_per_sample']:>8.2f} {r['cpu_s_per_sample']:>9.2f} {r['edges_s']:>7.1f} "
            f"{r['peak_rss_gib']:>12.2f} "
            f"{r['scores_gib']:>10.2f} {r['max_abs_delta']:>10.2e} {r['n_edges']:>7}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "note": "wall times depend on other load: compare cpu_s (process CPU time)",
        "threads": args.threads,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
