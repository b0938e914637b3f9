"""The tree code in the whole model: training step, inference and Integrated Gradients.

Issue 25's matrix. For each gene count, kind of weights and backend, one fresh process
builds the published architecture (3 layers, 5 heads, 34 classes, dropout 0.3, leaky ReLU,
float32) and measures, after a warm-up call:

* ``train_s``: one training step (forward, NLL loss, backward, Adam), batch 16;
* ``infer_sps``: inference samples per second (forward without gradients, batch
  ``--infer-batch``);
* ``ig_s``: Integrated Gradients for one sample: the 50 interpolated inputs through the
  model and back as one batch (the work of 50 quadrature steps, as ``bench_attention.py``);
* ``*_mem_mb``: peak resident memory above the resident memory just before that measure's
  warm-up (the model built and everything imported; ``VmHWM`` reset through
  ``/proc/self/clear_refs`` and freed memory handed back with ``malloc_trim`` first).

Backends: ``native`` (the dense native kernel, subnormal-free), ``tree_native`` (the tree
code, sums in C), ``auto`` (what ``attention_backend="auto"`` runs: its backend name is
recorded, e.g. ``native+tree_native`` where it picks per call) and ``tree`` (the tree code in
pure PyTorch, the fallback of machines without a C compiler), and for context the plain
formulation ``reference`` (gene x gene matrices; only up to 1,708 genes, with the initialised
weights, and Integrated Gradients only at 765). Kinds of weights:

* ``init``: as initialised (Xavier-normal per-gene WQ/WK/WV, seed 0);
* ``trained``: the per-gene WQ, WK and WV of a PBMC model fitted with ``TGEMClassifier()``'s
  defaults (all 700 bundled cells, ``random_state=0``), resampled with replacement to the
  gene count (one draw of gene indices per layer, so a gene keeps its three weights in every
  head), the other weights as initialised;
* ``x30``, ``x300``: as initialised with WQ and WK multiplied by 30 or 300 (sharp attention).

The inputs are standard normal (``TGEMClassifier()`` standardises every gene), seed 0.
Each measure is repeated ``--repeats`` times (and, with ``--min-seconds``, until its repeats
add up to that many seconds; the median is reported) unless its warm-up
alone took more than ``--single`` seconds: then the warm-up's time is the figure (first-call
costs are negligible at that size). The backends of one row run one after the other, so
ratios come from one run. To keep the matrix within about half an hour of machine time, the
dense kernel runs above ``--dense-full-max`` genes only with the initialised weights and only
the training step and inference (its speed does not depend on the weights:
``bench_subnormal.py``), and the pure-PyTorch tree only with the initialised and trained
weights above ``--tree-sharp-max`` genes.

``--paired`` times instead all backends of one (genes, kind) in one process, calling them in
turns (the order rotating each round) until each has its repeats and seconds: a slower or
faster spell of the machine then falls on every backend alike, and the ratios of a row (such
as ``auto`` over the faster backend, where one backend runs whichever way it is picked) are
not blurred by differences between processes (up to 14 % between two processes running the
same backend in the separate-process matrix). It measures no memory.

The ``--fits`` section runs, each in a fresh process with ``attention_backend="auto"``:

* ``pbmc``: ``TGEMClassifier(random_state=0)`` fitted on all 700 bundled PBMC cells (the
  model is cached in ``results/cache/tree_model/`` and gives the ``trained`` weights), then
  the 700 cells predicted with every backend: disagreements with the dense kernel and the
  largest difference of a probability;
* ``fit22283`` and ``fit60000``: a fit of ``--fit-samples`` random samples (float32, labels
  of 4 classes) at 22,283 genes for ``--fit-epochs`` epochs and at 60,000 genes for one,
  time and peak memory above the resident memory after the data were made.

Prints tables and writes JSON (``--out``); it never asserts a time. Run it on an otherwise
idle machine.

Example::

    PYTHONPATH=. python benchmarks/bench_tree_model.py --threads 2 \\
        --out benchmarks/results/tree_model_cpu.json
    PYTHONPATH=. python benchmarks/bench_tree_model.py --threads 2 --genes 765 1708 5000 \\
        --backends native tree_native auto --paired --repeats 5 --min-seconds 2 \\
        --out benchmarks/results/tree_model_paired_cpu.json
    PYTHONPATH=. python benchmarks/bench_tree_model.py --quick   # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_attention import cpu_model  # noqa: E402
from bench_h5ad_memory import _reset_peak, _status_kib  # noqa: E402

RESULTS = HERE / "results"
CACHE = RESULTS / "cache" / "tree_model"
PBMC_MODEL = CACHE / "pbmc_default.tgem"
KINDS = ("init", "trained", "x30", "x300")
BACKENDS = ("native", "tree_native", "auto", "tree", "reference")
MODES = ("train", "infer", "ig")
CLASSES = 34
MAX_REPEATS = 200


# ------------------------------------------------------------------------------ memory
def _release() -> None:
    """Free what Python holds and hand glibc's free memory back to the system."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


class PeakMemory:
    """Peak resident memory above the resident memory at entry, in MiB (``.mb``)."""

    def __enter__(self):
        _release()
        self.reset = _reset_peak()
        self.base = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.mb = (_status_kib("VmHWM") - self.base) / 1024
        return False


# ------------------------------------------------------------------------------ weights
def set_weights(net, kind: str, genes: int, model_path: Path) -> None:
    """Give ``net`` (as initialised) the weights of ``kind`` (see the module docstring)."""
    import numpy as np
    import torch

    if kind == "init":
        return
    if kind in ("x30", "x300"):
        factor = float(kind[1:])
        with torch.no_grad():
            for layer in net.layers:
                layer.WQ.mul_(factor)
                layer.WK.mul_(factor)
        return
    if kind != "trained":
        raise ValueError(f"unknown kind of weights {kind!r}; choose one of {KINDS}")
    import tgem

    trained = tgem.load(model_path).module_
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for layer, source in zip(net.layers, trained.layers, strict=True):
            idx = torch.from_numpy(rng.integers(0, source.WQ.shape[1], genes))
            for name in ("WQ", "WK", "WV"):
                getattr(layer, name).copy_(getattr(source, name)[:, idx])


# ------------------------------------------------------------------------------- worker
def _measures(args, backend: str):
    """The published architecture with ``args.kind``'s weights on ``backend``: the name of
    what it runs and its three measures as functions (see the module docstring)."""
    import torch

    from tgem._model import TGEMNet
    from tgem._training import make_optimizer

    genes, kind = args.genes[0], args.kind
    gen = torch.Generator().manual_seed(0)
    net = TGEMNet(
        genes,
        CLASSES,
        n_layers=3,
        n_heads=5,
        dropout=0.3,
        attention_backend=backend,
        generator=gen,
    )
    set_weights(net, kind, genes, Path(args.model))
    backend_name = net.backend(torch.empty(0)).name
    x_all = torch.randn(max(args.batch, args.infer_batch, 1), genes, generator=gen)
    y = torch.randint(0, CLASSES, (args.batch,), generator=gen)
    opt = make_optimizer(net.parameters(), 1e-3)

    def train_step():
        net.train()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.nll_loss(net(x_all[: args.batch]), y).backward()
        opt.step()

    @torch.no_grad()
    def infer():
        net.eval()
        net(x_all[: args.infer_batch])

    def ig_sample():
        net.eval()
        alphas = torch.linspace(0.02, 1.0, 50)[:, None]
        xi = (alphas * x_all[:1]).requires_grad_(True)
        (grad,) = torch.autograd.grad(net(xi)[:, 0].sum(), xi)
        return grad

    return backend_name, {"train": train_step, "infer": infer, "ig": ig_sample}


def _enough(times: list[float], args) -> bool:
    return len(times) >= MAX_REPEATS or (
        len(times) >= args.repeats and sum(times) >= args.min_seconds
    )


def worker(args) -> dict:
    """One (genes, kind, backend) configuration in this process: its three measures."""
    # what `import tgem` sets when it comes first (docs/install.rst), here before torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    backend_name, fns = _measures(args, args.backend)
    res = {"genes": args.genes[0], "kind": args.kind, "backend": args.backend}
    res["runs"] = backend_name
    for mode in args.modes:
        fn = fns[mode]
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            fn()  # warm-up
            first = time.perf_counter() - t0
            times = [first]
            if first <= args.single:  # fast enough to repeat: the warm-up is not counted
                times = []
                while not _enough(times, args):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        res[f"{mode}_s"] = t
        res[f"{mode}_repeats"] = len(times)
        res[f"{mode}_mem_mb"] = mem.mb
        res["memory_reset"] = mem.reset
        if mode == "infer":
            res["infer_sps"] = args.infer_batch / t
    return res


def paired_worker(args) -> list[dict]:
    """``--paired``: every backend of ``args.backends`` at one (genes, kind) in this process,
    each measure timed in rounds that call the backends in turn (the order rotating), so
    that a slower or faster spell of the machine falls on all of them alike: the ratios of
    one row compare like with like. Times only (memory needs a process per backend)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    built = {b: _measures(args, b) for b in args.backends}
    rows = {b: {"genes": args.genes[0], "kind": args.kind, "backend": b, "runs": built[b][0]}
            for b in args.backends}  # fmt: skip
    for mode in args.modes:
        for _, fns in built.values():
            fns[mode]()  # warm-up
        times = {b: [] for b in args.backends}
        turn = 0
        while not all(_enough(t, args) for t in times.values()):
            order = (
                args.backends[turn % len(args.backends) :]
                + args.backends[: turn % len(args.backends)]
            )
            for b in order:
                t0 = time.perf_counter()
                built[b][1][mode]()
                times[b].append(time.perf_counter() - t0)
            turn += 1
        for b, t in times.items():
            rows[b][f"{mode}_s"] = statistics.median(t)
            rows[b][f"{mode}_repeats"] = len(t)
            rows[b]["paired"] = True
            if mode == "infer":
                rows[b]["infer_sps"] = args.infer_batch / rows[b][f"{mode}_s"]
    return list(rows.values())


# --------------------------------------------------------------------------------- fits
def fit_worker(args) -> dict:
    """One of the ``--fits`` (see the module docstring) in this process."""
    import numpy as np
    import torch

    import tgem

    torch.set_num_threads(args.threads)
    if args.fit == "pbmc":
        from tgem.datasets import load_pbmc68k

        X, y = load_pbmc68k(return_X_y=True)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            clf = tgem.TGEMClassifier(random_state=0).fit(X, y)
            seconds = time.perf_counter() - t0
        Path(args.model).parent.mkdir(parents=True, exist_ok=True)
        clf.save(args.model)
        out = {
            "fit": "pbmc",
            "samples": len(y),
            "genes": X.shape[1],
            "epochs": clf.max_epochs,
            "fit_s": seconds,
            "fit_mem_mb": mem.mb,
            "backend": clf.attention_backend_,
        }
        probas = {}
        for name in ("native", "tree_native", "tree"):
            clf.module_.attention_backend = name
            t0 = time.perf_counter()
            probas[name] = clf.predict_proba(X)
            out[f"predict_s_{name}"] = time.perf_counter() - t0
        dense = probas["native"]
        for name in ("tree_native", "tree"):
            out[f"disagreements_{name}"] = int((probas[name].argmax(1) != dense.argmax(1)).sum())
            out[f"max_proba_diff_{name}"] = float(np.abs(probas[name] - dense).max())
        out["accuracy_on_training_cells"] = float((clf.classes_[dense.argmax(1)] == y).mean())
        return out
    genes = {"fit22283": 22283, "fit60000": 60000}[args.fit]
    epochs = args.fit_epochs if genes == 22283 else 1
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.fit_samples, genes), dtype=np.float32)
    y = np.arange(args.fit_samples) % 4
    clf = tgem.TGEMClassifier(max_epochs=epochs, random_state=0)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        clf.fit(X, y)
        seconds = time.perf_counter() - t0
    return {
        "fit": args.fit,
        "samples": args.fit_samples,
        "genes": genes,
        "epochs": epochs,
        "fit_s": seconds,
        "fit_s_per_epoch": seconds / epochs,
        "fit_mem_mb": mem.mb,
        "backend": clf.attention_backend_,
    }


# ----------------------------------------------------------------------------- the run
def _child(args, extra: list[str]) -> dict | list[dict]:
    cmd = [
        sys.executable,
        __file__,
        "--threads",
        str(args.threads),
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--infer-batch",
        str(args.infer_batch),
        "--repeats",
        str(args.repeats),
        "--min-seconds",
        str(args.min_seconds),
        "--single",
        str(args.single),
        "--fit-samples",
        str(args.fit_samples),
        "--fit-epochs",
        str(args.fit_epochs),
        *extra,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within --timeout-s {args.timeout_s:.0f} s"}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(args) -> list[tuple[int, str, str, list[str]]]:
    """(genes, kind, backend, modes) of every configuration, in run order."""
    rows = []
    for genes in args.genes:
        for kind in args.kinds:
            for backend in args.backends:
                modes = list(args.modes)
                if backend == "native" and genes > args.dense_full_max:
                    if kind != "init":
                        continue
                    modes = [m for m in modes if m != "ig"]
                if backend == "tree" and genes > args.tree_sharp_max and kind in ("x30", "x300"):
                    continue
                if backend == "reference":  # gene x gene matrices: 6 GB per step at 1,708
                    if genes > 1708 or kind != "init":
                        continue
                    if genes > 765:
                        modes = [m for m in modes if m != "ig"]
                if modes:
                    rows.append((genes, kind, backend, modes))
    return rows


def _jobs(args) -> list[tuple[int, str, list[str], list[str]]]:
    """(genes, kind, backends, modes) of every child process: one per row of :func:`plan`,
    or with ``--paired`` one per (genes, kind), its backends timed together on the modes
    they share."""
    rows = plan(args)
    if not args.paired:
        return [(g, k, [b], m) for g, k, b, m in rows]
    jobs: dict[tuple[int, str], tuple[list[str], list[str]]] = {}
    for genes, kind, backend, modes in rows:
        backends, shared = jobs.setdefault((genes, kind), ([], list(modes)))
        backends.append(backend)
        shared[:] = [m for m in shared if m in modes]
    return [(g, k, b, m) for (g, k), (b, m) in jobs.items() if m]


def add_ratios(rows: list[dict]) -> None:
    """Per row of (genes, kind): each backend's time over dense native's, and ``auto``'s
    time over the faster of ``native`` and ``tree_native``."""
    by = {(r["genes"], r["kind"], r["backend"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        dense = by.get((r["genes"], r["kind"], "native")) or by.get((r["genes"], "init", "native"))
        tree = by.get((r["genes"], r["kind"], "tree_native"))
        for mode in MODES:
            t = r.get(f"{mode}_s")
            if t is None:
                continue
            if dense and dense.get(f"{mode}_s") and r["backend"] != "native":
                r[f"{mode}_speedup_vs_native"] = dense[f"{mode}_s"] / t
            if r["backend"] == "auto":
                best = [x[f"{mode}_s"] for x in (dense, tree) if x and x.get(f"{mode}_s")]
                if best:
                    r[f"{mode}_auto_over_best"] = t / min(best)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_tables(report: dict) -> str:
    lines = [
        "| genes | weights | backend | runs | step s | x native | infer samples/s | IG s/sample "
        "| x native | step MB | infer MB | IG MB | auto / best (step, infer, IG) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["matrix"]:
        if "error" in r:
            lines.append(f"| {r['genes']:,} | {r['kind']} | {r['backend']} | error: {r['error']} |")
            continue
        auto = (
            " / ".join(_fmt(r.get(f"{m}_auto_over_best"), ".2f") for m in MODES)
            if r["backend"] == "auto"
            else ""
        )
        lines.append(
            f"| {r['genes']:,} | {r['kind']} | {r['backend']} | {r['runs']} "
            f"| {_fmt(r.get('train_s'), '.3f')} | {_fmt(r.get('train_speedup_vs_native'), '.1f')} "
            f"| {_fmt(r.get('infer_sps'), '.1f')} | {_fmt(r.get('ig_s'), '.3f')} "
            f"| {_fmt(r.get('ig_speedup_vs_native'), '.1f')} "
            f"| {_fmt(r.get('train_mem_mb'), '.0f')} "
            f"| {_fmt(r.get('infer_mem_mb'), '.0f')} | {_fmt(r.get('ig_mem_mb'), '.0f')} | {auto} |"
        )
    if report.get("fits"):
        lines += [
            "",
            "| fit | samples | genes | epochs | backend | s | peak MB | notes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for f in report["fits"]:
            if "error" in f:
                lines.append(f"| {f.get('fit')} | error: {f['error']} |")
                continue
            notes = ""
            if f["fit"] == "pbmc":
                notes = (
                    f"disagreements with native on the 700 cells: tree_native "
                    f"{f['disagreements_tree_native']}, tree {f['disagreements_tree']}; "
                    f"largest probability difference {f['max_proba_diff_tree_native']:.1e} / "
                    f"{f['max_proba_diff_tree']:.1e}"
                )
            lines.append(
                f"| {f['fit']} | {f['samples']} | {f['genes']:,} | {f['epochs']} | {f['backend']} "
                f"| {f['fit_s']:.1f} | {f['fit_mem_mb']:.0f} | {notes} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genes", type=int, nargs="+", default=[765, 1708, 5000, 22283, 60000])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--infer-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--min-seconds",
        type=float,
        default=0.0,
        help="repeat a fast measure until its repeats add up to this many seconds "
        f"(at most {MAX_REPEATS} repeats): short calls vary from process to process",
    )
    p.add_argument(
        "--single",
        type=float,
        default=3.0,
        help="a measure whose warm-up took longer than this is not repeated",
    )
    p.add_argument(
        "--dense-full-max",
        type=int,
        default=22283,
        help="above this many genes the dense kernel runs only as initialised, "
        "without Integrated Gradients",
    )
    p.add_argument(
        "--tree-sharp-max",
        type=int,
        default=5000,
        help="above this many genes the pure-PyTorch tree skips the x30/x300 weights",
    )
    p.add_argument(
        "--fits",
        nargs="*",
        default=["pbmc", "fit22283", "fit60000"],
        choices=["pbmc", "fit22283", "fit60000"],
    )
    p.add_argument("--fit-samples", type=int, default=64)
    p.add_argument("--fit-epochs", type=int, default=3)
    p.add_argument("--model", default=str(PBMC_MODEL), help="the cached PBMC model")
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument(
        "--paired",
        action="store_true",
        help="time the backends of each (genes, weights) in one process, in turns (no memory)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, no fits")
    p.add_argument("--out", default=None, help="JSON path (default results/tree_model_cpu.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="init", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--fit", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.fit:
            out = fit_worker(args)
        else:
            out = paired_worker(args) if args.paired else worker(args)
        sys.stdout.write(json.dumps(out) + "\n")
        return 0
    if args.quick:
        args.genes, args.repeats, args.fits = [64, 300], 1, []
        args.batch = args.infer_batch = 4
        args.kinds = ["init", "x30"] + (["trained"] if Path(args.model).exists() else [])

    import torch

    import tgem

    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "tgem": tgem.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "load_average_start": os.getloadavg(),
    }
    out = Path(args.out) if args.out else RESULTS / "tree_model_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "args": vars(args), "fits": [], "matrix": []}

    def save(partial: bool) -> None:
        report["partial"] = partial
        out.write_text(json.dumps(report, indent=2))

    t_start = time.perf_counter()
    for fit in args.fits:
        res = {"fit": fit, **_child(args, ["--worker", "--fit", fit])}
        report["fits"].append(res)
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
        save(True)
    if "trained" in args.kinds and not Path(args.model).exists():
        raise SystemExit(f"{args.model} does not exist: run with --fits pbmc first")
    for genes, kind, backends, modes in _jobs(args):
        where = ["--worker", "--genes", str(genes), "--kind", kind, "--modes", *modes]
        if args.paired:
            got = _child(args, [*where, "--paired", "--backends", *backends])
            results = (
                got
                if isinstance(got, list)
                else [{"genes": genes, "kind": kind, "backend": b, **got} for b in backends]
            )
        else:
            res = _child(args, [*where, "--backend", backends[0]])
            results = [{"genes": genes, "kind": kind, "backend": backends[0], **res}]
        for res in results:
            report["matrix"].append(res)
            sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
        save(True)
    add_ratios(report["matrix"])
    machine["load_average_end"] = os.getloadavg()
    machine["wall_s"] = time.perf_counter() - t_start
    save(False)
    sys.stdout.write("\n" + format_tables(report) + f"\n\nwrote {out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
