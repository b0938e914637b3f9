"""Cost of tgem's Integrated Gradients, and a sanity check of the attributions on PBMC data.

Speed and memory (default)::

    python benchmarks/bench_attribution.py [--genes 1708] [--threads 2] [--repeats 3]

For each attention backend (``exact``: the pure-PyTorch path; ``auto``: whatever tgem picks,
the native kernel where built), one fresh process builds a T-GEM network (3 layers, 5 heads)
and measures:

* ``s_per_sample``: Integrated Gradients at 50 steps with captum's fixed Gauss-Legendre rule
  (the original's work: 50 gradients per sample): best of the batch of 64 and ``--repeats``
  - 1 further runs on 8 samples; ``cpu_s_per_sample_batch64`` is the process CPU time per
  sample of the batch of 64 (all threads), a guide when other jobs share the machine;
* ``adaptive_s_per_sample`` and ``adaptive_grads``: tgem's default adaptive rule on
  ``--adaptive-samples`` samples (random weights are harsher than fitted ones; see the
  PBMC run for a fitted model);
* ``peak_mb_64``: peak resident memory minus the resident memory after imports and model
  construction, while attributing a batch of 64 samples (Linux ``ru_maxrss``).

PBMC sanity run (``--pbmc``): fits default models (``attention_backend="auto"``) on 75 % of
``pbmc68k_reduced`` for 3 random states, reports the top genes per cell type from IG on the
held-out 25 % (true class, zero baseline), where the known markers rank, the ablation curves
(top-ranked vs random genes) and the Jaccard stability of the top-50 ``feature_importances_``
across the random states. Tables are printed and JSON written to ``benchmarks/results/``;
nothing is asserted.
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = HERE.parents[1] / "shared" / "data"
MARKERS = {"CD19+ B": ["CD79A", "MS4A1", "CD79B"], "CD56+ NK": ["NKG7", "GNLY"],
           "CD14+ Monocyte": ["CD14", "LYZ"]}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- speed
def _worker(backend: str, genes: int, threads: int, repeats: int,
            adaptive_samples: int) -> dict:
    """Run in a fresh process: time and memory of IG for one backend."""
    import numpy as np
    import torch

    from tgem import _ig
    from tgem._model import TGEMNet
    from tgem.interpret import MEMORY_BUDGET

    torch.set_num_threads(threads)
    net = TGEMNet(n_genes=genes, n_classes=10, attention_backend=backend,
                  generator=torch.Generator().manual_seed(0)).eval()
    resolved = net.backend(torch.empty(0)).name
    rng = np.random.default_rng(0)
    x_all = torch.as_tensor(np.log1p(rng.gamma(0.3, 4.0, size=(64, genes))).astype(np.float32))
    t_all = torch.as_tensor(rng.integers(0, 10, size=64))
    ev = _ig.Evaluator(net, _ig.rows_budget(genes, 5, 3, MEMORY_BUDGET))
    base_rss = _rss_mb()

    def run(x, t, quadrature):
        return _ig.integrated_gradients(ev, x, torch.zeros_like(x), t, 50, quadrature,
                                        need_delta=False)

    # memory: one batch of 64 samples (also a timing of the fixed rule at batch 64)
    t0, c0 = time.perf_counter(), time.process_time()
    run(x_all, t_all, "gausslegendre")
    batch64 = (time.perf_counter() - t0) / 64
    cpu64 = (time.process_time() - c0) / 64
    peak = _peak_mb() - base_rss
    times = [batch64]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        run(x_all[:8], t_all[:8], "gausslegendre")
        times.append((time.perf_counter() - t0) / 8)
    adaptive, grads = float("nan"), float("nan")
    if adaptive_samples:
        t0 = time.perf_counter()
        _, _, n_grads, _ = run(x_all[:adaptive_samples], t_all[:adaptive_samples], "adaptive")
        adaptive = (time.perf_counter() - t0) / adaptive_samples
        grads = float(np.mean(n_grads))
    return {"backend": backend, "resolved": resolved, "genes": genes, "threads": threads,
            "batch_rows": ev.batch_rows, "s_per_sample": min(times),
            "s_per_sample_all": times, "s_per_sample_batch64": batch64,
            "cpu_s_per_sample_batch64": cpu64,
            "adaptive_s_per_sample": adaptive, "adaptive_grads": grads,
            "peak_mb_64": peak}


def speed(args) -> None:
    rows = []
    for backend in args.backends:
        cmd = [sys.executable, __file__, "--worker", backend, "--genes", str(args.genes),
               "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--adaptive-samples", str(args.adaptive_samples)]
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            raise SystemExit(f"worker for {backend} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nIntegrated Gradients, {args.genes} genes, 3 layers x 5 heads, 50 steps, "
          f"{args.threads} threads (best of {args.repeats}; original: 44 s/sample, 17.9 GB)")
    head = (f"{'backend':>8} {'runs as':>8} {'s/sample':>9} {'s/sample@64':>12} "
            f"{'adaptive s/sample':>18} {'adaptive grads':>15} {'peak MB, 64 samples':>20}")
    print(head + f" {'CPU s/sample@64':>16}")
    for r in rows:
        print(f"{r['backend']:>8} {r['resolved']:>8} {r['s_per_sample']:9.3f} "
              f"{r['s_per_sample_batch64']:12.3f} {r['adaptive_s_per_sample']:18.3f} "
              f"{r['adaptive_grads']:15.1f} {r['peak_mb_64']:20.0f} "
              f"{r['cpu_s_per_sample_batch64']:16.3f}")
    _save("attribution_speed", {"machine": _machine(), "results": rows})


# ----------------------------------------------------------------------------- PBMC
def pbmc(args) -> None:
    import numpy as np
    import pandas as pd
    import torch
    from sklearn.model_selection import train_test_split

    from tgem import TGEMClassifier
    from tgem.interpret import ablation_study, attribute, gene_ranking

    torch.set_num_threads(args.threads)
    with np.load(DATA / "pbmc68k_reduced.npz", allow_pickle=False) as d:
        X = pd.DataFrame(d["X"], columns=d["features"])
        y = d["y_cell_type"]
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    report = {"machine": _machine(), "models": []}
    models = {}
    for seed in args.seeds:
        path = cache / f"pbmc_tgem_{seed}.pkl"
        if path.exists():
            with open(path, "rb") as f:
                clf, fit_s = pickle.load(f)
            # what fit keeps in memory for feature_importances_ (never pickled)
            clf._fit_data = (Xtr.to_numpy(), np.searchsorted(clf.classes_, ytr))
        else:
            t0 = time.perf_counter()
            clf = TGEMClassifier(random_state=seed, attention_backend="auto").fit(Xtr, ytr)
            fit_s = time.perf_counter() - t0
            with open(path, "wb") as f:
                pickle.dump((clf, fit_s), f)
        t0 = time.perf_counter()
        cached = "_feature_importances" in clf.__dict__
        imp = clf.feature_importances_
        imp_s = time.perf_counter() - t0
        if not cached:  # keep the importances with the model for later runs
            with open(path, "wb") as f:
                pickle.dump((clf, fit_s), f)
        acc = clf.score(Xte, yte)
        models[seed] = (clf, imp)
        report["models"].append({"seed": seed, "fit_s": fit_s, "test_accuracy": acc,
                                 "importances_s": imp_s, "backend": clf.attention_backend_})
        print(f"seed {seed}: fit {fit_s:.0f} s ({clf.attention_backend_}), held-out accuracy "
              f"{acc:.3f}, feature_importances_ {imp_s:.0f} s", flush=True)

    genes = np.asarray(X.columns)
    tops = {s: set(genes[np.argsort(-imp)[:50]]) for s, (_, imp) in models.items()}
    seeds = list(models)
    jac = {f"{a}-{b}": len(tops[a] & tops[b]) / len(tops[a] | tops[b])
           for i, a in enumerate(seeds) for b in seeds[i + 1:]}
    report["top50_jaccard"] = jac
    print("\ntop-50 feature_importances_ Jaccard across random states:",
          ", ".join(f"{k}: {v:.2f}" for k, v in jac.items()),
          f"(mean {np.mean(list(jac.values())):.2f})")
    first = seeds[0]
    print(f"top-15 by feature_importances_ (seed {first}):",
          ", ".join(genes[np.argsort(-models[first][1])[:15]]))

    if args.skip_analysis:
        _save("attribution_pbmc_stability", report)
        return
    clf = models[first][0]
    t0 = time.perf_counter()
    attr, delta = attribute(clf, Xte, y=yte, return_convergence_delta=True,
                            verbose=args.verbose)
    ig_s = time.perf_counter() - t0
    table = gene_ranking(attr, yte)
    table_abs = gene_ranking(attr, yte, absolute=True)
    report["ig_test"] = {"samples": len(yte), "seconds": ig_s,
                         "max_abs_delta": float(np.max(np.abs(delta)))}
    print(f"\nIG on {len(yte)} held-out cells: {ig_s:.0f} s, max |convergence delta| "
          f"{np.max(np.abs(delta)):.2e}")
    report["top_genes"] = {}
    print("\ntop 10 genes per cell type (signed mean IG, true class):")
    for cls, part in table.groupby("class"):
        top10 = part.sort_values("rank")["gene"].head(10).tolist()
        report["top_genes"][cls] = top10
        print(f"  {cls:<32} {', '.join(top10)}")
    report["markers"] = {}
    print("\nknown markers: rank in their cell type (signed / absolute), of "
          f"{len(genes)} genes")
    for cls, marks in MARKERS.items():
        for m in marks:
            if m not in set(genes):
                print(f"  {cls:<16} {m:<7} not in the data")
                continue
            r = int(table[(table["class"] == cls) & (table["gene"] == m)]["rank"].iloc[0])
            ra = int(table_abs[(table_abs["class"] == cls) & (table_abs["gene"] == m)]
                     ["rank"].iloc[0])
            report["markers"][f"{cls}/{m}"] = {"rank_signed": r, "rank_abs": ra}
            print(f"  {cls:<16} {m:<7} {r:>4} / {ra:>4}")

    t0 = time.perf_counter()
    abl = ablation_study(clf, Xte, yte, ranking=table, n_random=10, random_state=0)
    report["ablation_s"] = time.perf_counter() - t0
    report["ablation"] = abl.to_dict("records")
    print("\nablation (all held-out cells, each with its cell type's ranking): accuracy drop")
    overall = abl[abl["overall"]]
    print(f"{'grid':>7} {'%':>5} {'genes':>5} {'top':>7} {'random (mean +- sd)':>20}")
    for _, r in overall.iterrows():
        print(f"{r['grid']:>7} {r['percent']:5.1f} {r['n_genes']:5d} {r['drop_top']:7.3f} "
              f"{r['drop_random_mean']:11.3f} +- {r['drop_random_std']:.3f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        from tgem.plotting import plot_ablation

        axes = plot_ablation(abl)
        axes[0].figure.savefig(RESULTS / "attribution_pbmc_ablation.png", dpi=120,
                               bbox_inches="tight")
    _save("attribution_pbmc", report)


# ----------------------------------------------------------------------------- helpers
def _machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0]}


def _save(name: str, obj) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(obj, indent=1, default=str))
    print(f"\nwrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genes", type=int, default=1708)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backends", nargs="+", default=["exact", "auto"])
    p.add_argument("--adaptive-samples", type=int, default=4,
                   help="samples timed with the adaptive rule (0: skip)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--pbmc", action="store_true", help="run the PBMC sanity check")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cache", default=str(RESULTS / "tmp" / "attribution"),
                   help="fitted PBMC models are kept here between runs")
    p.add_argument("--skip-analysis", action="store_true",
                   help="PBMC: only fit, importances and their stability")
    p.add_argument("--plot", action="store_true", help="save the ablation figure")
    p.add_argument("--verbose", type=int, default=0)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.genes, args.threads, args.repeats,
                                 args.adaptive_samples)))
    elif args.pbmc:
        pbmc(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
