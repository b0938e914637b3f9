"""Measure this machine's fused multiply-add throughput: the compute bound of the exact attention.

The probe runs independent chains of vector FMAs in registers on every thread, with the same
run-time dispatch (AVX-512 / AVX2+FMA / scalar) as tgem's native kernel, and reports the best of
several repeats (other processes on the machine can only make a run slower). It is C of its
own, ``fma_probe.c`` beside this script, compiled on first use with ``$CC`` (default ``cc``)
into the temporary directory; it is not part of tgem.

From it, :func:`measure_bound` derives the lowest possible time of the T-GEM workloads, by
counting the FMA-pipe operations per gene pair and head of the native kernel:

* inference forward: 8 (score, degree-6 polynomial, one accumulation; the sum of exponentials
  and the max/round/scale steps go to other pipes),
* training forward: 10 (two more accumulations for the query gradient),
* backward: 10 (score, polynomial, three column accumulations).

These are the counts of the design note (``shared/design/attention.md``), which defines the bound.
The kernel's own counts: forward 9 (score as one fused multiply-subtract, fraction, degree-5
polynomial, scaling, one accumulation; the sum of exponentials on an add pipe), which serves
both inference and training (the query gradient's sums are taken in the backward pass), and
backward 12 (score, fraction, polynomial, scaling, the element-wise centred gradient term and
three accumulations; its subtraction on an add pipe): 21 per pair for a training step against
the bound's 20.

Run ``python benchmarks/fma_probe.py --threads 2`` to print the table (``--json PATH`` saves it).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FMA_OPS = {"inference": 8, "train_forward": 10, "backward": 10}


#: The probe's instruction-set paths, by the code the C file uses (as tgem's native kernel).
ISAS = ("scalar", "avx2", "avx512")
SOURCE = Path(__file__).with_name("fma_probe.c")
CFLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]
_LIB = None


def _library() -> ctypes.CDLL:
    """The probe library: ``fma_probe.c`` compiled once (``$CC``, default ``cc``) and cached.

    The compiled file sits in the temporary directory under a name that holds a hash of the
    source, the compiler and the flags, so an edited source is rebuilt.
    """
    global _LIB
    if _LIB is not None:
        return _LIB
    cc = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *CFLAGS]).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"tgem_fma_probe_{key}.so"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.so")
        done = subprocess.run(
            [cc, *CFLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"could not compile {SOURCE} with {cc!r} (set CC to a C compiler):\n"
                f"{done.stderr[-2000:]}"
            )
        os.replace(tmp, path)
    lib = ctypes.CDLL(str(path))
    cint = ctypes.c_int
    for name in ("fma_isa_supported", "fma_isa_lanes", "fma_probe_chains"):
        getattr(lib, name).argtypes = [cint]
        getattr(lib, name).restype = cint
    lib.fma_probe.argtypes = [cint, cint, ctypes.c_int64, ctypes.c_float]
    lib.fma_probe.restype = ctypes.c_float
    _LIB = lib
    return lib


def supported_isas() -> list[str]:
    """Instruction-set paths this processor can run, from the slowest to the fastest."""
    lib = _library()
    return [name for code, name in enumerate(ISAS) if lib.fma_isa_supported(code)]


def probe(
    isa: str | None = None,
    threads: int | None = None,
    seconds: float = 0.25,
    repeats: int = 5,
    clock: str = "wall",
) -> dict:
    """Best measured FMA throughput of one instruction-set path.

    Parameters
    ----------
    isa : {"scalar", "avx2", "avx512"}, optional
        Path to probe; the best supported one by default.
    threads : int, optional
        Threads to run; ``torch.get_num_threads()`` by default.
    seconds : float
        Approximate duration of one repeat.
    repeats : int
        Repeats; the fastest counts.
    clock : {"wall", "thread"}
        ``"wall"`` times ``threads`` threads together; ``"thread"`` times one thread by its
        own CPU time and multiplies by ``threads`` (for machines shared with other work,
        where wall-clock figures measure the load rather than the processor).

    Returns
    -------
    dict
        ``isa``, ``threads``, ``lanes``, ``fma_lane_ops_per_s`` (FMAs x vector lanes per second),
        ``gflops`` (2 floating-point operations per FMA lane) and ``all_runs_s``.
    """
    lib = _library()
    isa = isa or supported_isas()[-1]
    code = ISAS.index(isa)
    threads = threads or torch.get_num_threads()
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock={clock!r}; choose 'wall' or 'thread'.")
    run_threads = threads if clock == "wall" else 1
    timer = time.perf_counter if clock == "wall" else time.thread_time
    lanes, chains = lib.fma_isa_lanes(code), lib.fma_probe_chains(code)
    iters = 1 << 16
    while True:  # calibrate to about `seconds` per repeat
        t0 = timer()
        lib.fma_probe(code, run_threads, iters, 1.0)
        dt = timer() - t0
        if dt > seconds / 4 or iters > 1 << 34:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / max(dt, 1e-9)))
    runs = []
    for _ in range(repeats):
        t0 = timer()
        check = lib.fma_probe(code, run_threads, iters, 1.0)
        runs.append(timer() - t0)
        if check != check:
            raise RuntimeError(f"FMA probe failed for isa={isa}, threads={threads}.")
    best = min(runs)
    ops = iters * chains * lanes * threads
    return {
        "isa": isa,
        "threads": threads,
        "clock": clock,
        "lanes": lanes,
        "fma_lane_ops_per_s": ops / best,
        "gflops": 2 * ops / best / 1e9,
        "all_runs_s": runs,
    }


class QuickProbe:
    """A short FMA-throughput probe, calibrated once, to pair with other timings.

    On a machine shared with other tenants the FMA rate moves from second to second; timing a
    workload between two quick probes and dividing by their mean rate compares the workload
    with what the processor delivered at that moment, which a single probe at the start of a
    run does not.

    Parameters
    ----------
    seconds : float
        Approximate duration of one probe.
    isa, threads
        As :func:`probe`.

    Examples
    --------
    >>> quick = QuickProbe(seconds=0.01, threads=1)  # doctest: +SKIP
    >>> quick() > 0  # doctest: +SKIP
    True
    """

    def __init__(self, seconds: float = 0.04, isa: str | None = None, threads: int | None = None):
        self._lib = _library()
        self._code = ISAS.index(isa or supported_isas()[-1])
        self._threads = threads or torch.get_num_threads()
        lanes = self._lib.fma_isa_lanes(self._code)
        chains = self._lib.fma_probe_chains(self._code)
        iters = 1 << 12
        while True:
            dt = self._run(iters)
            if dt > seconds / 4 or iters > 1 << 34:
                break
            iters *= 4
        self._iters = max(1, int(iters * seconds / max(dt, 1e-9)))
        self._ops = self._iters * chains * lanes * self._threads

    def _run(self, iters: int) -> float:
        t0 = time.perf_counter()
        check = self._lib.fma_probe(self._code, self._threads, iters, 1.0)
        dt = time.perf_counter() - t0
        if check != check:
            raise RuntimeError("FMA probe failed.")
        return dt

    def __call__(self) -> float:
        """One probe's lane-FMA operations per second."""
        return self._ops / self._run(self._iters)


def measure_bound(
    genes: int = 1708,
    heads: int = 5,
    layers: int = 3,
    train_batch: int = 16,
    isa: str | None = None,
    threads: int | None = None,
    clock: str = "wall",
) -> dict:
    """The machine's FMA throughput and the T-GEM time bounds it implies.

    Returns
    -------
    dict
        The :func:`probe` result plus ``train_step_ms`` (forward + backward of a training step
        of ``train_batch`` samples), ``inference_samples_per_s``, ``ig_sample_s`` (Integrated
        Gradients, 50 steps: 50 training forwards and backwards and 2 inference forwards) and
        ``fma_ops_per_pair`` (the counts used).

    Examples
    --------
    >>> bound = measure_bound(genes=17, threads=1)  # doctest: +SKIP
    >>> bound["train_step_ms"] > 0  # doctest: +SKIP
    True
    """
    res = probe(isa=isa, threads=threads, clock=clock)
    limits = workload_bounds(res["fma_lane_ops_per_s"], genes, heads, layers, train_batch)
    res.update(
        {
            "genes": genes,
            "heads": heads,
            "layers": layers,
            "train_batch": train_batch,
            "fma_ops_per_pair": dict(FMA_OPS),
            "train_step_ms": 1e3 * limits["train_s"],
            "inference_samples_per_s": limits["infer_sps"],
            "ig_sample_s": limits["ig_s"],
        }
    )
    return res


def workload_bounds(
    rate: float, genes: int, heads: int = 5, layers: int = 3, train_batch: int = 16
) -> dict:
    """Lowest times at ``rate`` lane-FMA/s: a training step of ``train_batch`` samples
    (``train_s``), inference samples per second (``infer_sps``) and one 50-step Integrated
    Gradients sample (``ig_s``: 50 training forwards and backwards and 2 inference forwards)."""
    pairs = heads * genes * genes * layers  # per sample
    train = pairs * (FMA_OPS["train_forward"] + FMA_OPS["backward"]) / rate
    infer = pairs * FMA_OPS["inference"] / rate
    return {
        "train_s": train * train_batch,
        "infer_sps": 1.0 / infer,
        "ig_s": 50 * train + 2 * infer,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--genes", type=int, default=1708)
    parser.add_argument("--isa", choices=("scalar", "avx2", "avx512"), default=None)
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="'thread': one thread's CPU time x threads (on a shared machine)",
    )
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    rows = []
    for isa in [args.isa] if args.isa else supported_isas():
        rows.append(
            measure_bound(genes=args.genes, isa=isa, threads=args.threads, clock=args.clock)
        )
    print(
        f"{'isa':8} {'threads':>7} {'G lane-FMA/s':>13} {'GFLOP/s':>8} "
        f"{'train ms':>9} {'infer/s':>8} {'IG s':>6}"
    )
    for r in rows:
        print(
            f"{r['isa']:8} {r['threads']:7d} {r['fma_lane_ops_per_s'] / 1e9:13.1f} "
            f"{r['gflops']:8.1f} {r['train_step_ms']:9.1f} "
            f"{r['inference_samples_per_s']:8.1f} {r['ig_sample_s']:6.3f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return {"rows": rows}


if __name__ == "__main__":
    main()
