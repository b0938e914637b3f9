"""Training-step time of the dense backends against the sharpness of the attention.

Exponentials of scores far below a row's maximum are subnormal floats, and on x86 each
operation that produces or reads one takes a microcode assist: a model whose attention
sharpens pays for them on every step. This measures one training step (forward, backward,
Adam; batch 16, 3 layers, 5 heads, dropout 0.3, as ``bench_attention.py`` times it) of each
backend with the query and key weights as initialised and multiplied by 30 and 300
(``--scales``), and reports each scale's step against the unscaled one.

Each (code version, backend) runs in a fresh process that times the scales in turn, one step
of each per repeat (rotating which goes first), after a warm-up step of each; the medians are
reported. ``--before DIR`` also measures another copy of tgem (e.g. the code before a change,
exported with ``git archive``), in processes alternating with the current one, round by
round, so that both see the same machine. Prints a table and writes JSON (``--out``); it never
asserts a time. Pause other work on the machine while it runs.

Example::

    PYTHONPATH=. python benchmarks/bench_subnormal.py --genes 765 --before /tmp/base \\
        --out benchmarks/results/attention_subnormal.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(args) -> dict:
    """Time training steps of one backend at every scale in this process."""
    import torch

    from tgem._model import TGEMNet
    from tgem._training import make_optimizer

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, args.genes, generator=gen) * 4
    y = torch.randint(0, 34, (args.batch,), generator=gen)
    steps = {}
    for scale in args.scales:
        net = TGEMNet(
            args.genes,
            34,
            n_layers=3,
            n_heads=5,
            dropout=0.3,
            attention_backend=args.backend,
            generator=torch.Generator().manual_seed(0),
        )
        with torch.no_grad():
            for layer in net.layers:
                layer.WQ.mul_(scale)
                layer.WK.mul_(scale)
        opt = make_optimizer(net.parameters(), 1e-4)

        def step(net=net, opt=opt):
            net.train()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.nll_loss(net(x), y).backward()
            opt.step()

        steps[scale] = step
    backend = net.backend(torch.empty(0)).name
    times: dict = {scale: [] for scale in args.scales}
    for scale in args.scales:
        steps[scale]()  # warm-up (and, for the compiled path, compilation)
    order = list(args.scales)
    for rep in range(args.repeats):
        for scale in order[rep % len(order) :] + order[: rep % len(order)]:
            t0 = time.perf_counter()
            steps[scale]()
            times[scale].append(time.perf_counter() - t0)
    return {
        "backend": backend,
        "step_ms": {str(s): 1e3 * statistics.median(t) for s, t in times.items()},
        "all_ms": {str(s): [1e3 * v for v in t] for s, t in times.items()},
    }


def run_worker(args, backend: str, code: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--backend", backend, "--genes", str(args.genes)]
    cmd += ["--batch", str(args.batch), "--threads", str(args.threads)]
    cmd += ["--repeats", str(args.repeats), "--scales", *map(str, args.scales)]
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows, scales) -> str:
    head = f"{'code':<7} {'backend':<9}" + "".join(f" {'x' + str(s):>9} ms" for s in scales)
    head += "".join(f" {'x' + str(s) + '/x1':>9}" for s in scales[1:])
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = r["step_ms"]
        line = f"{r['code']:<7} {r['backend']:<9}" + "".join(
            f" {ms[str(s)]:>12.0f}" for s in scales
        )
        line += "".join(f" {ms[str(s)] / ms[str(scales[0])]:>9.2f}" for s in scales[1:])
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genes", type=int, default=765)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="processes per version and backend")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 30.0, 300.0])
    p.add_argument("--backends", nargs="+", default=["native", "compiled", "exact"])
    p.add_argument("--before", type=Path, default=None, help="another copy of tgem to measure")
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="native", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        sys.stdout.write(json.dumps(worker(args)) + "\n")
        return 0
    versions = {"after": Path(os.environ.get("PYTHONPATH", str(ROOT)).split(os.pathsep)[0])}
    if args.before is not None:
        versions = {"before": args.before.resolve(), **versions}
    runs: dict = {}
    for rnd in range(args.rounds):
        names = list(versions) if rnd % 2 == 0 else list(versions)[::-1]
        for backend in args.backends:
            for code in names:
                res = run_worker(args, backend, versions[code])
                sys.stdout.write(f"round {rnd} {code} {backend}: {json.dumps(res)}\n")
                sys.stdout.flush()
                runs.setdefault((code, backend), []).append(res)
    rows = []
    for (code, backend), results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            rows.append({"code": code, "backend": backend, "error": results[0]["error"]})
            continue
        step_ms = {
            str(s): statistics.median(v for r in ok for v in r["all_ms"][str(s)])
            for s in args.scales
        }
        ratio = {str(s): step_ms[str(s)] / step_ms[str(args.scales[0])] for s in args.scales}
        rows.append({"code": code, "backend": backend, "step_ms": step_ms, "ratio_to_first": ratio})
    table = format_table([r for r in rows if "error" not in r], args.scales)
    sys.stdout.write("\n" + table + "\n")
    for r in rows:
        if "error" in r:
            sys.stdout.write(f"{r['code']} {r['backend']}: {r['error']}\n")
    if args.out is not None:
        import torch

        report = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "threads": args.threads,
                "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"),
            },
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": rows,
            "runs": {f"{c}/{b}": v for (c, b), v in runs.items()},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        sys.stdout.write(f"wrote {args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
