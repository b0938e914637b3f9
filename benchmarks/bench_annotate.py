"""Rejection of cells of types the model never saw: AUROC and rejected shares per rule.

Two modes, on real data (``../shared/data``, loaded as in ``bench_accuracy.py``):

* ``citeseq-unknown``: CITE-seq CBMC (8,617 cells x 500 genes, log1p of counts scaled to
  10,000 per cell). The "Mouse" (607) and "Unknown" (171) cells are never trained on; the
  other (seen) cells are split stratified into 60 % training, 20 % calibration and 20 % test
  cells. Per rule: the AUROC of the confidence score for unseen against seen test cells
  (seen vs Mouse, vs Unknown, vs both), the share of Mouse and of Unknown cells marked
  unassigned, the share of seen test cells wrongly rejected, and the accuracy on seen test
  cells (all, and those kept), compared with the issue's targets (Mouse AUROC >= 0.95,
  >= 80 % of Mouse cells unassigned, <= 5 % of seen cells rejected).
* ``loto``: leave one type out, on CITE-seq for every type with >= 50 cells (Mouse and
  Unknown are never trained on and never left out as a type) and on PBMC
  (``tgem.datasets.load_pbmc68k``, 700 cells x 765 genes) for every type with >= 20 cells:
  the model trains on the other types (the same 60/20/20 split of the seen cells) and the
  left-out type's cells are the unseen ones. The same figures per left-out type, and the
  median AUROC per rule and data set (target: >= 0.85).

The model is ``TGEMClassifier`` at its defaults (``standardize=True``, learning rate 1e-3,
``calibration=None``) with ``random_state=0`` and ``n_threads=1``; ``--epochs`` overrides the
default 50 epochs and ``--citeseq-epochs`` sets CITE-seq's alone (a 50-epoch CITE-seq fit takes
several minutes single-threaded); the values used are written into the outputs.

Rules (a confidence score per cell, higher = more confident; a cell is unassigned when its
score is strictly below the rule's threshold). Every threshold is fitted on the calibration
cells, which the model did not train on, so that at most 5 % of them are rejected
(``tgem.fit_rejection_threshold`` for the library's rules, the same order statistic for the
conformal rule):

* ``max_proba`` and ``energy``: the rules of the network, scored by
  ``tgem.rejection_scores`` (the largest class probability; ``logsumexp`` of the
  logits).
* ``neighbors``: minus the mean distance to the 10 nearest training cells in 50 principal
  components of the standardised genes. It does not depend on the network, so it is computed
  here from the job's training cells with :class:`tgem._novelty.NeighborReference`, exactly as
  ``fit(calibration="temperature")`` builds ``neighbor_reference_`` (the cached fits need no
  refit).
* ``combined``: the smaller of the ``energy`` and ``neighbors`` p-values against the
  calibration cells' sorted scores (``tgem._calibration.combined_scores``, as the library
  computes it from ``calibration_scores_``).
* ``conformal_class``: the class-conditional (Mondrian) split-conformal p-value of the
  predicted class. With ``a = 1 - p(c | x)`` the conformity score and ``A_c`` the scores
  ``1 - p(c | x_i)`` of the ``n_c`` calibration cells of class ``c``, a cell predicted as
  ``c`` gets ``(1 + #{a_i in A_c : a_i >= a}) / (n_c + 1)``: the share of calibration cells
  *of its predicted type* that the model was at most as sure of. (Calibration cells get the
  same p-value with themselves left out of ``A_c``.) This is not a max-probability cut-off:
  the cut-off on ``p(c | x)`` differs per predicted type (a cell called a confidently
  recognised type must be as confident as that type's own cells), whereas the marginal
  conformal rule "unassigned when ``predict_set``'s set is empty" is exactly a
  ``max_proba`` cut-off at ``1 - q`` and so is not benchmarked separately. A type with
  few calibration cells gets coarse p-values (at least ``1 / (n_c + 1)``), so its cells
  can hardly be rejected.

Each fit's scores are cached as JSON under ``benchmarks/results/cache/annotate/`` (keyed by
data set, left-out types, epochs and seed), so an interrupted run resumes; ``--shard I/N``
runs every N-th fit (two single-threaded processes share the cache; a last run without it
writes the tables); ``--from-cache`` fits nothing and tabulates the fits cached so far.
Outputs: ``annotate_rejection.json`` and ``annotate_rejection.md`` in ``--results-dir``
(``benchmarks/results``).

    python benchmarks/bench_annotate.py --mode citeseq-unknown --citeseq-epochs 15
    python benchmarks/bench_annotate.py --mode loto --datasets pbmc
    python benchmarks/bench_annotate.py --mode loto --datasets citeseq --citeseq-epochs 15 \
        --shard 0/2 &
    python benchmarks/bench_annotate.py --mode loto --datasets citeseq --citeseq-epochs 15 \
        --shard 1/2
    python benchmarks/bench_annotate.py --citeseq-epochs 15   # both modes: the tables
    python benchmarks/bench_annotate.py --citeseq-epochs 15 --from-cache  # fit nothing
    python benchmarks/bench_annotate.py --quick             # CI smoke run, about a minute
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_accuracy import DATA_DIR, _parse_shard, load_dataset, machine  # noqa: E402

import tgem  # noqa: E402
from tgem._calibration import (  # noqa: E402
    COMBINED_RULES,
    MODEL_RULES,
    RULES,
    TARGET_REJECTION,
    combined_scores,
    rejection_threshold,
)
from tgem._novelty import NeighborReference  # noqa: E402
from tgem._rejection import rejection_scores  # noqa: E402

RESULTS_DIR = HERE / "results"
ALL_RULES = (*RULES, "conformal_class")
NEVER_TRAINED = ("Mouse", "Unknown")  # CITE-seq labels that are never trained on
MIN_CELLS = {"citeseq": 50, "pbmc": 20}  # leave-one-type-out: types with at least this many
FRACTIONS = (0.6, 0.2, 0.2)  # train / calibration / test of the seen cells
TARGETS = {"mouse_auroc": 0.95, "mouse_unassigned": 0.80, "seen_rejected": 0.05, "loto": 0.85}
DEFAULT_EPOCHS = 50
CACHE_VERSION = 1


# ------------------------------------------------------------------ data and fits
def load(name: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    if name == "pbmc":
        X, y = tgem.datasets.load_pbmc68k(return_X_y=True)
        return np.asarray(X, dtype=np.float32), np.asarray(y).astype(str)
    ds = load_dataset(name, data_dir)
    return ds.X, ds.y


def split(y: np.ndarray, excluded: tuple[str, ...], seed: int):
    """Stratified train / calibration / test rows of the seen cells, and the unseen rows."""
    seen = np.flatnonzero(~np.isin(y, excluded))
    unseen = np.flatnonzero(np.isin(y, excluded))
    train, rest = train_test_split(
        seen, train_size=FRACTIONS[0], stratify=y[seen], random_state=seed
    )
    share = FRACTIONS[1] / (FRACTIONS[1] + FRACTIONS[2])
    cal, test = train_test_split(rest, train_size=share, stratify=y[rest], random_state=seed)
    return np.sort(train), np.sort(cal), np.sort(test), unseen


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def cache_path(cache_dir: Path, job: dict) -> Path:
    left = "+".join(_slug(t) for t in job["excluded"])
    return cache_dir / f"{job['dataset']}__{left}__e{job['epochs']}__s{job['seed']}.json"


def fit_scores(job: dict, data_dir: Path) -> dict:
    """Fit on the seen training cells; scores and probabilities of the other cells."""
    X, y = load(job["dataset"], data_dir)
    excluded = tuple(job["excluded"])
    train, cal, test, unseen = split(y, excluded, job["seed"])
    clf = tgem.TGEMClassifier(max_epochs=job["epochs"], random_state=job["seed"], n_threads=1)
    t0 = time.perf_counter()
    clf.fit(X[train], y[train])
    fit_seconds = time.perf_counter() - t0
    record = {
        "cache_version": CACHE_VERSION,
        "job": job,
        "fractions": list(FRACTIONS),
        "params": {k: repr(v) for k, v in clf.get_params().items()},
        "classes": [str(c) for c in clf.classes_],
        "n_train": len(train),
        "fit_seconds": fit_seconds,
        "thresholds_api": {},
    }
    for part, rows in (("cal", cal), ("test", test), ("unseen", unseen)):
        record[part] = {
            "labels": y[rows].tolist(),
            "proba": np.round(clf.predict_proba(X[rows]), 7).tolist(),
            "scores": {r: rejection_scores(clf, X[rows], rule=r).tolist() for r in MODEL_RULES},
        }
    for rule in MODEL_RULES:  # the library's own threshold fit, on the calibration cells
        record["thresholds_api"][rule] = tgem.fit_rejection_threshold(
            clf, X[cal], y[cal], rule=rule, target_rejection=TARGET_REJECTION
        )
    return record


def get_record(job: dict, cache_dir: Path, data_dir: Path, fit: bool) -> dict | None:
    path = cache_path(cache_dir, job)
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("cache_version") == CACHE_VERSION and record["job"] == job:
            return record
    if not fit:
        return None
    t0 = time.perf_counter()
    record = fit_scores(job, data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    print(
        f"  fitted {job['dataset']} without {list(job['excluded'])}: "
        f"{time.perf_counter() - t0:.0f} s (fit {record['fit_seconds']:.0f} s)",
        flush=True,
    )
    return record


# ------------------------------------------------------------------ the conformal rule
def conformal_class_pvalues(
    proba: np.ndarray,
    cal_proba: np.ndarray,
    cal_y: np.ndarray,
    *,
    own_y: np.ndarray | None = None,
) -> np.ndarray:
    """Class-conditional split-conformal p-value of each row's predicted class.

    ``cal_y`` and ``own_y`` hold class indices. With ``own_y`` the rows *are* the
    calibration cells (in the same order): each one's own score is left out of its class's
    reference scores.
    """
    pred = np.argmax(proba, axis=1)
    score = 1.0 - proba[np.arange(len(proba)), pred]
    out = np.empty(len(proba))
    for c in np.unique(pred):
        ref = np.sort(1.0 - cal_proba[cal_y == c, c])
        rows = np.flatnonzero(pred == c)
        at_least = len(ref) - np.searchsorted(ref, score[rows], side="left")
        n = np.full(len(rows), len(ref))
        if own_y is not None:  # leave the cell's own score out of its class's reference
            own = own_y[rows] == c
            at_least = at_least - own
            n = n - own
        out[rows] = (1.0 + at_least) / (n + 1.0)
    return out


# ------------------------------------------------------------------ the neighbours rule
def neighbor_scores(job: dict, data_dir: Path) -> dict[str, np.ndarray]:
    """The ``"neighbors"`` scores of the calibration, test and unseen cells.

    The rule does not depend on the network: ``fit(calibration="temperature")`` builds
    :class:`tgem._novelty.NeighborReference` from the cells the network trains on, and so
    does this function from the job's training cells, so the cached fits need no refit.
    """
    X, y = load(job["dataset"], data_dir)
    train, cal, test, unseen = split(y, tuple(job["excluded"]), job["seed"])
    _, y_enc = np.unique(y[train], return_inverse=True)
    reference = NeighborReference.fit(X[train], y_enc, seed=job["seed"])
    parts = {"cal": cal, "test": test, "unseen": unseen}
    return {part: reference.scores(X[rows]) for part, rows in parts.items()}


# ------------------------------------------------------------------ figures
def rule_scores(record: dict, neighbors=None) -> dict[str, dict[str, np.ndarray]]:
    """Each rule's scores of the calibration, test and unseen cells."""
    index = {c: i for i, c in enumerate(record["classes"])}
    cal_proba = np.asarray(record["cal"]["proba"])
    cal_y = np.array([index[v] for v in record["cal"]["labels"]])
    out = {}
    for rule in MODEL_RULES:
        out[rule] = {p: np.asarray(record[p]["scores"][rule]) for p in ("cal", "test", "unseen")}
    if neighbors is not None:
        out["neighbors"] = neighbors
        held = {r: np.sort(out[r]["cal"]) for r in COMBINED_RULES}  # as fit stores them
        out["combined"] = {  # the calibration cells' own scores left out, as fit does
            p: combined_scores({r: out[r][p] for r in COMBINED_RULES}, held, own=p == "cal")
            for p in ("cal", "test", "unseen")
        }
    out["conformal_class"] = {
        "cal": conformal_class_pvalues(cal_proba, cal_proba, cal_y, own_y=cal_y),
        **{
            p: conformal_class_pvalues(np.asarray(record[p]["proba"]), cal_proba, cal_y)
            for p in ("test", "unseen")
        },
    }
    return out


def _auroc(seen: np.ndarray, unseen: np.ndarray) -> float:
    if len(seen) == 0 or len(unseen) == 0:
        return float("nan")
    truth = np.r_[np.zeros(len(seen)), np.ones(len(unseen))]
    return float(roc_auc_score(truth, -np.r_[seen, unseen]))


def figures(record: dict, groups: dict[str, list[str]], neighbors=None) -> list[dict]:
    """Per rule: threshold, AUROC and unassigned share per unseen group, seen figures."""
    classes = np.asarray(record["classes"])
    test_y = np.asarray(record["test"]["labels"])
    test_pred = classes[np.argmax(np.asarray(record["test"]["proba"]), axis=1)]
    correct = test_pred == test_y
    unseen_y = np.asarray(record["unseen"]["labels"])
    rows = []
    for rule, s in rule_scores(record, neighbors).items():
        threshold = rejection_threshold(s["cal"], TARGET_REJECTION)
        if rule in record["thresholds_api"]:  # the library's fit gives the same threshold
            assert np.isclose(threshold, record["thresholds_api"][rule], rtol=1e-9, atol=1e-12)
        kept = s["test"] >= threshold
        row = {
            "rule": rule,
            "threshold": threshold,
            "cal_rejected": float(np.mean(s["cal"] < threshold)),
            "seen_rejected": float(np.mean(~kept)),
            "seen_accuracy": float(np.mean(correct)),
            "seen_accuracy_kept": float(np.mean(correct[kept])) if kept.any() else float("nan"),
        }
        for name, labels in groups.items():
            mask = np.isin(unseen_y, labels)
            row[f"auroc_{name}"] = _auroc(s["test"], s["unseen"][mask])
            row[f"unassigned_{name}"] = float(np.mean(s["unseen"][mask] < threshold))
            row[f"n_{name}"] = int(mask.sum())
        rows.append(row)
    return rows


# ------------------------------------------------------------------ jobs
def jobs_for(mode: str, datasets: list[str], epochs: dict, seed: int, data_dir, types=None):
    jobs = []
    if mode in ("citeseq-unknown", "all"):
        jobs.append(
            {
                "mode": "citeseq-unknown",
                "dataset": "citeseq",
                "excluded": list(NEVER_TRAINED),
                "left_out": None,
                "epochs": epochs["citeseq"],
                "seed": seed,
            }
        )
    if mode in ("loto", "all"):
        for name in datasets:
            _, y = load(name, data_dir)
            labels, counts = np.unique(y, return_counts=True)
            order = np.argsort(-counts, kind="stable")
            candidates = [
                str(t)
                for t, n in zip(labels[order], counts[order], strict=True)
                if n >= MIN_CELLS[name] and t not in NEVER_TRAINED
            ]
            if types:
                candidates = [t for t in candidates if t in types] or candidates[: len(types)]
            never = list(NEVER_TRAINED) if name == "citeseq" else []
            for t in candidates:
                jobs.append(
                    {
                        "mode": "loto",
                        "dataset": name,
                        "excluded": [t, *never],
                        "left_out": t,
                        "epochs": epochs[name],
                        "seed": seed,
                    }
                )
    return jobs


def summarise(job: dict, record: dict, data_dir: Path) -> dict:
    if job["mode"] == "citeseq-unknown":
        groups = {"mouse": ["Mouse"], "unknown": ["Unknown"], "both": list(NEVER_TRAINED)}
    else:
        groups = {"left_out": [job["left_out"]]}
    return {
        "mode": job["mode"],
        "dataset": job["dataset"],
        "left_out": job["left_out"],
        "epochs": job["epochs"],
        "seed": job["seed"],
        "n_train": record["n_train"],
        "n_calibration": len(record["cal"]["labels"]),
        "n_test_seen": len(record["test"]["labels"]),
        "fit_seconds": record["fit_seconds"],
        "rules": figures(record, groups, neighbor_scores(job, data_dir)),
    }


# ------------------------------------------------------------------ tables
def _f(v: float, pct: bool = False) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{100 * v:.1f} %" if pct else f"{v:.3f}"


def _ok(flag: bool) -> str:
    return "yes" if flag else "NO"


def tables(results: list[dict]) -> list[str]:
    lines: list[str] = []
    unknown = [r for r in results if r["mode"] == "citeseq-unknown"]
    for r in unknown:
        lines += [
            f"### CITE-seq: Mouse and Unknown cells never trained on ({r['epochs']} epochs)",
            "",
            f"Seen cells: {r['n_train']} train, {r['n_calibration']} calibration, "
            f"{r['n_test_seen']} test; {r['rules'][0]['n_mouse']} Mouse and "
            f"{r['rules'][0]['n_unknown']} Unknown cells. Targets: Mouse AUROC >= "
            f"{TARGETS['mouse_auroc']}, >= {TARGETS['mouse_unassigned']:.0%} of Mouse cells "
            f"unassigned, <= {TARGETS['seen_rejected']:.0%} of seen test cells rejected.",
            "",
            "| rule | AUROC Mouse | AUROC Unknown | AUROC both | Mouse unassigned | "
            "Unknown unassigned | seen rejected | seen accuracy (all) | seen accuracy (kept) "
            "| threshold | targets met |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in r["rules"]:
            met = (
                x["auroc_mouse"] >= TARGETS["mouse_auroc"]
                and x["unassigned_mouse"] >= TARGETS["mouse_unassigned"]
                and x["seen_rejected"] <= TARGETS["seen_rejected"]
            )
            lines.append(
                f"| {x['rule']} | {_f(x['auroc_mouse'])} | {_f(x['auroc_unknown'])} | "
                f"{_f(x['auroc_both'])} | {_f(x['unassigned_mouse'], True)} | "
                f"{_f(x['unassigned_unknown'], True)} | {_f(x['seen_rejected'], True)} | "
                f"{_f(x['seen_accuracy'])} | {_f(x['seen_accuracy_kept'])} | "
                f"{x['threshold']:.4g} | {_ok(met)} |"
            )
        lines.append("")
    loto = [r for r in results if r["mode"] == "loto"]
    for name in dict.fromkeys(r["dataset"] for r in loto):
        rs = [r for r in loto if r["dataset"] == name]
        epochs = sorted({r["epochs"] for r in rs})
        lines += [
            f"### Leave one type out: {name} ({', '.join(map(str, epochs))} epochs; types with "
            f">= {MIN_CELLS[name]} cells)",
            "",
            "| left-out type | cells | rule | AUROC | unassigned | seen rejected | "
            "seen accuracy (all) | seen accuracy (kept) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rs:
            for x in r["rules"]:
                lines.append(
                    f"| {r['left_out']} | {x['n_left_out']} | {x['rule']} | "
                    f"{_f(x['auroc_left_out'])} | {_f(x['unassigned_left_out'], True)} | "
                    f"{_f(x['seen_rejected'], True)} | {_f(x['seen_accuracy'])} | "
                    f"{_f(x['seen_accuracy_kept'])} |"
                )
        lines += [
            "",
            f"Median over the {len(rs)} left-out types (target: median AUROC >= "
            f"{TARGETS['loto']}):",
            "",
            "| rule | median AUROC | min AUROC | median unassigned | median seen rejected | "
            "target met |",
            "|---|---|---|---|---|---|",
        ]
        for m in medians(rs):
            lines.append(
                f"| {m['rule']} | {_f(m['median_auroc'])} | {_f(m['min_auroc'])} | "
                f"{_f(m['median_unassigned'], True)} | {_f(m['median_seen_rejected'], True)} | "
                f"{_ok(m['median_auroc'] >= TARGETS['loto'])} |"
            )
        lines.append("")
    return lines


def medians(rs: list[dict]) -> list[dict]:
    out = []
    for i, rule in enumerate(r["rule"] for r in rs[0]["rules"]):
        au = np.array([r["rules"][i]["auroc_left_out"] for r in rs])
        out.append(
            {
                "rule": rule,
                "median_auroc": float(np.median(au)),
                "min_auroc": float(np.min(au)),
                "median_unassigned": float(
                    np.median([r["rules"][i]["unassigned_left_out"] for r in rs])
                ),
                "median_seen_rejected": float(
                    np.median([r["rules"][i]["seen_rejected"] for r in rs])
                ),
            }
        )
    return out


# ------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["citeseq-unknown", "loto", "all"], default="all")
    p.add_argument(
        "--datasets", nargs="+", choices=["pbmc", "citeseq"], default=["pbmc", "citeseq"]
    )
    p.add_argument("--types", nargs="+", default=None, help="left-out types (loto; all if not)")
    p.add_argument(
        "--epochs", type=int, default=None, help=f"training epochs (default {DEFAULT_EPOCHS})"
    )
    p.add_argument(
        "--citeseq-epochs", type=int, default=None, help="training epochs on CITE-seq (--epochs)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", type=_parse_shard, default=None, metavar="I/N")
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--tag", default="annotate_rejection", help="file stem of the outputs")
    p.add_argument(
        "--from-cache",
        action="store_true",
        help="fit nothing: write the tables from the fits already cached",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: 2 PBMC types, 2 epochs (CITE-seq 1), temp dir",
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:  # both modes, cut to the bone; outputs in a temporary folder
        args.epochs = args.epochs or 2
        args.citeseq_epochs = args.citeseq_epochs or 1
        args.datasets = ["pbmc"]
        args.types = args.types or ["CD19+ B", "CD56+ NK"]
        args.results_dir = args.results_dir or Path(tempfile.mkdtemp(prefix="bench_annotate_"))
        if not (args.data_dir / "citeseq_cbmc.npz").exists():
            print(f"--quick: no CITE-seq data in {args.data_dir}; loto on PBMC only")
            args.mode = "loto"
    results_dir = args.results_dir or RESULTS_DIR
    cache_dir = results_dir / "cache" / "annotate"
    epochs = {"pbmc": args.epochs or DEFAULT_EPOCHS}
    epochs["citeseq"] = args.citeseq_epochs or epochs["pbmc"]
    jobs = jobs_for(args.mode, args.datasets, epochs, args.seed, args.data_dir, args.types)
    mine = jobs if args.shard is None else jobs[args.shard[0] :: args.shard[1]]
    print(f"{len(jobs)} fit(s) in this run's protocol; this process fits {len(mine)}", flush=True)
    warnings.filterwarnings("ignore", message="X does not have valid feature names")
    for job in [] if args.from_cache else mine:
        get_record(job, cache_dir, args.data_dir, fit=True)
    results = []
    for job in jobs:
        record = get_record(job, cache_dir, args.data_dir, fit=False)
        if record is not None:
            results.append(summarise(job, record, args.data_dir))
    lines = tables(results)
    print("\n".join(lines))
    if args.shard is not None:
        print(f"shard {args.shard[0]}/{args.shard[1]} done; rerun without --shard for the tables")
        return
    info = machine()
    settings = {
        "mode": args.mode,
        "datasets": args.datasets,
        "epochs": epochs,
        "seed": args.seed,
        "fractions_train_calibration_test": list(FRACTIONS),
        "target_rejection": TARGET_REJECTION,
        "rules": list(ALL_RULES),
        "model": "TGEMClassifier at its defaults, random_state=seed, n_threads=1",
        "targets": TARGETS,
        "quick": args.quick,
    }
    summary = {}
    for name in dict.fromkeys(r["dataset"] for r in results if r["mode"] == "loto"):
        summary[f"loto_{name}"] = medians(
            [r for r in results if r["mode"] == "loto" and r["dataset"] == name]
        )
    out = {"settings": settings, "machine": info, "results": results, "loto_medians": summary}
    intro = (
        f"Model: `TGEMClassifier` at its defaults, random_state={args.seed}, n_threads=1; "
        "seen cells split stratified 60 % train / 20 % calibration / 20 % test; every "
        f"threshold rejects at most {TARGET_REJECTION:.0%} of the calibration cells. "
        f"{len(results)} of {len(jobs)} fits in the cache."
    )
    save_outputs(
        results_dir / args.tag,
        out,
        "Rejection of cells of unseen types (`bench_annotate.py`)",
        "bench_annotate.py",
        argv,
        intro,
        lines,
    )


def save_outputs(stem: Path, out: dict, title: str, script: str, argv, intro: str, lines):
    """``stem.json`` (``out``) and ``stem.md``: title, command, date, machine, intro, table."""
    info = out["machine"]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    args = sys.argv[1:] if argv is None else list(argv)
    header = [
        f"# {title}",
        "",
        f"Generated by `{' '.join(['python', 'benchmarks/' + script, *args])}`"
        f" on {info['date']} ({info['cpu']}, {info['cores']} cores, load average "
        f"{info['load_average_1_5_15min']}; tgem {info['tgem']}, torch {info['torch']}). {intro}",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(header + list(lines)) + "\n")
    print(f"saved {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
