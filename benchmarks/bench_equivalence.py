"""Does the attention backend change what T-GEM learns? (issue 3's "no accuracy change").

Trains the same model on the bundled PBMC data (80 % of the 700 cells, stratified, seed 0)
with each attention backend, with the same initial weights, batches and dropout masks, and
compares the parameters and the predictions on the other 20 %. The float32 runs are measured
against the plain reference formulation in float32 and, with ``--float64``, against the same
reference formulation trained in float64: the project's standard accepts a fast path whose
float32 error is no worse than twice the plain float32 formulation's own error against
float64. Prints tables and writes JSON; asserts nothing.

How the runs are made. ``TGEMClassifier`` trains in float32 only (its batches are cast to
float32), so every run here goes through a replica of ``TGEMClassifier.fit``: the seeds drawn
from ``random_state`` as ``fit`` draws them, the same ``TGEMNet`` initialisation (drawn in
float32, then cast to the run's dtype), the same dropout and shuffling generators, and tgem's
own training loop ``tgem._training.train`` with each batch cast to the run's dtype (the PBMC
values are float32, so the float64 run sees the same numbers). The loop is called one epoch at
a time with Adam's state carried over, so that every epoch is checkpointed (long runs resume
where they stopped, ``--cache``) and compared. Checkpoints are keyed by the run's settings and
the model and training-loop code; before they are reused, the first training step is
recomputed with the backend as it is now and its gradients must equal the stored ones bit for
bit (else the run starts anew). ``--check BACKEND=EPOCHS`` fits ``TGEMClassifier`` itself and
reports its largest parameter difference from the replica at that epoch (0.0: bit for bit the
same fit).

    # one epoch, four backends, the float64 oracle and the classifier check (~15 min, 2 cores)
    python benchmarks/bench_equivalence.py --epochs 1 --float64 \\
        --check reference=1 exact=1 compiled=1 native=1
    # trained models: 50 epochs, the slow reference capped at 12 epochs
    python benchmarks/bench_equivalence.py --epochs 50 --reference-epochs 12 \\
        --check native=50 --out /tmp/equivalence_trained.json
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import hashlib
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "reference-float32"
ORACLE = "reference-float64"
PREDICT_ROWS = 32  # rows per forward pass when predicting (the reference needs G^2 per row)


# ----------------------------------------------------------------------------- set-up
def load_split(seed: int):
    """The PBMC split used by every run: (X_train, y_train, X_test, y_test)."""
    from sklearn.model_selection import train_test_split

    from tgem.datasets import load_pbmc68k

    X, y = load_pbmc68k(return_X_y=True)
    y = np.asarray(y, dtype=str)  # not object: the checkpoints are read without pickle
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, stratify=y, random_state=seed)
    return np.ascontiguousarray(Xtr), ytr, np.ascontiguousarray(Xte), yte


def _digest(path: Path) -> bytes:
    """A Python file's syntax tree without docstrings (comments and docstrings do not change
    the numbers, so editing them keeps a long run's checkpoints)."""
    return _py_digest(path.read_text())


def _py_digest(text: str) -> bytes:
    tree = ast.parse(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def loop_hash() -> str:
    """Hash of the model and training-loop code (syntax trees without docstrings).

    Part of every run's checkpoint key. The attention backends' code is not hashed: their
    numbers are checked instead (:meth:`Run.validate`).
    """
    h = hashlib.sha256()
    for name in ("_model.py", "_training.py", "_distributed.py"):
        h.update(name.encode() + b"\0" + _digest(ROOT / "tgem" / name))
    return h.hexdigest()[:12]


def git_state() -> dict:
    def git(*a):
        try:
            return subprocess.run(
                ["git", *a], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    dirty = git("status", "--porcelain", "--", "tgem")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "tgem_files_modified": [line[3:] for line in (dirty or "").splitlines()],
    }


def run_name(backend: str, dtype: str) -> str:
    return f"{backend}-{dtype}"


@contextlib.contextmanager
def batches_as(dtype):
    """Make tgem's training loop cast each batch to ``dtype`` (it casts to float32)."""
    from tgem import _training

    original = _training.dense_batch

    def dense_batch(X, idx, device):
        return original(X, idx, device).to(dtype)

    _training.dense_batch = dense_batch
    try:
        yield
    finally:
        _training.dense_batch = original


@contextlib.contextmanager
def adam_carrying(holder: dict):
    """Make the Adam optimiser built by the training loop resume ``holder["state"]``.

    It also keeps the optimiser in ``holder["optimizer"]`` and the gradients of the very first
    step in ``holder["first_grad"]``.
    """
    import torch

    original = torch.optim.Adam

    class Adam(original):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            if holder.get("state") is not None:
                self.load_state_dict(holder["state"])
            holder["optimizer"] = self

        def step(self, closure=None):
            if "first_grad" not in holder:
                holder["first_grad"] = [
                    p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                ]
            return super().step(closure)

    torch.optim.Adam = Adam
    try:
        yield
    finally:
        torch.optim.Adam = original


# ----------------------------------------------------------------------------- one run
class Run:
    """One backend in one dtype, trained epoch by epoch with a checkpoint per epoch."""

    def __init__(
        self, backend: str, dtype: str, data, *, seed: int, n_threads: int, cache: Path, code: str
    ):  # code: loop_hash()
        self.backend, self.dtype_name = backend, dtype
        self.name = run_name(backend, dtype)
        self.data, self.seed, self.n_threads, self.code = data, seed, n_threads, code
        self.status = "trained in this invocation"
        key = f"{self.name}-seed{seed}-threads{n_threads}-code{code}"
        self.dir = cache / key
        self.dir.mkdir(parents=True, exist_ok=True)

    def snapshot_path(self, epoch: int) -> Path:
        return self.dir / f"epoch_{epoch:03d}.npz"

    def done(self) -> int:
        """Epochs already checkpointed."""
        e = 0
        while self.snapshot_path(e + 1).exists() and (self.dir / "resume.pt").exists():
            e += 1
        return e

    def snapshot(self, epoch: int) -> dict:
        with np.load(self.snapshot_path(epoch), allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        out["meta"] = json.loads(str(out["meta"]))
        return out

    def _initial(self):
        """What ``TGEMClassifier.fit`` sets up before its training loop, in the run's dtype."""
        import torch
        from sklearn.utils import check_random_state

        from tgem import TGEMClassifier
        from tgem._model import TGEMNet
        from tgem._runtime import MAX_SEED as _MAX_SEED

        Xtr, ytr, _, _ = self.data
        classes, y_enc = np.unique(ytr, return_inverse=True)
        p = TGEMClassifier(random_state=self.seed).get_params()
        seeds = check_random_state(self.seed).randint(0, _MAX_SEED, size=4)  # as fit draws them
        module = TGEMNet(
            n_genes=Xtr.shape[1],
            n_classes=len(classes),
            n_layers=p["n_layers"],
            n_heads=p["n_heads"],
            activation=p["activation"],
            dropout=p["dropout"],
            shared_norm=p["shared_norm"],
            attention_backend=self.backend,
            generator=torch.Generator().manual_seed(int(seeds[1])),
        ).to(self.dtype)
        module.dropout.generator = torch.Generator().manual_seed(int(seeds[2]))
        shuffle_gen = torch.Generator().manual_seed(int(seeds[3]))
        weights = np.ones(Xtr.shape[0])  # fit's sample weights without class_weight
        return module, shuffle_gen, p, classes, y_enc, weights

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)

    def validate(self) -> None:
        """Recompute the first training step; set the checkpoints aside if its gradients
        differ by one bit from those stored at epoch 1 (the backend's code changed its
        numbers since)."""
        import torch

        from tgem import _training
        from tgem._distributed import local_epoch
        from tgem._runtime import torch_threads

        if not self.done():
            return
        module, shuffle_gen, p, _, y_enc, weights = self._initial()
        idx, source, _ = next(local_epoch(self.data[0], len(y_enc), p["batch_size"], shuffle_gen))
        module.train()
        with torch_threads(self.n_threads), batches_as(self.dtype):
            xb = _training.dense_batch(source, idx, torch.device("cpu"))
            _training._accumulate_gradients(
                module,
                xb,
                torch.as_tensor(y_enc)[idx],
                torch.as_tensor(weights, dtype=torch.float32)[idx],
                1,
            )
        stored = self.snapshot(1)
        same = all(
            np.array_equal(v.grad.numpy(), stored[f"first_grad:{k}"])
            for k, v in module.named_parameters()
        )
        if not same:
            aside = self.dir.with_name(f"{self.dir.name}.stale-{time.strftime('%Y%m%d%H%M%S')}")
            self.dir.rename(aside)
            self.dir.mkdir()
            print(
                f"{self.name}: the backend's first step no longer gives the stored "
                f"gradients; old checkpoints moved to {aside}",
                flush=True,
            )
        else:
            self.status = (
                f"reused from the cache, which holds {self.done()} epoch(s) (first "
                "step recomputed: identical bit for bit)"
            )
            print(f"{self.name}: {self.status}", flush=True)

    def train_to(self, epochs: int) -> None:
        """Train (or resume) up to ``epochs`` epochs, checkpointing each one."""
        import torch

        from tgem._runtime import torch_threads
        from tgem._training import TrainState, train

        start = self.done()
        if start >= epochs:
            return
        if start:
            self.status += f"; epochs {start + 1}-{epochs} trained in this invocation"
        Xtr, ytr, Xte, yte = self.data
        dtype = self.dtype
        module, shuffle_gen, p, classes, y_enc, weights = self._initial()
        dropout_gen = module.dropout.generator
        holder: dict = {"state": None}
        state = TrainState()
        if start:
            r = torch.load(self.dir / "resume.pt", weights_only=True)
            if r["epoch"] == start - 1:  # killed between the two files: redo that epoch
                start = r["epoch"]
            if r["epoch"] != start:
                raise RuntimeError(
                    f"{self.dir}: resume.pt is at epoch {r['epoch']}, "
                    f"snapshots at {start}; delete the folder"
                )
            module.load_state_dict(r["module"])
            holder["state"] = r["optimizer"]
            dropout_gen.set_state(r["dropout_gen"])
            shuffle_gen.set_state(r["shuffle_gen"])
            state.history = self.snapshot(start)["meta"]["history"]
            state.best_loss = min(h["train_loss"] for h in state.history)
            print(f"{self.name}: resuming after epoch {start}", flush=True)
        Xte_t = torch.as_tensor(Xte).to(dtype)
        with torch_threads(self.n_threads), batches_as(dtype), adam_carrying(holder):
            for epoch in range(start + 1, epochs + 1):
                if epoch > 1:
                    holder["first_grad"] = None  # only the first step of epoch 1
                state = train(
                    module,
                    Xtr,
                    y_enc,
                    weights,
                    valid=None,
                    device=torch.device("cpu"),
                    learning_rate=p["learning_rate"],
                    weight_decay=p["weight_decay"],
                    batch_size=p["batch_size"],
                    max_epochs=1,
                    n_iter_no_change=p["n_iter_no_change"],
                    shuffle_generator=shuffle_gen,
                    state=state,
                )
                opt = holder["optimizer"]
                holder["state"] = opt.state_dict()
                module.eval()
                with torch.no_grad():
                    log_proba = torch.cat(
                        [
                            module(Xte_t[i : i + PREDICT_ROWS])
                            for i in range(0, len(Xte_t), PREDICT_ROWS)
                        ]
                    )
                module.train()
                pred = classes[log_proba.argmax(1).numpy()]
                params = dict(module.named_parameters())
                arrays = {f"param:{k}": v.detach().numpy().copy() for k, v in params.items()}
                for k, v in params.items():
                    arrays[f"adam_v:{k}"] = opt.state[v]["exp_avg_sq"].numpy().copy()
                if epoch == 1 and holder.get("first_grad") is not None:
                    for k, g in zip(params, holder["first_grad"]):
                        arrays[f"first_grad:{k}"] = g.numpy()
                meta = {
                    "epoch": epoch,
                    "history": state.history,
                    "loop_hash": self.code,
                    "adam_steps": int(opt.state[next(iter(params.values()))]["step"]),
                    "test_accuracy": float(np.mean(pred == yte)),
                }
                # both files written aside and renamed: a run killed mid-write leaves the
                # previous epoch's checkpoint whole
                tmp = self.dir / "epoch.npz.tmp"
                with open(tmp, "wb") as fh:
                    np.savez(
                        fh, pred=pred, log_proba=log_proba.numpy(), meta=json.dumps(meta), **arrays
                    )
                tmp.replace(self.snapshot_path(epoch))
                tmp = self.dir / "resume.pt.tmp"
                torch.save(
                    {
                        "epoch": epoch,
                        "module": module.state_dict(),
                        "optimizer": holder["state"],
                        "dropout_gen": dropout_gen.get_state(),
                        "shuffle_gen": shuffle_gen.get_state(),
                    },
                    tmp,
                )
                tmp.replace(self.dir / "resume.pt")
                h = state.history[-1]
                print(
                    f"{self.name}: epoch {epoch} train_loss {h['train_loss']:.5f} "
                    f"test_accuracy {meta['test_accuracy']:.4f} ({h['duration_s']:.1f} s)",
                    flush=True,
                )


def check_classifier(run: Run, epochs: int) -> dict:
    """Fit TGEMClassifier itself and compare with the replica's checkpoint at ``epochs``."""
    from tgem import TGEMClassifier

    clf_code = hashlib.sha256(_digest(ROOT / "tgem" / "_classifier.py")).hexdigest()[:12]
    path = run.dir / f"classifier_epoch_{epochs:03d}-code{clf_code}.npz"
    Xtr, ytr, Xte, yte = run.data
    if not path.exists():
        t0 = time.perf_counter()
        clf = TGEMClassifier(
            max_epochs=epochs,
            random_state=run.seed,
            attention_backend=run.backend,
            n_threads=run.n_threads,
        )
        clf.fit(Xtr, ytr)
        secs = time.perf_counter() - t0
        clf.predict_batch_size = PREDICT_ROWS
        pred = clf.predict(Xte)
        np.savez(
            path,
            pred=pred,
            fit_s=secs,
            **{f"param:{k}": v.detach().numpy() for k, v in clf.module_.named_parameters()},
        )
    with np.load(path, allow_pickle=False) as z:
        clf_params = {k[6:]: z[k] for k in z.files if k.startswith("param:")}
        pred, secs = z["pred"], float(z["fit_s"])
    snap = run.snapshot(epochs)
    diff = max(float(np.max(np.abs(v - snap[f"param:{k}"]))) for k, v in clf_params.items())
    return {
        "epochs": epochs,
        "max_param_diff_classifier_vs_replica": diff,
        "identical_test_predictions": float(np.mean(pred == snap["pred"])),
        "classifier_fit_s": round(secs, 1),
    }


# ----------------------------------------------------------------------------- comparisons
def flat(snap: dict, prefix: str = "param:") -> np.ndarray:
    return np.concatenate(
        [snap[k].astype(np.float64).ravel() for k in sorted(snap) if k.startswith(prefix)]
    )


def compare(a: dict, b: dict, tol: float) -> dict:
    d = np.abs(flat(a) - flat(b))
    return {
        "max_param_diff": float(d.max()),
        "rms_param_diff": float(np.sqrt(np.mean(d**2))),
        f"share_params_diff_gt_{tol:g}": float(np.mean(d > tol)),
        "identical_test_predictions": float(np.mean(a["pred"] == b["pred"])),
    }


def large_difference_analysis(snaps: dict, lr: float, tol: float) -> dict:
    """Are the parameters that moved apart the ones with near-zero gradients?

    Adam's update is ``lr * m_hat / (sqrt(v_hat) + eps)``; on the first step that is
    ``lr * g / (|g| + eps)``, i.e. about ``lr * sign(g)`` whatever the size of ``g``. A
    gradient so small that float32 rounding flips its sign moves the parameter by ``2 lr``
    relative to float64. Reported per float32 run: how many first-step gradients have the
    other sign than in float64, and how large those gradients are in float64; and for the
    parameters more than ``tol`` away from the float64 run after the last compared epoch,
    where their RMS gradient (Adam's ``sqrt(v_hat)`` in the float64 run) ranks among all.
    """
    oracle = snaps.get(ORACLE)
    if oracle is None or not any(k.startswith("first_grad:") for k in oracle):
        return {}
    g64 = flat(oracle, "first_grad:")
    steps = oracle["meta"]["adam_steps"]
    rms_grad = np.sqrt(flat(oracle, "adam_v:") / (1 - 0.999**steps))
    rank = np.argsort(np.argsort(rms_grad)) / (len(rms_grad) - 1)  # percentile rank 0..1
    names = [k[6:] for k in sorted(oracle) if k.startswith("param:")]
    sizes = [oracle[f"param:{k}"].size for k in names]
    owner = np.repeat(np.arange(len(names)), sizes)
    out = {
        "n_params": int(g64.size),
        "median_abs_first_grad_float64": float(np.median(np.abs(g64))),
        "median_rms_grad_float64": float(np.median(rms_grad)),
        "runs": {},
    }
    for name, snap in snaps.items():
        if name == ORACLE or not any(k.startswith("first_grad:") for k in snap):
            continue
        g = flat(snap, "first_grad:")
        flip = np.sign(g) != np.sign(g64)
        far = np.abs(flat(snap) - flat(oracle)) > tol
        rel = np.abs(g - g64) / np.maximum(np.abs(g64), np.finfo(np.float64).tiny)
        per_tensor = {
            names[i]: int(c)
            for i, c in enumerate(np.bincount(owner[far], minlength=len(names)))
            if c
        }
        out["runs"][name] = {
            "first_step_sign_flips": int(flip.sum()),
            "max_abs_first_grad_float64_of_flipped": float(np.abs(g64[flip]).max())
            if flip.any()
            else None,
            "max_rel_first_grad_error": float(np.max(np.abs(g - g64)) / np.max(np.abs(g64))),
            "median_elementwise_rel_first_grad_error": float(np.median(rel)),
            f"n_params_diff_gt_{tol:g}": int(far.sum()),
            "of_which_flipped_on_first_step": int((far & flip).sum()),
            "median_rms_grad_rank_of_those": float(np.median(rank[far])) if far.any() else None,
            "median_rms_grad_of_those": float(np.median(rms_grad[far])) if far.any() else None,
            "median_elementwise_rel_first_grad_error_of_those": float(np.median(rel[far]))
            if far.any()
            else None,
            "tensors_holding_them": per_tensor,
        }
    return out


def summarise(runs: dict[str, Run], epochs_of: dict[str, int], tol: float, lr: float) -> dict:
    at = sorted({1, 5, 10, 20, 30, 40, 50} | set(epochs_of.values()))
    at = [e for e in at if e <= max(epochs_of.values())]
    out = {}
    for e in at:
        snaps = {n: r.snapshot(e) for n, r in runs.items() if epochs_of[n] >= e}
        block = {
            "runs": {
                n: {
                    "train_loss": s["meta"]["history"][-1]["train_loss"],
                    "test_accuracy": s["meta"]["test_accuracy"],
                    "epoch_s": round(s["meta"]["history"][-1]["duration_s"], 1),
                }
                for n, s in snaps.items()
            }
        }
        for base in (REFERENCE, ORACLE, "exact-float32"):
            if base not in snaps:
                continue
            block[f"vs_{base}"] = {
                n: compare(s, snaps[base], tol) for n, s in snaps.items() if n != base
            }
        names = list(snaps)
        block["identical_test_predictions_pairwise"] = {
            a: {b: float(np.mean(snaps[a]["pred"] == snaps[b]["pred"])) for b in names[i + 1 :]}
            for i, a in enumerate(names[:-1])
        }
        if REFERENCE in snaps and ORACLE in snaps:
            own = compare(snaps[REFERENCE], snaps[ORACLE], tol)
            block["standard_2x"] = {
                "rule": "float32 error against float64 <= 2 x reference-float32's own",
                "reference_float32_vs_float64": {
                    k: own[k] for k in ("max_param_diff", "rms_param_diff")
                },
            }
            for n, c in block[f"vs_{ORACLE}"].items():
                if n == REFERENCE:
                    continue
                ratio_max = c["max_param_diff"] / own["max_param_diff"]
                ratio_rms = c["rms_param_diff"] / own["rms_param_diff"]
                block["standard_2x"][n] = {
                    "ratio_max": round(ratio_max, 3),
                    "ratio_rms": round(ratio_rms, 3),
                    "meets": bool(ratio_max <= 2 and ratio_rms <= 2),
                }
        if e == 1:
            block["large_differences"] = large_difference_analysis(snaps, lr, tol)
        out[str(e)] = block
    return out


def print_tables(summary: dict) -> None:
    for e, block in summary.items():
        print(f"\n== after epoch {e}")
        bases = [k for k in block if k.startswith("vs_")]
        print(
            f"{'run':22s} {'test acc':>8s} "
            + " ".join(f"{'max d ' + k[3:]:>28s} {'same pred':>9s}" for k in bases)
        )
        for n, r in block["runs"].items():
            cells = []
            for k in bases:
                c = block[k].get(n)
                cells.append(
                    f"{c['max_param_diff']:28.3e} {c['identical_test_predictions']:9.4f}"
                    if c
                    else f"{'-':>28s} {'-':>9s}"
                )
            print(f"{n:22s} {r['test_accuracy']:8.4f} " + " ".join(cells))
        if "standard_2x" in block:
            print(
                "standard (<= 2x reference-float32's error vs float64):",
                json.dumps({k: v for k, v in block["standard_2x"].items() if k != "rule"}),
            )


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1, help="epochs of every float32 run")
    p.add_argument("--backends", nargs="+", default=["reference", "exact", "compiled", "native"])
    p.add_argument(
        "--reference-epochs",
        type=int,
        default=None,
        help="cap the (slow) reference runs at this many epochs (default: --epochs)",
    )
    p.add_argument(
        "--float64",
        action="store_true",
        help="also train the reference formulation in float64 (the oracle)",
    )
    p.add_argument(
        "--check",
        nargs="*",
        default=[],
        metavar="BACKEND=EPOCHS",
        help="fit TGEMClassifier itself and compare it with the replica",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-threads", type=int, default=2)
    p.add_argument("--tol", type=float, default=1e-4, help="parameter tolerance of issue 3")
    p.add_argument("--cache", default=str(RESULTS / "tmp" / "equivalence_cache"))
    p.add_argument("--out", default=str(RESULTS / "equivalence.json"))
    args = p.parse_args(argv)

    import torch

    import tgem
    from tgem import TGEMClassifier
    from tgem._kernels import backend_names

    backend_names()  # load every backend now, and hash the code just loaded
    code = loop_hash()
    git = git_state()
    data = load_split(args.seed)
    cache = Path(args.cache)
    ref_epochs = min(args.epochs, args.reference_epochs or args.epochs)
    plan = [(b, "float32", ref_epochs if b == "reference" else args.epochs) for b in args.backends]
    if args.float64:
        plan.insert(
            1 if plan and plan[0][0] == "reference" else 0, ("reference", "float64", ref_epochs)
        )
    runs, epochs_of = {}, {}
    t_start = time.perf_counter()
    for backend, dtype, epochs in plan:
        run = Run(
            backend, dtype, data, seed=args.seed, n_threads=args.n_threads, cache=cache, code=code
        )
        run.validate()
        run.train_to(epochs)
        runs[run.name], epochs_of[run.name] = run, epochs
    checks = {}
    for spec in args.check:
        backend, _, e = spec.partition("=")
        name = run_name(backend, "float32")
        checks[name] = check_classifier(runs[name], int(e or 1))
        print(f"classifier check {name}: {checks[name]}", flush=True)

    lr = TGEMClassifier().learning_rate
    summary = summarise(runs, epochs_of, args.tol, lr)
    print_tables(summary)
    fit_s = {
        n: round(sum(h["duration_s"] for h in r.snapshot(epochs_of[n])["meta"]["history"]), 1)
        for n, r in runs.items()
    }
    Xtr, _, Xte, _ = data
    result = {
        "what": "parameters and PBMC test predictions of the same T-GEM fit with each "
        "attention backend (issue 3: no accuracy change)",
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/bench_equivalence.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.date.today().isoformat(),
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "torch": torch.__version__,
            "tgem": tgem.__version__,
            "torch_threads": args.n_threads,
            **git,
        },
        "protocol": {
            "data": f"load_pbmc68k: {Xtr.shape[0]} training / {Xte.shape[0]} test cells "
            f"(stratified 80/20, seed {args.seed}), {Xtr.shape[1]} genes, float32",
            "model": "TGEMClassifier defaults (3 layers, 5 heads, dropout 0.3, Adam lr 1e-4, "
            f"batch 16), random_state={args.seed}",
            "runs": {
                n: {"epochs": epochs_of[n], "fit_s": fit_s[n], "checkpoints": r.status}
                for n, r in runs.items()
            },
            "replica": "every run is TGEMClassifier.fit's computation replayed epoch by epoch "
            "(see the script's docstring); 'classifier_check' compares it with "
            "TGEMClassifier itself",
            "loop_hash": code,
            "fit_s": "sum of the epoch times of the checkpoints, possibly from several "
            "invocations at different machine loads",
            "tolerance": args.tol,
            "note": "the first epoch of 'compiled' includes torch.compile's compilation; "
            "times were taken on a 2-core machine shared with other jobs",
        },
        "classifier_check": checks,
        "after_epoch": summary,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


def _cpu_name() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_attention import cpu_model  # one /proc/cpuinfo reader for the benchmarks

    return cpu_model()


if __name__ == "__main__":
    raise SystemExit(main())
