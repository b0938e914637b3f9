"""Speed, memory and accuracy of T-GEM's attention backends.

For each number of genes and each backend, one fresh process per configuration measures:

* ``train_s``: one training step (forward, backward, Adam) of the full model, batch 16,
  3 layers, 5 heads (median of repeats, after a warm-up step);
* ``infer_sps``: inference samples per second at batch 64;
* ``ig_s``: Integrated Gradients for one sample at 50 steps (forward + backward over the 50
  interpolated inputs, as one batch);
* ``train_mem_mb`` / ``infer_mem_mb``: peak resident set minus the resident set right after
  imports and model construction (Linux ``ru_maxrss``; on CUDA: peak allocated GPU memory).

On CPU each figure is also given as a percentage of the machine's bound (``fma_probe.py``) in
two ways: the median against the bound of one full probe at the start of the run, and, as
"paired", the median over the repeats of each repeat against the bound of the mean rate of
two 40 ms probes run just before and just after it (on a machine shared with other tenants
the processor's throughput moves from second to second; the paired figure compares each
repeat with what the processor delivered at that moment).

The reference formulation is run only where its predicted size is under half of the
machine's memory; otherwise the table says how much it would need. The accuracy section
compares every path's float32 error in log-probabilities and in all gradients against a
float64 computation with the plain formulation's own float32 error. It prints tables and
writes JSON; it never asserts a time.

Usage::

    python benchmarks/bench_attention.py                  # full CPU run (about an hour)
    python benchmarks/bench_attention.py --quick          # CI smoke run (seconds)
    python benchmarks/bench_attention.py --device cuda --genes 1708 22283 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# bytes per (batch x heads x genes^2) element held by the plain formulation: with gradients
# (training, Integrated Gradients) scores, softmax and masked softmax of 3 layers plus autograd
# temporaries, fitted to the original's measured 6.4 GB at 1708 genes, batch 16, 5 heads;
# without (inference) the three float32 temporaries of one layer.
REFERENCE_BYTES_PER_PAIR = {"train": 28, "ig": 28, "infer": 12}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def total_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def reference_need_gb(genes: int, batch: int, mode: str = "train", heads: int = 5) -> float:
    return REFERENCE_BYTES_PER_PAIR[mode] * batch * heads * genes * genes / 2**30


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------- worker
def worker(args) -> dict:
    """Run one (backend, genes, mode) configuration in this process and return its figures."""
    import torch

    from tgem._model import TGEMNet
    from tgem._training import make_optimizer

    torch.set_num_threads(args.threads)
    genes = args.genes[0]
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    net = TGEMNet(
        genes, 34, n_layers=3, n_heads=5, dropout=0.3, attention_backend=args.backend, generator=gen
    ).to(device)
    backend_name = net.backend(torch.empty(0, device=device)).name
    batch = args.batch if args.mode == "train" else args.infer_batch
    if args.mode == "ig":
        batch = 50
    x = (torch.rand(batch, genes, generator=gen) * 4).to(device)
    y = torch.randint(0, 34, (batch,), generator=gen).to(device)
    opt = make_optimizer(net.parameters(), 1e-4)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def train_step():
        net.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.nll_loss(net(x), y)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer():
        net.eval()
        net(x)

    def ig_sample():
        # 50 interpolated inputs of one sample, forward + backward of the target log-prob
        net.eval()
        alphas = torch.linspace(0.02, 1.0, 50, device=device)[:, None]
        xi = (alphas * x[:1]).requires_grad_(True)
        out = net(xi)[:, int(y[0])].sum()
        (grad,) = torch.autograd.grad(out, xi)
        return grad

    fn = {"train": train_step, "infer": infer, "ig": ig_sample}[args.mode]
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = _rss_mb()
    fn()  # warm-up (also allocates the working set)
    sync()
    quick = _quick_probe(args.threads) if not cuda else None
    rate_before = quick() if quick else None
    times, paired = [], []
    deadline = time.perf_counter() + args.budget_s
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if quick:  # the repeat against the bound of the probes just before and after it
            rate_after = quick()
            paired.append(
                _pct_of_bound(
                    (rate_before + rate_after) / 2, genes, args.mode, args.batch, batch, times[-1]
                )
            )
            rate_before = rate_after
        if time.perf_counter() > deadline:
            break
    peak = (torch.cuda.max_memory_allocated(device) / 2**20) if cuda else _peak_mb()
    t = statistics.median(times)
    res = {
        "backend": backend_name,
        "genes": genes,
        "mode": args.mode,
        "batch": batch,
        "seconds": t,
        "best_seconds": min(times),
        "repeats": len(times),
        "mem_mb": peak - base,
    }
    if paired:
        res["paired_pct_of_bound"] = statistics.median(paired)
    return res


def _quick_probe(threads: int):
    """A 40 ms FMA probe (``fma_probe.QuickProbe``; the worker runs as a script, so this
    folder is on ``sys.path``), or None where the native kernel that runs it is not built."""
    from fma_probe import QuickProbe

    try:
        return QuickProbe(seconds=0.04, threads=threads)
    except RuntimeError:  # no kernel library: the paired figure is left out, nothing else
        return None


def _percent(key: str, value: float, limit: float) -> float:
    """A figure as a percentage of its bound (a rate for ``infer_sps``, else a time)."""
    return 100.0 * (value / limit if key == "infer_sps" else limit / value)


def _pct_of_bound(
    rate: float, genes: int, mode: str, train_batch: int, batch: int, seconds: float
) -> float:
    """One timed repeat as a percentage of the bound at FMA rate ``rate``."""
    from fma_probe import workload_bounds

    limits = workload_bounds(rate, genes, 5, 3, train_batch)
    key = {"train": "train_s", "infer": "infer_sps", "ig": "ig_s"}[mode]
    return _percent(key, batch / seconds if mode == "infer" else seconds, limits[key])


# ------------------------------------------------------------------------------- accuracy
def accuracy_rows(genes_list, backends, device, seeds: int = 4, batch: int = 16) -> list[dict]:
    """float32 error of each path against float64, next to the plain float32 error.

    For each tensor (log-probabilities, input gradient, every parameter's gradient) the
    error is the relative RMS over ``seeds`` random models and inputs (a maximum over a few
    numbers, e.g. the 5 head-mixing weights, is decided by one lucky rounding of the
    reference); the max-abs errors are reported too.
    """
    import math

    import torch

    from tgem._kernels import resolve_backend
    from tgem._model import TGEMNet

    rows = []
    for genes in genes_list:
        acc: dict = {}
        f64_diff: dict = {}
        names = None
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(1000 * genes + seed)
            x = torch.rand(batch, genes, generator=gen, dtype=torch.float64) * 4
            y = torch.randint(0, 10, (batch,), generator=gen)
            base = TGEMNet(genes, 10, dropout=0.0, attention_backend="reference", generator=gen)
            state = {k: v.double() for k, v in base.state_dict().items()}
            names = ["log_proba", "input"] + list(state)

            def run(backend, dtype, dev, genes=genes, state=state, x=x, y=y):
                net = TGEMNet(genes, 10, dropout=0.0, attention_backend=backend).to(dev, dtype)
                net.load_state_dict({k: v.to(dev, dtype) for k, v in state.items()})
                xi = x.to(dev, dtype).requires_grad_(True)
                lp = net(xi)
                loss = torch.nn.functional.nll_loss(lp, y.to(dev))
                grads = torch.autograd.grad(loss, [xi, *net.parameters()])
                return [lp.detach().double().cpu()] + [g.double().cpu() for g in grads]

            exact64 = run("reference", torch.float64, "cpu")
            for name in backends:
                try:
                    resolve_backend(name, device, torch.float32)
                except ValueError:
                    continue
                p32 = run(name, torch.float32, device)
                for tname, p, e in zip(names, p32, exact64):
                    a = acc.setdefault((name, tname), [0.0, 0.0, 0.0])
                    a[0] += float(((p - e) ** 2).sum())
                    a[1] += float((e**2).sum())
                    a[2] = max(a[2], float((p - e).abs().max()))
                if name != "reference":
                    try:
                        resolve_backend(name, "cpu", torch.float64)
                    except ValueError:  # float32-only kernels
                        continue
                    p64 = run(name, torch.float64, "cpu")
                    f64_diff[name] = max(
                        f64_diff.get(name, 0.0),
                        max(float((a - b).abs().max()) for a, b in zip(p64, exact64)),
                    )
        for name in backends:
            if (name, "log_proba") not in acc:
                continue
            ratios = {}
            for tname in names:
                err = math.sqrt(acc[(name, tname)][0] / acc[(name, tname)][1])
                ref = math.sqrt(acc[("reference", tname)][0] / acc[("reference", tname)][1])
                ratios[tname] = err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
            worst = max(ratios, key=ratios.get)
            rows.append(
                {
                    "genes": genes,
                    "backend": name,
                    "seeds": seeds,
                    "batch": batch,
                    "logprob_err": acc[(name, "log_proba")][2],
                    "reference_logprob_err": acc[("reference", "log_proba")][2],
                    "input_grad_err": acc[(name, "input")][2],
                    "max_param_grad_err": max(acc[(name, t)][2] for t in names[2:]),
                    "worst_rms_ratio_to_reference": ratios[worst],
                    "worst_tensor": worst,
                    "rms_ratios": ratios,
                    "float64_max_diff": f64_diff.get(name),
                }
            )
    return rows


# ------------------------------------------------------------------------------- driver
def run_config(args, backend, genes, mode) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--backend",
        backend,
        "--genes",
        str(genes),
        "--mode",
        mode,
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--infer-batch",
        str(args.infer_batch),
        "--repeats",
        str(args.repeats),
        "--budget-s",
        str(args.budget_s),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:  # a row that says so, and the run goes on
        return {
            "backend": backend,
            "genes": genes,
            "mode": mode,
            "error": f"did not finish within --timeout-s {args.timeout_s:.0f} s",
        }
    if proc.returncode != 0:
        return {
            "backend": backend,
            "genes": genes,
            "mode": mode,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed",
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_backends(device) -> list[str]:
    import torch

    from tgem._kernels import backend_status

    status = backend_status(device, torch.float32)
    return [
        name for name, reason in status.items() if reason is None and not name.startswith("tgem.")
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genes", type=int, nargs="+", default=[765, 1708, 5000, 12625, 22283])
    p.add_argument(
        "--backends", nargs="+", default=None, help="default: every backend available on the device"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--infer-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--budget-s",
        type=float,
        default=60.0,
        help="stop repeating a configuration after this many seconds",
    )
    p.add_argument("--timeout-s", type=float, default=3600.0)
    p.add_argument("--modes", nargs="+", default=["train", "infer", "ig"])
    p.add_argument(
        "--all-modes-up-to",
        type=int,
        default=5000,
        help="above this many genes only the training step is measured",
    )
    p.add_argument("--accuracy-genes", type=int, nargs="*", default=[17, 765, 1708])
    p.add_argument("--quick", action="store_true", help="CI smoke run: small sizes only")
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the plain formulation (accuracy rows still use it as oracle)",
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="exact", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="train", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        sys.stdout.write(json.dumps(worker(args)) + "\n")
        return 0
    if args.quick:
        args.genes, args.accuracy_genes, args.repeats = [64, 200], [17], 1
        args.batch, args.infer_batch = 4, 8

    import torch

    import tgem

    backends = args.backends or available_backends(args.device)
    if "reference" not in backends and not args.no_reference:
        backends = ["reference", *backends]
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "memory_gb": round(total_memory_gb(), 1),
        "torch": torch.__version__,
        "tgem": tgem.__version__,
        "device": args.device,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    bound = None
    if args.device == "cpu":
        try:
            sys.path.insert(0, str(HERE))
            from fma_probe import measure_bound

            bound = measure_bound(threads=args.threads)
        except Exception as exc:  # the probe is informative; its absence is reported
            bound = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(f"machine: {json.dumps(machine)}\nbound: {json.dumps(bound)}\n")

    rows = []
    half = total_memory_gb() / 2
    if args.device.startswith("cuda"):
        half = torch.cuda.get_device_properties(torch.device(args.device)).total_memory / 2**31
    out = (
        Path(args.out)
        if args.out
        else RESULTS
        / (f"attention_{'quick_' if args.quick else ''}{args.device.replace(':', '')}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    for genes in args.genes:
        modes = args.modes if genes <= args.all_modes_up_to else ["train"]
        for backend in backends:
            res = {"backend": backend, "genes": genes}
            for mode in modes:
                if backend == "reference":
                    batch = {"train": args.batch, "infer": args.infer_batch, "ig": 50}[mode]
                    need = reference_need_gb(genes, batch, mode)
                    if need > half:
                        res[f"{mode}_error"] = f"does not fit, would need {need:.0f} GB"
                        continue
                r = run_config(args, backend, genes, mode)
                if "error" in r:
                    res["error"] = r["error"]
                    break
                res["backend"] = r["backend"]
                if "paired_pct_of_bound" in r:
                    res[f"{mode}_paired_pct_of_bound"] = r["paired_pct_of_bound"]
                if mode == "train":
                    res.update(train_s=r["seconds"], train_mem_mb=r["mem_mb"])
                elif mode == "infer":
                    res.update(infer_sps=r["batch"] / r["seconds"], infer_mem_mb=r["mem_mb"])
                else:
                    res.update(ig_s=r["seconds"], ig_mem_mb=r["mem_mb"])
            rows.append(res)
            sys.stdout.write(json.dumps(res) + "\n")
            sys.stdout.flush()
            out.write_text(
                json.dumps(
                    {"machine": machine, "bound": bound, "speed": rows, "partial": True}, indent=2
                )
            )
    _add_ratios(rows)
    _add_bound_percent(rows, bound, args.batch)
    acc = accuracy_rows(
        args.accuracy_genes,
        sorted(set(backends) | {"reference"}),
        args.device,
        seeds=1 if args.quick else 4,
    )
    report = {
        "machine": machine,
        "bound": bound,
        "speed": rows,
        "accuracy": acc,
        "memory_slope_mb_per_gene": _slopes(rows),
        "args": vars(args),
    }
    sys.stdout.write("\n" + format_tables(report) + "\n")
    out.write_text(json.dumps(report, indent=2))
    sys.stdout.write(f"\nwrote {out}\n")
    return 0


def _add_ratios(rows):
    ref = {r["genes"]: r for r in rows if r["backend"] == "reference" and "train_s" in r}
    for r in rows:
        base = ref.get(r["genes"])
        if base and "train_s" in r and r["backend"] != "reference":
            r["train_speedup_vs_reference"] = base["train_s"] / r["train_s"]
            r["train_mem_ratio_vs_reference"] = base["train_mem_mb"] / max(r["train_mem_mb"], 1e-9)


def _add_bound_percent(rows, bound, batch: int) -> None:
    """Each CPU figure as a percentage of the machine's bound (fma_probe), per gene count.

    The probe states the bound at its own gene count; the work grows with genes², so the bound
    of a row is the probe's FMA rate applied to that row's gene pairs (same op counts).
    """
    if not bound or "fma_lane_ops_per_s" not in bound:
        return
    from fma_probe import workload_bounds  # benchmarks/ is on sys.path (see main)

    for r in rows:
        limits = workload_bounds(
            bound["fma_lane_ops_per_s"], r["genes"], bound["heads"], bound["layers"], batch
        )
        for key, limit in limits.items():
            if key in r:
                r[f"{key}_pct_of_bound"] = _percent(key, r[key], limit)


def _slopes(rows) -> dict:
    """Least-squares slope of training peak memory against genes, per backend (MB/gene)."""
    out = {}
    for backend in {r["backend"] for r in rows}:
        pts = [
            (r["genes"], r["train_mem_mb"])
            for r in rows
            if r["backend"] == backend and "train_mem_mb" in r
        ]
        if len(pts) >= 2:
            mg = statistics.fmean(g for g, _ in pts)
            mm = statistics.fmean(m for _, m in pts)
            den = sum((g - mg) ** 2 for g, _ in pts)
            out[backend] = sum((g - mg) * (m - mm) for g, m in pts) / den if den else None
    return out


def format_tables(report) -> str:
    lines = [
        "| genes | backend | train step (s) | train peak MB | inference samples/s | "
        "infer peak MB | IG s/sample | speed-up vs reference | % of bound "
        "(train / infer / IG) | paired % of bound (train / infer / IG) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["speed"]:
        if "error" in r:
            lines.append(f"| {r['genes']} | {r['backend']} | {r['error']} | | | | | | | |")
            continue

        def f(key, fmt, r=r):
            if key in r:
                return format(r[key], fmt)
            mode = {"train_s": "train", "infer_sps": "infer", "ig_s": "ig"}.get(key)
            return r.get(f"{mode}_error", "") if mode else ""

        lines.append(
            f"| {r['genes']} | {r['backend']} | {f('train_s', '.3f')} | "
            f"{f('train_mem_mb', '.0f')} | {f('infer_sps', '.1f')} | {f('infer_mem_mb', '.0f')} "
            f"| {f('ig_s', '.3f')} | {f('train_speedup_vs_reference', '.1f')} | "
            + " / ".join(
                format(r[k], ".0f") if k in r else "-"
                for k in ("train_s_pct_of_bound", "infer_sps_pct_of_bound", "ig_s_pct_of_bound")
            )
            + " | "
            + " / ".join(
                format(r[k], ".0f") if k in r else "-"
                for k in (
                    "train_paired_pct_of_bound",
                    "infer_paired_pct_of_bound",
                    "ig_paired_pct_of_bound",
                )
            )
            + " |"
        )
    lines += [
        "",
        "Training-memory slope (MB per gene): "
        + json.dumps({k: round(v, 4) for k, v in report["memory_slope_mb_per_gene"].items() if v}),
    ]
    lines += [
        "",
        "| genes | backend | log-prob max err (f32 vs f64) | reference's own | "
        "input-grad max err | param-grad max err | worst RMS ratio to reference (tensor) "
        "| f64 max diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["accuracy"]:
        f64 = r.get("float64_max_diff")
        lines.append(
            f"| {r['genes']} | {r['backend']} | {r['logprob_err']:.2e} | "
            f"{r['reference_logprob_err']:.2e} | {r['input_grad_err']:.2e} | "
            f"{r['max_param_grad_err']:.2e} | {r['worst_rms_ratio_to_reference']:.2f} "
            f"({r['worst_tensor']}) | {'' if f64 is None else format(f64, '.1e')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
