"""Wall time of ``import tgem`` in a fresh interpreter, for one or more source trees.

Each repeat starts ``python -c "import tgem"`` once per tree, the trees alternating so that a
change in the machine's load hits all of them alike; the table gives the median and the
quartiles over the repeats, and the time of ``import torch`` alone (tgem imports it) as the
floor. Trees are folders holding a ``tgem`` package (a checkout; build its native kernel
first, ``python setup.py build_ext --inplace``, as an installed tgem has it). It prints a
table and writes JSON; it never asserts a time. Run it on an otherwise idle machine.

Example: this checkout against the commit before the architecture work of issue 23::

    git worktree add --detach /tmp/base 794dc46^
    (cd /tmp/base && python setup.py -q build_ext --inplace)
    python benchmarks/bench_import.py . /tmp/base --repeats 21
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _once(code: str, tree: Path | None) -> float:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    env.pop("PYTHONSTARTUP", None)
    cwd = tree if tree is not None else Path(tempfile.gettempdir())  # `-c` puts the cwd first
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def _commit(tree: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(tree), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()[:100]
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", type=Path, nargs="+", help="folders that hold a tgem package")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=HERE / "results" / "import_time.json")
    args = p.parse_args(argv)
    trees = [t.resolve() for t in args.trees]
    for tree in trees:
        if not (tree / "tgem" / "__init__.py").is_file():
            p.error(f"{tree} holds no tgem package (tgem/__init__.py)")
    for tree in trees:  # each tree imports its own tgem; a first run also warms the file cache
        env = {**os.environ, "PYTHONPATH": str(tree)}
        code = "import tgem; print(tgem.__file__)"
        where = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not where.startswith(str(tree)):
            p.error(f"with PYTHONPATH={tree}, tgem was imported from {where}")
    times: dict[str, list[float]] = {"import torch": []}
    times.update({str(t): [] for t in trees})
    for _ in range(args.repeats):
        times["import torch"].append(_once("import torch", None))
        for tree in trees:
            times[str(tree)].append(_once("import tgem", tree))
    rows = []
    print(f"{'what':<50} {'median s':>9} {'q1 s':>7} {'q3 s':>7}")
    for what, ts in times.items():
        q1, med, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (ts[0],) * 3
        rows.append(
            {
                "what": what,
                "commit": _commit(Path(what)) if what != "import torch" else None,
                "median_s": med,
                "q1_s": q1,
                "q3_s": q3,
                "seconds": ts,
            }
        )
        print(f"{what[-50:]:<50} {med:9.3f} {q1:7.3f} {q3:7.3f}")
    out = {
        "benchmark": "bench_import.py",
        "what": "wall time of `python -c 'import tgem'` in a fresh process, trees alternating",
        "repeats": args.repeats,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
