"""Forward + backward time of the tree code (pure PyTorch and native C) against the dense kernels.

For each gene count and score scale: one attention call with its backward pass on
(batch 16 x 5 heads, genes) float32 tensors shaped like the model's (inputs in [0, 4),
Xavier-normal weights of std sqrt(2 / (genes + 1)), the query and key weights multiplied by
the scale: 1 = as initialised, 30 and 300 = sharpened), by

* ``tree``: :func:`tgem._kernels._tree.tree_attention` (pure PyTorch, float64 sums);
* ``tree_native``: :func:`tgem._kernels._tree_native.tree_native_attention` (the same
  algorithm, its sums in C), when the extension is built;
* ``native``: the dense native CPU kernel (:func:`tgem._kernels._native.native_attention`),
  when built;
* ``exact``: the dense pure-PyTorch exact path (:func:`tgem._kernels.exact_attention`).
* ``auto``: what ``attention_backend="auto"`` runs for that call (the rule of
  :func:`tgem._kernels._tree_native.auto_reach`: dense native or ``tree_native`` by gene count
  and the call's score reach, the reach computed in the call as the model does); the
  ``auto/best`` column is its time over the faster of ``native`` and ``tree_native``.

The backends alternate within each repeat; the median of ``--repeats`` is reported (a single
run when one call takes more than ``--single`` seconds). ``--backends`` picks a subset. A dense
backend is skipped where its
time, extrapolated as genes^2 from the previous gene count at the same scale, would exceed
``--budget`` seconds. Prints a table and writes JSON (``--out``); it never asserts a time. Run
it on an otherwise idle machine.

Example::

    PYTHONPATH=. python benchmarks/bench_tree.py --threads 2 --out benchmarks/results/tree_cpu.json
    PYTHONPATH=. python benchmarks/bench_tree.py --backends tree_native native --genes 1708 22283
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from tgem._kernels import exact_attention, resolve_backend
from tgem._kernels._tree import tree_attention, tree_parameters

try:
    from tgem._kernels import _tree_native
except Exception:  # noqa: BLE001 - the benchmark still runs the other paths
    _tree_native = None

try:
    from tgem._kernels import _native
except Exception:  # noqa: BLE001 - the benchmark still runs the pure paths
    _native = None

HERE = Path(__file__).resolve().parent
BATCH, HEADS = 16, 5


def inputs(genes: int, scale: float, seed: int = 0):
    """(q, k, v, upstream gradient) float32, (BATCH, HEADS, genes)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(BATCH, 1, genes, generator=gen) * 4.0
    std = math.sqrt(2.0 / (genes + 1))
    w = torch.randn(3, HEADS, genes, generator=gen) * std
    q, k, v = x * w[0] * scale, x * w[1] * scale, x * w[2]
    grad = torch.randn(BATCH, HEADS, genes, generator=gen)
    return q, k, v, grad


def time_call(fn, q, k, v, grad) -> float:
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    t0 = time.perf_counter()
    fn(*leaves).backward(grad)
    return time.perf_counter() - t0


TREES = ("tree", "tree_native")  # never skipped by the dense extrapolation
DENSE = ("native", "exact")
AUTO = ("auto",)  # never skipped either: it runs the tree where the dense kernel is slow


def auto_attention(q, k, v):
    """The attention ``attention_backend="auto"`` runs for this call (resolved per call)."""
    return resolve_backend("auto", q.device, q.dtype, genes=q.shape[-1]).fn(q, k, v)


def backends(names=None) -> dict:
    found = {"tree": tree_attention}
    if _tree_native is not None and _tree_native.tree_native_available():
        found["tree_native"] = _tree_native.tree_native_attention
    if _native is not None and _native.native_available():
        found["native"] = _native.native_attention
    found["exact"] = exact_attention
    found["auto"] = auto_attention
    if names:
        missing = sorted(set(names) - set(found))
        if missing:
            raise SystemExit(f"backends not available here: {missing}; available: {list(found)}")
        found = {name: fn for name, fn in found.items() if name in names}
    return found


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    fns = backends(args.backends)
    for fn in fns.values():  # first calls pay one-off costs (lazy initialisation)
        time_call(fn, *inputs(64, 30.0))
    rows, last = [], {}
    for genes in args.genes:
        for scale in args.scales:
            q, k, v, grad = inputs(genes, scale)
            reach = float((q.abs().amax(-1) * (k.amax(-1) - k.amin(-1))).max())
            active = {}
            for name, fn in fns.items():
                prev = last.get((name, scale))
                if name not in TREES + AUTO and prev is not None:
                    guess = prev[1] * (genes / prev[0]) ** 2
                    if guess > args.budget:
                        print(f"  skip {name} at {genes} genes x{scale}: ~{guess:.0f} s expected")
                        continue
                active[name] = fn
            times = {name: [] for name in active}
            for rep in range(args.repeats):
                for name, fn in active.items():
                    if rep and times[name] and times[name][0] > args.single:
                        continue
                    times[name].append(time_call(fn, q, k, v, grad))
            row = {"genes": genes, "scale": scale, "max_abs_q_times_range_k": reach}
            for name, ts in times.items():
                row[f"{name}_s"] = statistics.median(ts)
                row[f"{name}_runs"] = len(ts)
                last[(name, scale)] = (genes, statistics.median(ts))
            for tree_name in TREES:
                for name in DENSE:
                    if f"{name}_s" in row and f"{tree_name}_s" in row:
                        row[f"{name}_over_{tree_name}"] = row[f"{name}_s"] / row[f"{tree_name}_s"]
            fastest = [row[f"{n}_s"] for n in ("native", "tree_native") if f"{n}_s" in row]
            if "auto_s" in row and fastest:
                row["auto_over_best"] = row["auto_s"] / min(fastest)
            if _tree_native is not None and _tree_native.tree_native_available():
                chosen = reach <= _tree_native.auto_reach(genes)
                row["auto_runs"] = "tree_native" if chosen else "native"
            rows.append(row)
            print(_format(row), flush=True)
    return {
        "benchmark": "bench_tree.py",
        "what": "forward + backward of one attention call, (16 x 5, genes) float32, seconds",
        "threads": args.threads,
        "repeats": args.repeats,
        "tree_parameters_float32": {
            str(g): tree_parameters(torch.float32, g).__dict__ for g in args.genes
        },
        "native": _native.native_status() if _native is not None else "not importable",
        "tree_native": (
            _tree_native.tree_native_status() if _tree_native is not None else "not importable"
        ),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rows": rows,
    }


def _format(row: dict) -> str:
    def cell(name):
        return f"{row[name + '_s']:9.3f}" if name + "_s" in row else f"{'-':>9}"

    def ratio(name):
        value = row.get(name)
        return f"{value:8.2f}" if value else f"{'-':>8}"

    return (
        f"{row['genes']:>7} {row['scale']:>6g} {row['max_abs_q_times_range_k']:>10.2f} "
        f"{cell('tree')} {cell('tree_native')} {cell('native')} {cell('exact')} "
        f"{ratio('native_over_tree')} {ratio('native_over_tree_native')} {cell('auto')} "
        f"{ratio('auto_over_best')}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, nargs="+", default=[765, 1708, 5000, 22283])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 30.0, 300.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=TREES + DENSE + AUTO,
        help="a subset (default: all available)",
    )
    parser.add_argument("--budget", type=float, default=30.0, help="skip dense calls above (s)")
    parser.add_argument("--single", type=float, default=20.0, help="one run above (s)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tree_cpu.json")
    args = parser.parse_args(argv)
    print(
        f"{'genes':>7} {'scale':>6} {'max|q|rk':>10} {'tree s':>9} {'treeC s':>9} "
        f"{'native s':>9} {'exact s':>9} {'nat/tree':>8} {'nat/trC':>8} {'auto s':>9} "
        f"{'auto/bst':>8}"
    )
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
