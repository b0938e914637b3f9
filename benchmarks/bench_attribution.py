"""Cost of tgem's Integrated Gradients, and a sanity check of the attributions on PBMC data.

Speed and memory (default)::

    python benchmarks/bench_attribution.py [--genes 1708] [--threads 2] [--repeats 2]
        [--backends exact compiled auto] [--batch 64] [--adaptive-samples 4] [--no-warmup]

For each attention backend (``exact``: the eager pure-PyTorch path; ``compiled``: the same
sums through ``torch.compile``, also pure PyTorch; ``auto``: whatever tgem picks, the native
kernel where built; ``native`` by name), one fresh process builds a T-GEM network (3 layers,
5 heads), warms it up (IG of a few samples, one full and one partial pass of the internal
batch: this is where ``compiled`` compiles, 10-40 s, reported as ``warmup_s`` and not counted)
and measures:

* ``s_per_sample``: Integrated Gradients at 50 steps with captum's fixed Gauss-Legendre rule
  (the original's work: 50 gradients per sample): best of the batch of ``--batch`` (64) and
  ``--repeats`` - 1 further runs on 8 samples; ``cpu_s_per_sample_batch`` is the process CPU
  time per sample of the batch (all threads), a guide when other jobs share the machine;
* ``adaptive_s_per_sample`` and ``adaptive_grads``: tgem's default adaptive rule on
  ``--adaptive-samples`` samples (random weights are harsher than fitted ones; see the
  PBMC run for a fitted model);
* ``peak_mb_batch``: peak resident memory while attributing the batch minus the resident
  memory just before it (Linux ``VmHWM`` after a reset through ``/proc/self/clear_refs``);
  ``peak_total_mb_batch``: the whole process's peak during the batch (Python, torch, model
  and what the warm-up left resident); ``peak_mb_after_import``: the process after imports.
  With ``--no-warmup`` the batch is the process's first call (compilation included), so
  ``peak_mb_batch`` is the cold cost of one batch above the imported model.

PBMC sanity run (``--pbmc``): fits default models (``attention_backend="auto"``) on 75 % of
``pbmc68k_reduced`` for the random states ``--seeds`` (0 1 2; cached in ``--cache``, refitted
with ``--refit``), reports the Jaccard stability of the top-50 (``--top``)
``feature_importances_`` across the random states (pairwise, mean and min, and the chance
level of two random sets), then the top genes per cell type from IG on the held-out 25 %
(true class, zero baseline), where the known markers rank and the ablation curves (top-ranked
vs random genes). ``--skip-analysis`` stops after the stability; ``--class-jaccard`` adds the
stability of each cell type's top-50 genes of held-out IG (signed and absolute mean) across
the random states. Each random state draws its own model initialisation, shuffling and
importance subsample. Tables are printed and JSON written to ``benchmarks/results/``;
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
MARKERS = {
    "CD19+ B": ["CD79A", "MS4A1", "CD79B"],
    "CD56+ NK": ["NKG7", "GNLY"],
    "CD14+ Monocyte": ["CD14", "LYZ"],
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> bool:
    """Reset this process's peak resident memory (Linux ``clear_refs``); False if it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    """Peak resident memory (MiB) since the process started or since :func:`_reset_peak`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- speed
def _worker(
    backend: str,
    genes: int,
    threads: int,
    repeats: int,
    adaptive_samples: int,
    batch: int,
    warmup: bool = True,
) -> dict:
    """Run in a fresh process: time and memory of IG for one backend, after a warm-up."""
    import numpy as np
    import torch

    from tgem._model import TGEMNet
    from tgem.interpret import MEMORY_BUDGET, _ig

    torch.set_num_threads(threads)
    peak_after_import = _peak_mb()
    net = TGEMNet(
        n_genes=genes,
        n_classes=10,
        attention_backend=backend,
        generator=torch.Generator().manual_seed(0),
    ).eval()
    resolved = net.backend(torch.empty(0)).name
    rng = np.random.default_rng(0)
    n_all = max(batch, 8, adaptive_samples)
    x_all = torch.as_tensor(np.log1p(rng.gamma(0.3, 4.0, size=(n_all, genes))).astype(np.float32))
    t_all = torch.as_tensor(rng.integers(0, 10, size=n_all))
    ev = _ig.Evaluator(net, _ig.rows_budget(genes, 5, 3, MEMORY_BUDGET))

    def run(x, t, quadrature):
        return _ig.integrated_gradients(
            ev, x, torch.zeros_like(x), t, 50, quadrature, need_delta=False
        )

    # warm-up, not timed: the first calls compile (backend "compiled": 10-20 s of
    # torch.compile), load kernels and grow the allocator. One full pass and one partial one,
    # as the timed runs have; both quadratures so that the adaptive rule's shapes are seen
    # (``warmup=False``: a cold process, whose peak memory is what a first call costs)
    t0 = time.perf_counter()
    if warmup:
        n_warm = max(1, -(-ev.batch_rows // 50)) + 1
        run(x_all[:n_warm], t_all[:n_warm], "gausslegendre")
        if adaptive_samples:
            run(x_all[:1], t_all[:1], "adaptive")
    warmup_s = time.perf_counter() - t0 if warmup else float("nan")
    peak_warmup = _peak_mb()

    # memory and time: one batch of ``batch`` samples (the fixed 50-node rule)
    base_rss = _rss_mb()
    reset = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    run(x_all[:batch], t_all[:batch], "gausslegendre")
    per_batch = (time.perf_counter() - t0) / batch
    cpu_batch = (time.process_time() - c0) / batch
    peak_batch = _peak_mb()
    times = [per_batch]
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
    return {
        "backend": backend,
        "resolved": resolved,
        "genes": genes,
        "threads": threads,
        "batch": batch,
        "batch_rows": ev.batch_rows,
        "warmup": warmup,
        "warmup_s": warmup_s,
        "s_per_sample": min(times),
        "s_per_sample_all": times,
        "s_per_sample_batch": per_batch,
        "cpu_s_per_sample_batch": cpu_batch,
        "adaptive_s_per_sample": adaptive,
        "adaptive_grads": grads,
        # peak resident memory while attributing the batch: above the resident memory
        # just before it (after imports, model, warm-up), and of the whole process
        "peak_mb_batch": peak_batch - base_rss if reset else float("nan"),
        "peak_total_mb_batch": peak_batch if reset else float("nan"),
        "rss_before_batch_mb": base_rss,
        "peak_mb_after_import": peak_after_import,
        "peak_mb_warmup": peak_warmup,
        "peak_mb_process": max(peak_warmup, _peak_mb()),
    }


def speed(args) -> None:
    rows = []
    for backend in args.backends:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            backend,
            "--genes",
            str(args.genes),
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
            "--adaptive-samples",
            str(args.adaptive_samples),
            "--batch",
            str(args.batch),
        ]
        if args.no_warmup:
            cmd.append("--no-warmup")
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            print(f"worker for {backend} failed; skipped", file=sys.stderr)
            rows.append({"backend": backend, "error": out.stderr.strip().splitlines()[-1:]})
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process_wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{backend}: done in {row['process_wall_s']:.0f} s", flush=True)
    print(
        f"\nIntegrated Gradients, {args.genes} genes, 3 layers x 5 heads, 50 steps, "
        f"{args.threads} threads, {'cold' if args.no_warmup else 'after warm-up'} "
        f"(best of {args.repeats}: batch of "
        f"{args.batch}, then 8-sample batches; original: 44 s/sample, 17.9 GB)"
    )
    head = (
        f"{'backend':>8} {'runs as':>8} {'warm-up s':>9} {'s/sample':>9} "
        f"{'s/sample@' + str(args.batch):>12} {'CPU s/smp':>9} {'adapt s/smp':>11} "
        f"{'adapt grads':>11} {'peak MB +':>9} {'peak MB':>8}"
    )
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:>8} failed: {r['error']}")
            continue
        print(
            f"{r['backend']:>8} {r['resolved']:>8} {r['warmup_s']:9.1f} "
            f"{r['s_per_sample']:9.3f} {r['s_per_sample_batch']:12.3f} "
            f"{r['cpu_s_per_sample_batch']:9.3f} {r['adaptive_s_per_sample']:11.3f} "
            f"{r['adaptive_grads']:11.1f} {r['peak_mb_batch']:9.0f} "
            f"{r['peak_total_mb_batch']:8.0f}"
        )
    print(
        "peak MB +: peak resident memory during the batch above the resident memory "
        "before it; peak MB: the whole process's (Python, torch, model) during the batch"
    )
    _save(
        args.output or "attribution_speed",
        {"machine": _machine(), "args": vars(args), "results": rows},
    )


# ----------------------------------------------------------------------------- PBMC
def pbmc(args) -> None:
    import numpy as np
    import pandas as pd
    import torch
    from sklearn.model_selection import train_test_split

    from tgem import TGEMClassifier
    from tgem._runtime import draw_seed
    from tgem._sampling import TrainingSample
    from tgem.interpret import ablation_study, gene_ranking

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
        from_cache = path.exists() and not args.refit
        if from_cache:
            with open(path, "rb") as f:
                clf, fit_s, *imp_s_cached = pickle.load(f)
            # what fit keeps in memory for feature_importances_ (never pickled)
            clf._training_sample = TrainingSample.take(
                Xtr.to_numpy(),
                np.searchsorted(clf.classes_, ytr),
                clf.importance_n_samples,
                draw_seed(clf.random_state),
            )
        else:
            t0 = time.perf_counter()
            clf = TGEMClassifier(random_state=seed, attention_backend="auto").fit(Xtr, ytr)
            fit_s = time.perf_counter() - t0
            imp_s_cached = []
            with open(path, "wb") as f:
                pickle.dump((clf, fit_s), f)
            (cache / f"pbmc_ig_test_{seed}.npz").unlink(missing_ok=True)
        t0 = time.perf_counter()
        cached = "_feature_importances" in clf.__dict__
        imp = clf.feature_importances_
        imp_s = time.perf_counter() - t0
        if not cached:  # keep the importances (and their time) with the model for later runs
            with open(path, "wb") as f:
                pickle.dump((clf, fit_s, imp_s), f)
        elif imp_s_cached:
            imp_s = imp_s_cached[0]
        acc = clf.score(Xte, yte)
        models[seed] = (clf, imp)
        report["models"].append(
            {
                "seed": seed,
                "fit_s": fit_s,
                "test_accuracy": acc,
                "importances_s": imp_s,
                "importances_cached": cached,
                "model_from_cache": from_cache,
                "backend": clf.attention_backend_,
            }
        )
        print(
            f"seed {seed}: fit {fit_s:.0f} s ({clf.attention_backend_}"
            f"{', cached' if from_cache else ''}), held-out accuracy {acc:.3f}, "
            f"feature_importances_ {imp_s:.0f} s{' (cached)' if cached else ''}",
            flush=True,
        )

    genes = np.asarray(X.columns)
    seeds = list(models)
    k = args.top
    tops = {s: set(genes[np.argsort(-imp, kind="stable")[:k]]) for s, (_, imp) in models.items()}
    jac = _pairwise_jaccard(tops, seeds)
    report["top_k"] = k
    report["chance_jaccard"] = _chance_jaccard(len(genes), k)
    report[f"top{k}_jaccard"] = jac
    if jac:
        report[f"top{k}_jaccard_mean"] = float(np.mean(list(jac.values())))
        report[f"top{k}_jaccard_min"] = float(np.min(list(jac.values())))
        print(
            f"\ntop-{k} feature_importances_ Jaccard across random states:",
            ", ".join(f"{a}: {v:.2f}" for a, v in jac.items()),
            f"(mean {np.mean(list(jac.values())):.2f}, min {np.min(list(jac.values())):.2f};"
            f" two random {k}-gene sets: {report['chance_jaccard']:.3f})",
        )
    if len(seeds) > 1:
        from scipy.stats import spearmanr

        rho = {
            f"{a}-{b}": float(spearmanr(models[a][1], models[b][1])[0])
            for i, a in enumerate(seeds)
            for b in seeds[i + 1 :]
        }
        report["importances_spearman"] = rho
        print(
            "Spearman correlation of the whole feature_importances_ across random states:",
            ", ".join(f"{a}: {v:.2f}" for a, v in rho.items()),
        )
    first = seeds[0]
    print(
        f"top-15 by feature_importances_ (seed {first}):",
        ", ".join(genes[np.argsort(-models[first][1])[:15]]),
    )

    test_attr = {}
    if args.class_jaccard or not args.skip_analysis:
        for seed in seeds if args.class_jaccard else [first]:
            test_attr[seed] = _test_attributions(
                models[seed][0], Xte, yte, cache / f"pbmc_ig_test_{seed}.npz", args.verbose
            )
    if args.class_jaccard and len(seeds) > 1:
        report["class_jaccard"] = {}
        print(
            f"\nper-class top-{k} genes of held-out IG (mean per cell type, true class): "
            "Jaccard across random states, mean [min] over the pairs"
        )
        print(f"{'cell type':<32} {'cells':>5} {'signed':>13} {'absolute':>13}")
        for absolute in (False, True):
            name = "absolute" if absolute else "signed"
            tables = {
                seed: gene_ranking(test_attr[seed][0], yte, genes=genes, absolute=absolute)
                for seed in seeds
            }
            per = {}
            for cls in np.unique(yte):
                tops_c = {
                    seed: set(t[(t["class"] == cls) & (t["rank"] <= k)]["gene"])
                    for seed, t in tables.items()
                }
                per[str(cls)] = _pairwise_jaccard(tops_c, seeds)
            report["class_jaccard"][name] = per
        for cls in np.unique(yte):
            cells = int(np.sum(yte == cls))
            cols = []
            for name in ("signed", "absolute"):
                v = list(report["class_jaccard"][name][str(cls)].values())
                cols.append(f"{np.mean(v):.2f} [{np.min(v):.2f}]")
            print(f"{cls:<32} {cells:5d} {cols[0]:>13} {cols[1]:>13}")
        for name in ("signed", "absolute"):
            v = [x for d in report["class_jaccard"][name].values() for x in d.values()]
            report[f"class_jaccard_{name}_mean"] = float(np.mean(v))
            report[f"class_jaccard_{name}_min"] = float(np.min(v))
            print(f"{'all cell types, ' + name:<38} mean {np.mean(v):.2f}, min {np.min(v):.2f}")
        report["ig_test_seconds"] = {str(s): v[2] for s, v in test_attr.items()}

    if args.skip_analysis:
        _save(args.output or "attribution_pbmc_stability", report)
        return
    clf = models[first][0]
    attr, delta, ig_s = test_attr[first]
    table = gene_ranking(attr, yte, genes=genes)
    table_abs = gene_ranking(attr, yte, genes=genes, absolute=True)
    report["ig_test"] = {
        "samples": len(yte),
        "seconds": ig_s,
        "max_abs_delta": float(np.max(np.abs(delta))),
    }
    print(
        f"\nIG on {len(yte)} held-out cells: {ig_s:.0f} s, max |convergence delta| "
        f"{np.max(np.abs(delta)):.2e}"
    )
    report["top_genes"] = {}
    print("\ntop 10 genes per cell type (signed mean IG, true class):")
    for cls, part in table.groupby("class"):
        top10 = part.sort_values("rank")["gene"].head(10).tolist()
        report["top_genes"][cls] = top10
        print(f"  {cls:<32} {', '.join(top10)}")
    report["markers"] = {}
    print(f"\nknown markers: rank in their cell type (signed / absolute), of {len(genes)} genes")
    for cls, marks in MARKERS.items():
        for m in marks:
            if m not in set(genes):
                print(f"  {cls:<16} {m:<7} not in the data")
                continue
            r = int(table[(table["class"] == cls) & (table["gene"] == m)]["rank"].iloc[0])
            ra = int(
                table_abs[(table_abs["class"] == cls) & (table_abs["gene"] == m)]["rank"].iloc[0]
            )
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
        print(
            f"{r['grid']:>7} {r['percent']:5.1f} {r['n_genes']:5d} {r['drop_top']:7.3f} "
            f"{r['drop_random_mean']:11.3f} +- {r['drop_random_std']:.3f}"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        from tgem.plotting import plot_ablation

        axes = plot_ablation(abl)
        axes[0].figure.savefig(
            RESULTS / "attribution_pbmc_ablation.png", dpi=120, bbox_inches="tight"
        )
    _save(args.output or "attribution_pbmc", report)


# ----------------------------------------------------------------------------- helpers
def _test_attributions(clf, Xte, yte, path: Path, verbose: int):
    """IG of the held-out cells (true class, zero baseline): (attr, delta, seconds), cached."""
    import numpy as np

    from tgem.interpret import attribute

    if path.exists():
        with np.load(path) as d:
            return d["attr"], d["delta"], float(d["seconds"])
    t0 = time.perf_counter()
    attr, delta = attribute(clf, Xte, y=yte, return_convergence_delta=True, verbose=verbose)
    seconds = time.perf_counter() - t0
    attr, delta = np.asarray(attr), np.asarray(delta)
    np.savez(path, attr=attr, delta=delta, seconds=seconds)
    print(f"IG of {len(yte)} held-out cells ({path.stem}): {seconds:.0f} s", flush=True)
    return attr, delta, seconds


def _pairwise_jaccard(sets: dict, keys: list) -> dict:
    return {
        f"{a}-{b}": len(sets[a] & sets[b]) / len(sets[a] | sets[b])
        for i, a in enumerate(keys)
        for b in keys[i + 1 :]
    }


def _chance_jaccard(n: int, k: int) -> float:
    """Expected Jaccard index of two independent random k-subsets of n items."""
    from math import comb

    total = comb(n, k)
    return sum(comb(k, i) * comb(n - k, k - i) / total * i / (2 * k - i) for i in range(0, k + 1))


def _machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
    }


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
    p.add_argument(
        "--backends",
        nargs="+",
        default=["exact", "compiled", "auto"],
        help="attention backends, each in a fresh process (auto: tgem's choice)",
    )
    p.add_argument(
        "--batch", type=int, default=64, help="samples in the batch timed and measured for memory"
    )
    p.add_argument(
        "--adaptive-samples",
        type=int,
        default=4,
        help="samples timed with the adaptive rule (0: skip)",
    )
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="time and measure the first call of a fresh process (compilation "
        "included): its peak memory is the cold cost of one batch",
    )
    p.add_argument(
        "--output",
        help="results file name in benchmarks/results/ (no .json); "
        "default attribution_speed, attribution_pbmc or attribution_pbmc_stability",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--pbmc", action="store_true", help="run the PBMC sanity check")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--cache",
        default=str(RESULTS / "tmp" / "attribution"),
        help="fitted PBMC models are kept here between runs",
    )
    p.add_argument(
        "--skip-analysis",
        action="store_true",
        help="PBMC: only fit, importances and their stability",
    )
    p.add_argument(
        "--class-jaccard",
        action="store_true",
        help="PBMC: also the stability of the per-class rankings of held-out IG "
        "(one IG run on the held-out cells per random state)",
    )
    p.add_argument("--top", type=int, default=50, help="PBMC: genes in the top sets compared")
    p.add_argument(
        "--refit",
        action="store_true",
        help="PBMC: fit again even if a cached model exists (overwrites it)",
    )
    p.add_argument("--plot", action="store_true", help="save the ablation figure")
    p.add_argument("--verbose", type=int, default=0)
    args = p.parse_args(argv)
    if args.worker:
        print(
            json.dumps(
                _worker(
                    args.worker,
                    args.genes,
                    args.threads,
                    args.repeats,
                    args.adaptive_samples,
                    args.batch,
                    not args.no_warmup,
                )
            )
        )
    elif args.pbmc:
        pbmc(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
