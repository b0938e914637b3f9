"""Does the attention backend change what T-GEM learns? (issue 3's "no accuracy change").

Fits the same model (same seed, same data, same batches and dropout masks) with each backend
and reports the largest parameter difference after ``--epochs`` epochs against the plain
reference formulation, and the share of identical test predictions. Prints a table and writes
JSON; asserts nothing.

    python benchmarks/bench_equivalence.py --epochs 1                 # parameters after 1 epoch
    python benchmarks/bench_equivalence.py --epochs 50 --backends exact native
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc68k_reduced.npz"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--backends", nargs="+", default=["reference", "exact", "native"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "equivalence.json"))
    args = p.parse_args(argv)

    from sklearn.model_selection import train_test_split

    from tgem import TGEMClassifier

    with np.load(DATA, allow_pickle=False) as d:
        X, y = d["X"], d["y_cell_type"]
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
    fits = {}
    for backend in args.backends:
        t0 = time.perf_counter()
        clf = TGEMClassifier(max_epochs=args.epochs, random_state=0, attention_backend=backend,
                             n_threads=2).fit(Xtr, ytr)
        fits[backend] = (clf, time.perf_counter() - t0)
    base_name = args.backends[0]
    base = fits[base_name][0]
    rows = []
    for name, (clf, secs) in fits.items():
        diff = max(float((a - b).abs().max()) for a, b in zip(
            clf.module_.state_dict().values(), base.module_.state_dict().values()))
        same = float(np.mean(clf.predict(Xte) == base.predict(Xte)))
        rows.append({"backend": name, "fit_s": secs, "max_param_diff_vs_" + base_name: diff,
                     "identical_test_predictions": same, "test_accuracy": clf.score(Xte, yte)})
        print(json.dumps(rows[-1]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"epochs": args.epochs, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
