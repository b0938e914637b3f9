"""Peak memory of ``tgem.annotate`` on backed ``.h5ad`` files of growing size.

Writes sparse CSR ``.h5ad`` files (in a temporary folder, block by block with
``bench_h5ad_memory.write_csr_h5ad``) whose cells are drawn with replacement from the
bundled PBMC cells (700 cells x 765 genes, log1p normalised counts; PBMC's gene names, the
source cell's type in ``obs["cell_type"]``), by default with 10,000 and 100,000 cells. A
small model (``TGEMClassifier(n_layers=1, n_heads=1)``, ``--epochs`` epochs on all PBMC
cells, ``n_threads=1``) is fitted once and saved (or loaded with ``--model``). For each file
a fresh process imports tgem, loads the model, opens the file with
``anndata.read_h5ad(path, backed="r")``, warms up with ``tgem.annotate`` on 64 in-memory
cells, then resets the kernel's peak-RSS counter (``/proc/self/clear_refs``; where that is
refused, the peak since the process started is used and the baseline still subtracted) and
runs ``tgem.annotate(adata, model)`` once, measuring

* ``peak_rss_over_baseline``: peak resident memory (``VmHWM``) minus the resident memory
  just before the call;
* ``outputs_bytes``: what the annotation itself must hold, O(cells x classes): the
  probabilities (``obsm``, float64), the confidence (float64) and the label codes;
* ``beyond_outputs = peak_rss_over_baseline - outputs_bytes``, which should stay flat
  from the small file to the large one (streamed in ``batch_size`` cells);
* the wall time of the call and, in a second fresh process, the peak of Python-level
  allocations traced by ``tracemalloc`` (NumPy's arrays included, torch's not).

The per-cell slope of each measure between the smallest and the largest file is printed
beside the outputs' bytes per cell. Timings on a loaded machine are upper bounds.

    python benchmarks/bench_annotate_memory.py                 # 10,000 and 100,000 cells
    python benchmarks/bench_annotate_memory.py --quick         # 2,000 and 5,000 cells (CI)

Outputs: ``annotate_memory.json`` and ``annotate_memory.md`` in ``--results-dir``
(``benchmarks/results``; a temporary folder with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_accuracy import machine  # noqa: E402
from bench_annotate import save_outputs  # noqa: E402
from bench_h5ad_memory import _reset_peak, _status_kib, write_csr_h5ad  # noqa: E402

RESULTS_DIR = HERE / "results"
MB = 1e6


def write_pbmc_h5ad(path: Path, n_cells: int, seed: int) -> dict:
    """A backed-readable CSR .h5ad of ``n_cells`` PBMC cells drawn with replacement."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from tgem.datasets import load_pbmc68k

    X, y = load_pbmc68k(return_X_y=True, as_frame=True)
    source = sp.csr_matrix(X.to_numpy(dtype=np.float32))
    pick = np.random.default_rng(seed).integers(0, source.shape[0], size=n_cells)
    indptr = np.concatenate([[0], np.cumsum(np.diff(source.indptr)[pick])]).astype(np.int64)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(np.asarray(y)[pick])},
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )

    def rows(start, stop):
        block = source[pick[start:stop]]
        return block.data.astype(np.float32), block.indices.astype(np.int32)

    write_csr_h5ad(path, indptr, list(X.columns), obs, rows)
    return {"n_cells": n_cells, "nnz": int(indptr[-1]), "file_bytes": path.stat().st_size}


def fit_model(path: Path, epochs: int, seed: int) -> dict:
    import tgem
    from tgem.datasets import load_pbmc68k

    X, y = load_pbmc68k(return_X_y=True, as_frame=True)
    clf = tgem.TGEMClassifier(
        n_layers=1, n_heads=1, max_epochs=epochs, random_state=seed, n_threads=1
    )
    t0 = time.perf_counter()
    clf.fit(X, y)
    clf.save(path)
    return {"epochs": epochs, "fit_seconds": time.perf_counter() - t0, "path": str(path)}


def child(args) -> None:
    """In a fresh process: import, load, open backed, warm up, then measure one annotate."""
    import tracemalloc

    import anndata
    import numpy as np
    import torch

    import tgem

    torch.set_num_threads(1)
    model = tgem.load(args.model)
    adata = anndata.read_h5ad(args.path, backed="r")
    warm = anndata.AnnData(
        np.asarray(adata.X[:64].toarray(), dtype=np.float32), var=adata.var.copy()
    )
    tgem.annotate(warm, model, batch_size=args.batch_size)
    del warm
    out = {"n_cells": adata.n_obs, "n_classes": len(model.classes_), "mode": args.child}
    if args.child == "tracemalloc":
        tracemalloc.start()
    base_rss = _status_kib("VmRSS") * 1024
    out["peak_reset"] = _reset_peak()
    t0 = time.perf_counter()
    tgem.annotate(adata, model, batch_size=args.batch_size)
    out["seconds"] = time.perf_counter() - t0
    if args.child == "tracemalloc":
        out["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    out["baseline_rss_bytes"] = base_rss
    out["peak_rss_bytes"] = _status_kib("VmHWM") * 1024
    out["peak_rss_over_baseline_bytes"] = out["peak_rss_bytes"] - base_rss
    proba = adata.obsm["tgem_probabilities"]
    out["outputs_bytes"] = int(
        proba.nbytes
        + adata.obs["tgem_confidence"].to_numpy().nbytes
        + adata.obs["tgem_label"].cat.codes.to_numpy().nbytes
    )
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    out["agreement_with_source_label"] = float(
        np.mean(adata.obs["tgem_label"].astype(str).to_numpy() == truth)
    )
    out["unassigned"] = float(np.mean(adata.obs["tgem_label"] == "unassigned"))
    print(json.dumps(out))


def run_child(mode: str, path: Path, model: Path, batch_size: int) -> dict:
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", mode, "--path", str(path), "--model", str(model)]
    cmd += ["--batch-size", str(batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {mode} process for {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def table(runs: list[dict]) -> list[str]:
    lines = [
        "| cells | file MB | seconds | RSS before MB | peak RSS over before MB | outputs MB "
        "| beyond outputs MB | tracemalloc peak MB | agreement with source label |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['n_cells']:,} | {r['file_bytes'] / MB:,.1f} | {r['seconds']:.1f} | "
            f"{r['baseline_rss_bytes'] / MB:,.0f} | "
            f"{r['peak_rss_over_baseline_bytes'] / MB:,.1f} | {r['outputs_bytes'] / MB:,.1f} | "
            f"{r['beyond_outputs_bytes'] / MB:,.1f} | {r['tracemalloc_peak_bytes'] / MB:,.1f} | "
            f"{r['agreement_with_source_label']:.3f} |"
        )
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        d = b["n_cells"] - a["n_cells"]
        lines += [
            "",
            f"Per cell from {a['n_cells']:,} to {b['n_cells']:,} cells: peak RSS over before "
            f"{(b['peak_rss_over_baseline_bytes'] - a['peak_rss_over_baseline_bytes']) / d:,.0f}"
            f" B, beyond outputs {(b['beyond_outputs_bytes'] - a['beyond_outputs_bytes']) / d:,.0f}"
            f" B, tracemalloc peak "
            f"{(b['tracemalloc_peak_bytes'] - a['tracemalloc_peak_bytes']) / d:,.0f} B; the "
            f"outputs take {b['outputs_bytes'] / b['n_cells']:,.0f} B per cell "
            f"({b['n_classes']} classes).",
        ]
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--epochs", type=int, default=10, help="epochs of the small model")
    p.add_argument("--model", type=Path, default=None, help="a saved model to use instead")
    p.add_argument("--batch-size", type=int, default=1024, help="annotate's batch_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--tag", default="annotate_memory", help="file stem of the outputs")
    p.add_argument("--quick", action="store_true", help="2,000 and 5,000 cells, 2 epochs")
    p.add_argument("--child", choices=["rss", "tracemalloc"], help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.quick:
        args.cells, args.epochs = [2_000, 5_000], 2
        args.results_dir = args.results_dir or Path(tempfile.mkdtemp(prefix="bench_annmem_"))
    results_dir = args.results_dir or RESULTS_DIR

    with tempfile.TemporaryDirectory(prefix="tgem_annotate_memory_") as tmp:
        tmp = Path(tmp)
        if args.model is None:
            model_info = fit_model(tmp / "model.tgem", args.epochs, args.seed)
            model = tmp / "model.tgem"
        else:
            model_info, model = {"path": str(args.model)}, args.model
        runs = []
        for n in sorted(args.cells):
            path = tmp / f"pbmc_{n}.h5ad"
            meta = write_pbmc_h5ad(path, n, args.seed)
            stamp = path.stat().st_mtime_ns
            rss = run_child("rss", path, model, args.batch_size)
            traced = run_child("tracemalloc", path, model, args.batch_size)
            meta["file_untouched"] = path.stat().st_mtime_ns == stamp
            run = {**meta, **rss, "tracemalloc_peak_bytes": traced["tracemalloc_peak_bytes"]}
            run["tracemalloc_seconds"] = traced["seconds"]
            run["beyond_outputs_bytes"] = run["peak_rss_over_baseline_bytes"] - run["outputs_bytes"]
            runs.append(run)
            path.unlink()
            print(f"  {n:,} cells: {run['seconds']:.1f} s", flush=True)
    lines = table(runs)
    print("\n".join(lines))
    info = machine()
    out = {
        "settings": {
            "cells": sorted(args.cells),
            "batch_size": args.batch_size,
            "seed": args.seed,
            "quick": args.quick,
            "model": "TGEMClassifier(n_layers=1, n_heads=1, n_threads=1) on all 700 PBMC cells",
        },
        "model": model_info,
        "machine": info,
        "runs": runs,
    }
    save_outputs(
        results_dir / args.tag,
        out,
        "Peak memory of `tgem.annotate` on backed .h5ad files (`bench_annotate_memory.py`)",
        "bench_annotate_memory.py",
        argv,
        "Cells drawn with replacement from the bundled PBMC cells (765 genes, sparse CSR), "
        f"opened with `backed='r'`; `batch_size={args.batch_size}`; each file in a fresh "
        "process.",
        lines,
    )


if __name__ == "__main__":
    main()
