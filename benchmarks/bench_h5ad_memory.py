"""Peak memory of a fit streamed from an .h5ad file larger than the memory it may use.

Writes a sparse CSR ``.h5ad`` (default ~2 GB: float32 data + int32 indices + int64 indptr)
without ever holding it in memory, then fits TGEMClassifier on it in a fresh process whose
address space is capped with ``resource.setrlimit(RLIMIT_AS)`` at its own baseline (after
importing torch and tgem) plus ``--allow-gb`` (default 1 GiB). The baseline is measured,
not assumed: torch maps a large virtual address space at import. A second fresh process
under the same cap tries to load the file in memory (``anndata.read_h5ad``) as a control.

Printed and saved (JSON): file size, baseline and peak RSS / address space, the cap, the fit
time, whether each process completed.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_h5ad_memory.py --path /tmp/big.h5ad \
        --size-gb 2 --allow-gb 1 --delete
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GiB = 1 << 30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def write_csr_h5ad(path: Path, indptr, var_names, obs, rows, block: int = 1 << 17) -> None:
    """Write a sparse CSR ``.h5ad`` block by block, never holding its matrix in memory.

    ``indptr`` (int64, ``n_cells + 1``) fixes the layout; ``rows(start, stop)`` returns the
    ``(data, indices)`` of cells ``start:stop`` (float32, int32). ``obs`` and ``var_names``
    go through anndata (an empty matrix first), then ``X`` is replaced by the blocks.
    """
    import anndata
    import h5py
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    n_cells, n_genes = len(indptr) - 1, len(var_names)
    skeleton = anndata.AnnData(
        X=sp.csr_matrix((n_cells, n_genes), dtype=np.float32),
        obs=obs,
        var=pd.DataFrame(index=list(var_names)),
    )
    skeleton.write_h5ad(path)
    del skeleton
    with h5py.File(path, "r+") as f:
        del f["X"]
        X = f.create_group("X")
        X.attrs["encoding-type"] = "csr_matrix"
        X.attrs["encoding-version"] = "0.1.0"
        X.attrs["shape"] = (n_cells, n_genes)
        total = int(indptr[-1])
        chunk = (max(1, min(total, 1 << 20)),)
        data = X.create_dataset("data", shape=(total,), dtype="float32", chunks=chunk)
        indices = X.create_dataset("indices", shape=(total,), dtype="int32", chunks=chunk)
        X.create_dataset("indptr", data=np.asarray(indptr, dtype=np.int64))
        for start in range(0, n_cells, block):
            stop = min(n_cells, start + block)
            values, cols = rows(start, stop)
            data[indptr[start] : indptr[stop]] = values
            indices[indptr[start] : indptr[stop]] = cols


def write_h5ad(path: Path, size_gb: float, n_genes: int, density: float, seed: int) -> dict:
    """A sparse CSR .h5ad of about ``size_gb`` GB of synthetic cells, written block by block."""
    import numpy as np
    import pandas as pd

    nnz_row = max(1, round(n_genes * density))
    n_cells = int(size_gb * 1e9 / (nnz_row * 8 + 8))
    rng = np.random.default_rng(seed)
    types = np.array(["T", "B", "NK", "Mono"])
    labels = rng.integers(0, len(types), size=n_cells).astype(np.int8)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical.from_codes(labels, types)},
        index=pd.RangeIndex(n_cells).astype(str),
    )
    shift = rng.normal(0, 1.0, size=(len(types), n_genes)).astype(np.float32)

    def rows(start, stop):
        m = stop - start
        cols = np.sort(np.argsort(rng.random((m, n_genes)), axis=1)[:, :nnz_row], axis=1)
        vals = np.abs(
            rng.normal(1.0, 0.5, size=(m, nnz_row)).astype(np.float32)
            + shift[labels[start:stop, None], cols]
        )
        return vals.ravel(), cols.ravel().astype(np.int32)

    indptr = np.arange(n_cells + 1, dtype=np.int64) * nnz_row
    write_csr_h5ad(path, indptr, [f"g{j}" for j in range(n_genes)], obs, rows)
    return {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "nnz_per_cell": nnz_row,
        "file_bytes": path.stat().st_size,
    }


def child(args) -> None:
    """Runs in a fresh process: import and warm up, measure the baseline, cap, fit or load."""
    import resource

    import anndata  # noqa: F401
    import h5py  # noqa: F401
    import numpy as np
    import torch

    from tgem import TGEMClassifier

    torch.set_num_threads(1)
    # warm-up on 64 in-memory cells: everything a fit imports or allocates once is baseline
    warm = np.random.default_rng(0).random((64, 8), dtype=np.float32)
    TGEMClassifier(n_layers=1, n_heads=1, max_epochs=1, n_threads=1).fit(warm, warm[:, 0] > 0.5)
    base_vm, base_rss = _status_kib("VmSize") * 1024, _status_kib("VmRSS") * 1024
    cap = base_vm + int(args.allow_gb * GiB)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out = {
        "mode": args.child,
        "baseline_vm_bytes": base_vm,
        "baseline_rss_bytes": base_rss,
        "cap_bytes": cap,
        "allow_bytes": int(args.allow_gb * GiB),
    }
    t0 = time.perf_counter()
    try:
        if args.child == "fit":
            clf = TGEMClassifier(
                n_layers=1,
                n_heads=1,
                dropout=0.0,
                max_epochs=1,
                batch_size=args.batch_size,
                learning_rate=1e-2,
                n_threads=1,
                random_state=0,
            )
            clf.fit(args.path, y="cell_type")
            out["train_loss"] = clf.history_[-1]["train_loss"]
            out["train_accuracy"] = clf.history_[-1]["train_accuracy"]
        else:
            import anndata

            adata = anndata.read_h5ad(args.path)
            out["loaded_shape"] = list(adata.shape)
        out["completed"] = True
    except MemoryError as exc:
        out["completed"] = False
        out["error"] = f"MemoryError: {exc}"
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = _status_kib("VmHWM") * 1024
    out["peak_vm_bytes"] = _status_kib("VmPeak") * 1024
    out["peak_rss_over_baseline_bytes"] = out["peak_rss_bytes"] - base_rss
    out["peak_vm_over_baseline_bytes"] = out["peak_vm_bytes"] - base_vm
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", default="/tmp/tgem_bench_big.h5ad")
    p.add_argument("--size-gb", type=float, default=2.0)
    p.add_argument("--allow-gb", type=float, default=1.0)
    p.add_argument("--n-genes", type=int, default=128)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--out", default="benchmarks/results/h5ad_memory.json")
    p.add_argument("--delete", action="store_true", help="delete the file afterwards")
    p.add_argument("--child", choices=["fit", "load"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    path = Path(args.path)
    t0 = time.perf_counter()
    meta = write_h5ad(path, args.size_gb, args.n_genes, args.density, seed=0)
    meta["write_seconds"] = time.perf_counter() - t0
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    runs = []
    try:
        for mode in ("fit", "load"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--path",
                str(path),
                "--allow-gb",
                str(args.allow_gb),
                "--batch-size",
                str(args.batch_size),
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            run = (
                json.loads(lines[-1])
                if lines
                else {
                    "mode": mode,
                    "completed": False,
                    "returncode": proc.returncode,
                    "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "",
                }
            )
            runs.append(run)
    finally:
        if args.delete:
            path.unlink(missing_ok=True)
    result = {"file": meta, "runs": runs, "python": sys.version.split()[0]}
    mb = 1e6
    print(
        f"file: {meta['file_bytes'] / mb:,.0f} MB, {meta['n_cells']:,} cells x "
        f"{meta['n_genes']} genes (CSR, {meta['nnz_per_cell']} stored values per cell)"
    )
    print(
        f"{'process':8} {'done':5} {'seconds':>8} {'cap over base MB':>17} "
        f"{'base RSS MB':>12} {'peak RSS MB':>12} {'RSS over base MB':>17} "
        f"{'VM over base MB':>16}"
    )
    for r in runs:
        if "cap_bytes" not in r:
            print(f"{r['mode']:8} {str(r['completed']):5} {r.get('error', '')}")
            continue
        print(
            f"{r['mode']:8} {str(r['completed']):5} {r['seconds']:8.1f} "
            f"{r['allow_bytes'] / mb:17,.0f} {r['baseline_rss_bytes'] / mb:12,.0f} "
            f"{r['peak_rss_bytes'] / mb:12,.0f} "
            f"{r['peak_rss_over_baseline_bytes'] / mb:17,.0f} "
            f"{r['peak_vm_over_baseline_bytes'] / mb:16,.0f}"
            + (f"  ({r['error']})" if not r["completed"] else "")
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
