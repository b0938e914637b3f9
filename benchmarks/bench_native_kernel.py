"""Where a training step's time goes with the native kernel, against the machine's bound.

Two measurements at one width (1708 genes by default), 2 threads:

* the kernel alone: ``native_forward`` and ``native_backward`` on (batch x heads, genes)
  float32 arrays shaped like the model's (queries, keys and values of inputs in [0, 4) and
  Xavier-normal weights), best of ``--repeats`` calls, in milliseconds and in probe
  operations per gene pair and head (time x the probe's lane-FMA rate / pairs: the bound
  counts 10 for the training forward and 10 for the backward, see ``fma_probe.py``);
* a full training step of ``TGEMNet`` (3 layers, 5 heads, dropout 0.3, the training loop's
  fused Adam; as ``bench_attention.py`` times it), with the time spent inside the native layer
  calls measured separately (the kernels plus the q/k/v products, the head mixing and the
  weight gradients, all done in C by ``tgem_layer_forward`` / ``tgem_layer_backward``): the
  rest is PyTorch's work around the layers (dropout, LayerNorm, residuals, the linear head,
  the loss, autograd's bookkeeping and Adam).

The FMA probe runs first and again last; the better of the two rates sets the bound. Between
the timed training steps a short probe (40 ms) runs too, and each step is also set against the
bound of the mean rate of the probes just before and after it: on a machine shared with other
tenants, whose throughput moves from second to second (this project's 2-core machine: the
probes between the steps of one run ranged from 56 to 111 G lane-FMA/s), that paired ratio
compares the step with what the processor delivered at that moment; the median step against
the best probe mixes the slowest moments of one with the fastest of the other. Prints a table
and writes JSON (``--out``); it never asserts a time. Run it on an otherwise idle machine:
other processes slow the kernel and the probe differently.

Example (``--library`` measures another build of the kernel, e.g. an older version compiled
with ``gcc -O3 -std=gnu11 -ffp-contract=off -fPIC -shared -pthread old.c -o old.so``)::

    PYTHONPATH=. python benchmarks/bench_native_kernel.py --genes 1708 \\
        --out /tmp/native_kernel_1708.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fma_probe  # noqa: E402


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def kernel_alone(nat, genes: int, batch: int, heads: int, repeats: int) -> dict:
    """Best forward and backward times of the kernel on model-shaped inputs (ms)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, genes, generator=gen) * 4
    std = (2.0 / (genes + heads)) ** 0.5
    q, k, v = (
        (x * (torch.randn(heads, genes, generator=gen) * std)).reshape(-1, genes).contiguous()
        for _ in range(3)
    )
    grad = torch.randn(batch * heads, genes, generator=gen)
    out, m2, inv_z, e_diag = nat.native_forward(q, k, v)
    fwd = _best(lambda: nat.native_forward(q, k, v), repeats)
    bwd = _best(lambda: nat.native_backward(q, k, v, m2, inv_z, e_diag, out, grad), repeats)
    return {
        "forward_ms": 1e3 * fwd,
        "backward_ms": 1e3 * bwd,
        "pairs": batch * heads * genes * genes,
    }


def _benchmark_step(genes: int, batch: int, heads: int, layers: int, fused_adam: bool = True):
    """The benchmark's model (34 classes, dropout 0.3, native backend, seed 0), its input and
    a training-step function (forward, NLL loss, backward, Adam at 1e-4: the training loop's
    fused Adam, or PyTorch's default one)."""
    from tgem._model import TGEMNet
    from tgem._training import make_optimizer

    gen = torch.Generator().manual_seed(0)
    net = TGEMNet(
        genes,
        34,
        n_layers=layers,
        n_heads=heads,
        dropout=0.3,
        attention_backend="native",
        generator=gen,
    )
    x = torch.rand(batch, genes, generator=gen) * 4
    y = torch.randint(0, 34, (batch,), generator=gen)
    opt = (
        make_optimizer(net.parameters(), 1e-4)
        if fused_adam
        else torch.optim.Adam(net.parameters(), lr=1e-4)
    )

    def step():
        net.train()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.nll_loss(net(x), y).backward()
        opt.step()

    return net, x, step


def training_step(nat, genes: int, batch: int, heads: int, layers: int, repeats: int) -> dict:
    """Median training step and the time inside the native layer calls (ms per step)."""
    spent = {"forward": 0.0, "backward": 0.0}
    forward, backward = nat.native_layer_forward, nat.native_layer_backward

    def timed_forward(*args):
        t0 = time.perf_counter()
        res = forward(*args)
        spent["forward"] += time.perf_counter() - t0
        return res

    def timed_backward(*args):
        t0 = time.perf_counter()
        res = backward(*args)
        spent["backward"] += time.perf_counter() - t0
        return res

    nat.native_layer_forward, nat.native_layer_backward = timed_forward, timed_backward
    try:
        net, x, step = _benchmark_step(genes, batch, heads, layers)
        step()
        alone = layers_alone(nat, net, x, repeats)
        quick = fma_probe.QuickProbe(seconds=0.04)
        rows = []
        rate_before = quick()
        for _ in range(repeats):
            spent["forward"] = spent["backward"] = 0.0
            t0 = time.perf_counter()
            step()
            total = time.perf_counter() - t0
            rate_after = quick()
            # the bound at that moment: the mean rate of the probes just before and after
            bound_ms = (
                1e3
                * fma_probe.workload_bounds(
                    (rate_before + rate_after) / 2, genes, heads, layers, batch
                )["train_s"]
            )
            rows.append(
                {
                    "step_ms": 1e3 * total,
                    "kernel_forward_ms": 1e3 * spent["forward"],
                    "kernel_backward_ms": 1e3 * spent["backward"],
                    "paired_bound_ms": bound_ms,
                    "probe_lane_fma_per_s": rate_after,
                }
            )
            rate_before = rate_after
    finally:
        nat.native_layer_forward, nat.native_layer_backward = forward, backward
    pct = sorted(100 * r["paired_bound_ms"] / r["step_ms"] for r in rows)
    rates = sorted(r["probe_lane_fma_per_s"] for r in rows)
    rows.sort(key=lambda r: r["step_ms"])
    med = dict(rows[len(rows) // 2])
    med["other_ms"] = med["step_ms"] - med["kernel_forward_ms"] - med["kernel_backward_ms"]
    med["best_step_ms"] = rows[0]["step_ms"]
    med["layers_alone_ms"] = alone
    med["paired_pct_of_bound_median"] = pct[len(pct) // 2]
    med["paired_pct_of_bound_all"] = pct
    med["probe_between_steps"] = {
        "min": rates[0],
        "median": rates[len(rates) // 2],
        "max": rates[-1],
    }
    return med


def layers_alone(nat, net, x, repeats: int) -> float:
    """Best time of every layer's native forward and backward call alone, summed (ms).

    The calls a training step makes, on the step's own layer inputs, outside the step: the
    kernels plus the C work around them (q/k/v products, head mixing, weight gradients) and
    the buffers' allocation.
    """
    with torch.no_grad():
        _, states = net(x, return_layers=True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    total = 0.0
    for layer, h in zip(net.layers, states):
        w = [t.detach() for t in (layer.WQ, layer.WK, layer.WV, layer.W_0)]
        h = h.contiguous()
        saved = nat.native_layer_forward(h, *w)[1]
        total += _best(lambda h=h, w=w: nat.native_layer_forward(h, *w), repeats)
        total += _best(
            lambda h=h, w=w, saved=saved: nat.native_layer_backward(h, *w, saved, grad), repeats
        )
    return 1e3 * total


def compare_composed(genes: int, batch: int, heads: int, layers: int, repeats: int) -> dict:
    """Training steps of the model as tgem runs it (one native call per layer, fused Adam)
    against the composed path it replaced (the attention kernel wrapped in PyTorch's q/k/v
    products and head mixing, PyTorch's default Adam), alternating step by step so that both
    see the same load; returns medians, bests and the median paired difference (ms)."""
    import statistics
    from dataclasses import replace

    import tgem._kernels._registry as att

    fused = att._BACKENDS["native"]
    composed = replace(fused, layer_fn=None)

    def make(as_tgem: bool):
        _, _, train_step = _benchmark_step(genes, batch, heads, layers, fused_adam=as_tgem)

        def step():
            att._BACKENDS["native"] = fused if as_tgem else composed
            train_step()

        return step

    steps = {"tgem": make(True), "composed": make(False)}
    times: dict = {"tgem": [], "composed": []}
    try:
        for name in ("tgem", "composed"):
            steps[name]()
        for i in range(repeats):
            order = ("tgem", "composed") if i % 2 == 0 else ("composed", "tgem")
            for name in order:
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(1e3 * (time.perf_counter() - t0))
    finally:
        att._BACKENDS["native"] = fused
    diffs = [c - t for c, t in zip(times["composed"], times["tgem"])]
    return {
        name: {"median_ms": statistics.median(ts), "best_ms": min(ts)} for name, ts in times.items()
    } | {"paired_saving_median_ms": statistics.median(diffs)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--genes", type=int, default=1708)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=5)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument(
        "--library",
        type=Path,
        help="measure this build of the kernel library instead of tgem's own (e.g. "
        "one compiled from an older tgem_kernels.c, to compare versions)",
    )
    p.add_argument(
        "--compare-composed",
        type=int,
        default=0,
        metavar="N",
        help="also time N alternating training steps of the composed path (the "
        "attention kernel inside PyTorch's q/k/v products and head mixing, "
        "PyTorch's default Adam) against tgem's",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from tgem._kernels import _native as nat

    if args.library is not None:
        lib, _, error = nat._open_library(str(args.library))
        if error is not None:
            raise SystemExit(error)
        nat._LIB = lib
    if not nat.native_available():
        raise SystemExit(f"the native kernel is not available: {nat.native_status()}")
    rate0 = fma_probe.probe(threads=args.threads)["fma_lane_ops_per_s"]
    kern = kernel_alone(nat, args.genes, args.batch, args.heads, args.repeats)
    step = training_step(nat, args.genes, args.batch, args.heads, args.layers, args.repeats)
    rate1 = fma_probe.probe(threads=args.threads)["fma_lane_ops_per_s"]
    rate = max(rate0, rate1)
    bound = fma_probe.workload_bounds(rate, args.genes, args.heads, args.layers, args.batch)
    bound_step_ms = 1e3 * bound["train_s"]
    per_pair = {k: rate * kern[f"{k}_ms"] / 1e3 / kern["pairs"] for k in ("forward", "backward")}
    bound_layer_ms = bound_step_ms / args.layers
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "isa": nat._active_isa()[0],
            "date": time.strftime("%Y-%m-%d"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "args": vars(args)
        | {
            "out": str(args.out) if args.out else None,
            "library": str(args.library) if args.library else None,
        },
        "probe_lane_fma_per_s": [rate0, rate1],
        "bound_train_step_ms": bound_step_ms,
        "kernel": kern
        | {
            "ops_per_pair": per_pair,
            "layer_ms": kern["forward_ms"] + kern["backward_ms"],
            "layer_pct_of_bound": 100 * bound_layer_ms / (kern["forward_ms"] + kern["backward_ms"]),
        },
        "train_step": step
        | {
            "pct_of_bound": 100 * bound_step_ms / step["step_ms"],
            "best_pct_of_bound": 100 * bound_step_ms / step["best_step_ms"],
        },
    }
    print(
        f"probe {rate0 / 1e9:.1f} / {rate1 / 1e9:.1f} G lane-FMA/s; bound "
        f"{bound_step_ms:.1f} ms per training step ({args.genes} genes, batch {args.batch}, "
        f"{args.layers} layers x {args.heads} heads)"
    )
    print("| part | ms | ops per pair (bound counts) | % of bound |")
    print("|---|---|---|---|")
    print(
        f"| kernel forward, one layer | {kern['forward_ms']:.1f} | "
        f"{per_pair['forward']:.1f} (10) | |"
    )
    print(
        f"| kernel backward, one layer | {kern['backward_ms']:.1f} | "
        f"{per_pair['backward']:.1f} (10) | |"
    )
    print(
        f"| kernel, one layer | {result['kernel']['layer_ms']:.1f} | | "
        f"{result['kernel']['layer_pct_of_bound']:.0f} |"
    )
    print(
        f"| training step (median of {args.repeats}) | {step['step_ms']:.1f} | | "
        f"{result['train_step']['pct_of_bound']:.0f} |"
    )
    print(
        f"| of which inside the native layer calls | "
        f"{step['kernel_forward_ms'] + step['kernel_backward_ms']:.1f} | | |"
    )
    print(f"| of which PyTorch around them | {step['other_ms']:.1f} | | |")
    print(
        f"| the step's native layer calls alone (best of {args.repeats} each) | "
        f"{step['layers_alone_ms']:.1f} | | "
        f"{100 * bound_step_ms / step['layers_alone_ms']:.0f} |"
    )
    print(
        f"| best training step | {step['best_step_ms']:.1f} | | "
        f"{result['train_step']['best_pct_of_bound']:.0f} |"
    )
    probes = step["probe_between_steps"]
    print(
        f"| training step against the probes just before and after it (median of "
        f"{args.repeats} ratios) | | | {step['paired_pct_of_bound_median']:.0f} |"
    )
    print(
        f"probes between the steps: {probes['min'] / 1e9:.1f} / {probes['median'] / 1e9:.1f} / "
        f"{probes['max'] / 1e9:.1f} G lane-FMA/s (min / median / max)"
    )
    if args.compare_composed:
        comp = compare_composed(
            args.genes, args.batch, args.heads, args.layers, args.compare_composed
        )
        result["compare_composed"] = comp
        print(f"\n{args.compare_composed} alternating training steps (ms, median / best):")
        print("| path | median | best |")
        print("|---|---|---|")
        print(
            f"| tgem (one native call per layer, fused Adam) | {comp['tgem']['median_ms']:.1f}"
            f" | {comp['tgem']['best_ms']:.1f} |"
        )
        print(
            f"| composed (kernel inside PyTorch's q/k/v products and head mix, default Adam)"
            f" | {comp['composed']['median_ms']:.1f} | {comp['composed']['best_ms']:.1f} |"
        )
        print(f"median paired saving: {comp['paired_saving_median_ms']:.1f} ms per step")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
