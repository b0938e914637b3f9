"""Scaling out: Dask searches, data-parallel training (gloo), .h5ad streaming, Dask inference.

Every test here starts processes (a Dask LocalCluster or two torch.distributed ranks), so all
are marked slow; CI runs them with ``-m slow``.
"""

import gc
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tgem import TGEMClassifier
from tgem._h5ad import H5ADDataset

pytestmark = pytest.mark.slow

anndata = pytest.importorskip("anndata")
pytest.importorskip("h5py")


# ----------------------------------------------------------------------------- data
def _pbmc_task(pbmc, n_genes=40, classes=("CD14+ Monocyte", "CD19+ B", "CD56+ NK")):
    X, y, genes = pbmc
    keep = np.isin(y, classes)
    X, y = X[keep], y[keep]
    top = np.sort(np.argsort(X.var(axis=0))[::-1][:n_genes])
    return np.ascontiguousarray(X[:, top]), y, genes[top]


def _weights(module):
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def _max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope="module")
def sparse_h5ad(tmp_path_factory):
    """2,000 cells x 200 genes of Poisson counts (log1p), three types, CSR, obs cell_type."""
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(11)
    n, g = 2000, 200
    labels = rng.choice(["T", "B", "NK"], size=n)
    rate = rng.gamma(0.3, 1.0, size=(3, g))
    rate[:, :20] *= rng.uniform(0.2, 5.0, size=(3, 20))
    counts = rng.poisson(rate[pd.Categorical(labels, ["T", "B", "NK"]).codes])
    X = sp.csr_matrix(np.log1p(counts).astype(np.float32))
    adata = anndata.AnnData(
        X=X,
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(n)]
        ),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(g)]),
    )
    path = tmp_path_factory.mktemp("h5ad") / "cells.h5ad"
    adata.write_h5ad(path)
    return path, X, labels


# ----------------------------------------------------------------------------- 1. Dask search
class _ThreadsSeen(TGEMClassifier):
    """Records torch's thread count at every forward pass of ``fit``."""

    def fit(self, X, y, **kw):
        seen = set()
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda *a: seen.add(torch.get_num_threads())
        )
        try:
            super().fit(X, y, **kw)
        finally:
            hook.remove()
        self.threads_seen_ = sorted(seen)
        return self


def _fit_on_worker(est, X, y):
    import os

    fitted = est.fit(X, y)
    return fitted, str(fitted.device_), os.getpid()


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    import cloudpickle

    # the workers are fresh processes: ship this module's helpers by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_dask_grid_search_cv_results_equal_n_jobs_1(pbmc, dask_client):
    import joblib
    from sklearn.model_selection import GridSearchCV

    X, y, _ = _pbmc_task(pbmc, n_genes=30)
    est = TGEMClassifier(
        n_layers=1,
        max_epochs=4,
        batch_size=16,
        learning_rate=1e-2,
        dropout=0.1,
        n_threads=1,
        random_state=0,
    )
    grid = {"n_heads": [1, 2], "activation": ["relu", "gelu"]}
    local = GridSearchCV(est, grid, cv=2, n_jobs=1).fit(X, y)
    with joblib.parallel_config(backend="dask"):
        remote = GridSearchCV(est, grid, cv=2, n_jobs=-1).fit(X, y)
    assert local.cv_results_["params"] == remote.cv_results_["params"]
    for key in ("split0_test_score", "split1_test_score", "mean_test_score", "rank_test_score"):
        np.testing.assert_array_equal(local.cv_results_[key], remote.cv_results_[key])
    np.testing.assert_array_equal(local.predict_proba(X), remote.predict_proba(X))
    # the fits really ran on the workers
    workers = dask_client.run(lambda: __import__("os").getpid())
    assert len(set(workers.values())) == 2


def test_estimator_ships_to_workers_resolves_device_and_threads(pbmc, dask_client):
    import cloudpickle

    X, y, _ = _pbmc_task(pbmc, n_genes=20)
    est = _ThreadsSeen(
        n_layers=1, n_heads=2, max_epochs=2, n_threads=2, device="auto", random_state=0
    )
    futures = [dask_client.submit(_fit_on_worker, est, X, y, pure=False) for _ in range(2)]
    results = dask_client.gather(futures)
    for fitted, device, _ in results:
        assert device == ("cuda" if torch.cuda.is_available() else "cpu")
        assert fitted.threads_seen_ == [2]  # n_threads held during the whole fit
        assert "device" in fitted.get_params() and fitted.device == "auto"
    # a fitted estimator pickles (cloudpickle) with CPU weights and no open handles
    fitted = results[0][0]
    state = fitted.__getstate__()
    assert "module_" not in state and "_training_sample" not in state
    assert all(
        isinstance(v, np.ndarray) or v.device.type == "cpu" for v in state["_module_state"].values()
    )
    clone = cloudpickle.loads(cloudpickle.dumps(fitted))
    np.testing.assert_array_equal(clone.predict_proba(X), fitted.predict_proba(X))


# ----------------------------------------------------------------------------- 2. DDP (gloo)
def _ddp_fit(rank, world_size, init_file, out_dir, X, y, kw, dataset_kw):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        out = {}
        if dataset_kw is None:
            clf = TGEMClassifier(**kw).fit(X, y, checkpoint=Path(out_dir) / f"ckpt{rank}.tgem")
            out["seeded"] = _weights(clf.module_)
            out["history"] = clf.history_
            clf = TGEMClassifier(**dict(kw, random_state=None, max_epochs=1)).fit(X, y)
            out["unseeded"] = _weights(clf.module_)
            # after fit the module is free of DDP: gradients work without the other rank
            x = torch.as_tensor(X[:4] if rank == 0 else X[:1], dtype=torch.float32)
            x.requires_grad_(True)
            clf.module_(x).sum().backward()
            out["input_grad_finite"] = bool(torch.isfinite(x.grad).all())
            # distributed=False inside the group: an independent fit on this rank's own rows
            clf = TGEMClassifier(**dict(kw, distributed=False, max_epochs=1))
            out["opt_out"] = _weights(clf.fit(X[rank::2], y[rank::2]).module_)
        else:
            ds = _CountingDataset(X, **dataset_kw)
            clf = TGEMClassifier(**kw).fit(ds, y=y)
            out["seeded"] = _weights(clf.module_)
            out["reads"] = ds.reads
            out["history"] = clf.history_
        # fit released its DistributedDataParallel wrapper (left to the interpreter's final
        # collection, gloo's worker threads could abort the process at exit)
        out["ddp_alive"] = any(
            isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects()
        )
        with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(out, f)
    finally:
        tdist.destroy_process_group()


def _spawn_two(tmp_path, X, y, kw, dataset_kw=None):
    import torch.multiprocessing as mp

    mp.spawn(
        _ddp_fit,
        args=(2, str(tmp_path / "rendezvous"), str(tmp_path), X, y, kw, dataset_kw),
        nprocs=2,
        join=True,
    )
    return [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]


def test_two_gloo_processes_equal_one_process_with_twice_the_batch(pbmc, tmp_path):
    X, y, _ = _pbmc_task(pbmc, n_genes=40)
    X, y = X[:203], y[:203]  # 203 rows: a short last step, and rank 1 runs out first
    kw = dict(
        n_layers=2,
        n_heads=2,
        dropout=0.0,
        learning_rate=1e-3,
        max_epochs=3,
        class_weight="balanced",
        attention_backend="exact",
        # the 1e-6 bounds below are float32 summation order on these unstandardised inputs;
        # standardised DDP fits are tested in test_standardize (rank 0's statistics)
        standardize=False,
        n_threads=1,
        random_state=0,
    )
    ranks = _spawn_two(tmp_path, X, y, dict(kw, batch_size=8))
    torch.set_num_threads(1)
    single = _weights(TGEMClassifier(**dict(kw, batch_size=16)).fit(X, y).module_)
    assert _max_abs_diff(ranks[0]["seeded"], ranks[1]["seeded"]) == 0.0
    assert _max_abs_diff(ranks[0]["seeded"], single) <= 1e-6
    # random_state=None: rank 0's seeds are broadcast, so the ranks still agree
    assert _max_abs_diff(ranks[0]["unseeded"], ranks[1]["unseeded"]) == 0.0
    # both ranks log the same global-batch figures
    for h0, h1 in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert (h0["train_loss"], h0["train_accuracy"]) == (h1["train_loss"], h1["train_accuracy"])
    assert ranks[0]["input_grad_finite"] and ranks[1]["input_grad_finite"]
    for rank in range(2):  # distributed=False: no collective, each rank fits its own rows
        alone = TGEMClassifier(**dict(kw, batch_size=8, max_epochs=1)).fit(X[rank::2], y[rank::2])
        assert _max_abs_diff(ranks[rank]["opt_out"], _weights(alone.module_)) <= 1e-6
    assert _max_abs_diff(ranks[0]["opt_out"], ranks[1]["opt_out"]) > 1e-3
    assert not ranks[0]["ddp_alive"] and not ranks[1]["ddp_alive"]
    # only rank 0 writes files
    assert (tmp_path / "ckpt0.tgem").is_file() and not (tmp_path / "ckpt1.tgem").exists()


# ----------------------------------------------------------------------------- 3. .h5ad
class _CountingDataset(H5ADDataset):
    """Records which file rows every read touches, per epoch."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.reads = []

    def epoch_order(self, generator):
        self.reads.append([])
        return super().epoch_order(generator)

    def _read_block(self, start, stop):
        if self.reads:
            self.reads[-1].extend(range(start, stop))
        return super()._read_block(start, stop)


@pytest.mark.filterwarnings("ignore:X does not have valid feature names")
def test_h5ad_backed_fit_equals_in_memory_fit(sparse_h5ad):
    path, X, labels = sparse_h5ad
    kw = dict(
        n_layers=1,
        n_heads=2,
        dropout=0.2,
        learning_rate=1e-2,
        max_epochs=2,
        batch_size=64,
        random_state=0,
        n_threads=1,
    )
    # chunk_size=1 is a full row shuffle: identical to fitting the arrays
    in_memory = TGEMClassifier(**kw).fit(X, labels)
    streamed = TGEMClassifier(**kw).fit(H5ADDataset(path, chunk_size=1), y="cell_type")
    assert _max_abs_diff(_weights(in_memory.module_), _weights(streamed.module_)) == 0.0
    # the default chunk-shuffled order: from disk (path, backed AnnData) == from memory
    from_path = TGEMClassifier(**kw).fit(str(path), y="cell_type")
    backed = anndata.read_h5ad(path, backed="r")
    from_backed = TGEMClassifier(**kw).fit(backed, y="cell_type")
    from_memory = TGEMClassifier(**kw).fit(anndata.read_h5ad(path), y="cell_type")
    for other in (from_backed, from_memory):
        assert _max_abs_diff(_weights(from_path.module_), _weights(other.module_)) == 0.0
    assert list(from_path.feature_names_in_[:2]) == ["gene0", "gene1"]
    np.testing.assert_array_equal(from_path.predict_proba(path), from_path.predict_proba(X))
    assert from_path.score(path, labels) > 0.6
    backed.file.close()


@pytest.mark.filterwarnings("ignore:X does not have valid feature names")
def test_h5ad_dense_x_and_layers_stream_like_memory(sparse_h5ad, tmp_path):
    import pandas as pd
    import scipy.sparse as sp

    from tgem import dask as tdask

    _, X, labels = sparse_h5ad
    dense, lab = X[:300].toarray(), np.asarray(labels[:300])
    adata = anndata.AnnData(
        X=dense, obs=pd.DataFrame({"cell_type": lab}, index=[f"c{i}" for i in range(300)])
    )
    adata.layers["half"] = sp.csr_matrix(dense * 0.5)
    path = tmp_path / "dense.h5ad"
    adata.write_h5ad(path)
    kw = dict(
        n_layers=1,
        n_heads=2,
        dropout=0.1,
        learning_rate=1e-2,
        max_epochs=2,
        batch_size=32,
        random_state=0,
        n_threads=1,
    )
    for layer, values in ((None, dense), ("half", dense * 0.5)):
        in_memory = TGEMClassifier(**kw).fit(values, lab)
        streamed = TGEMClassifier(**kw).fit(
            H5ADDataset(path, layer=layer, chunk_size=1), y="cell_type"
        )
        assert _max_abs_diff(_weights(in_memory.module_), _weights(streamed.module_)) == 0.0
        lazy = tdask.from_h5ad(path, layer=layer, chunk_rows=64)
        np.testing.assert_array_equal(lazy.compute(), values)


def test_h5ad_two_processes_read_each_row_once_per_epoch(sparse_h5ad, tmp_path):
    path, X, labels = sparse_h5ad
    kw = dict(
        n_layers=1,
        n_heads=1,
        dropout=0.0,
        learning_rate=1e-2,
        max_epochs=2,
        batch_size=32,
        n_threads=1,
        random_state=0,
    )
    ranks = _spawn_two(
        tmp_path, str(path), "cell_type", kw, dataset_kw=dict(chunk_size=50, chunks_per_read=4)
    )
    n = X.shape[0]
    assert _max_abs_diff(ranks[0]["seeded"], ranks[1]["seeded"]) == 0.0
    assert not ranks[0]["ddp_alive"] and not ranks[1]["ddp_alive"]
    for epoch in range(kw["max_epochs"]):
        r0, r1 = (np.asarray(r["reads"][epoch]) for r in ranks)
        assert len(r0) > 0 and len(r1) > 0
        both = np.sort(np.concatenate([r0, r1]))
        np.testing.assert_array_equal(both, np.arange(n))  # once each, no row missed


def test_h5ad_dataloader_workers_open_their_own_handle(sparse_h5ad):
    import os

    path, X, _ = sparse_h5ad
    ds = _PidDataset(path)
    ds[0]  # the parent's handle is open before the workers fork
    loader = torch.utils.data.DataLoader(
        ds, batch_size=100, num_workers=2, multiprocessing_context="fork"
    )
    rows, pids = [], set()
    for batch, pid in loader:
        rows.append(batch.numpy())
        pids.update(pid.tolist())
    np.testing.assert_array_equal(np.concatenate(rows), X.toarray())
    assert len(pids) == 2 and os.getpid() not in pids


class _PidDataset(H5ADDataset):
    def __getitem__(self, key):
        row = super().__getitem__(key)
        if isinstance(key, (int, np.integer)):
            return row, self._pid  # the process that opened the handle used for the read
        return row


# ----------------------------------------------------------------------------- 4. Dask inference
def test_dask_probabilities_and_integrated_gradients_equal_local(pbmc, dask_client):
    import dask.array as da

    from tgem import dask as tdask
    from tgem.interpret import attribute

    X, y, _ = _pbmc_task(pbmc, n_genes=40)
    clf = TGEMClassifier(
        n_layers=1, n_heads=2, max_epochs=3, learning_rate=1e-2, n_threads=1, random_state=0
    ).fit(X, y)
    # the default standardisation travels inside the model: every worker uses fit's statistics
    assert clf.standardize and clf.module_.standardize
    DX = da.from_array(X, chunks=(50, -1))
    P = tdask.predict_proba(clf, DX)
    # the model is one scattered future, referenced by key: no task holds a copy
    tasks = [v for k, v in dict(P.__dask_graph__()).items() if "_proba_block" in str(k)]
    assert len(tasks) == len(DX.chunks[0])
    assert max(len(pickle.dumps(task)) for task in tasks) < len(pickle.dumps(clf)) / 4
    np.testing.assert_allclose(P.compute(), clf.predict_proba(X), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(tdask.predict(clf, DX).compute(), clf.predict(X))
    rows = slice(0, 60)
    A = tdask.attribute(clf, da.from_array(X[rows], chunks=(25, -1)), y=y[rows])
    np.testing.assert_allclose(A.compute(), attribute(clf, X[rows], y=y[rows]), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- errors
def test_distributed_true_without_a_process_group_says_how_to_launch(pbmc, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    X, y, _ = _pbmc_task(pbmc, n_genes=5)
    with pytest.raises(ValueError, match="torchrun"):
        TGEMClassifier(max_epochs=1, distributed=True).fit(X, y)


def test_h5ad_input_errors_name_the_fix(sparse_h5ad, tmp_path):
    import scipy.sparse as sp

    path, X, labels = sparse_h5ad
    with pytest.raises(ValueError, match="not an obs column.*cell_type"):
        TGEMClassifier(max_epochs=1).fit(path, y="celltype")
    with pytest.raises(ValueError, match="layer 'counts' is not in"):
        H5ADDataset(path, layer="counts")
    csc = tmp_path / "csc.h5ad"
    anndata.AnnData(X=sp.csc_matrix(X[:20])).write_h5ad(csc)
    with pytest.raises(ValueError, match="tocsr"):
        H5ADDataset(csc)
    clf = TGEMClassifier(n_layers=1, n_heads=1, max_epochs=1).fit(X[:50], labels[:50])
    narrow = tmp_path / "narrow.h5ad"
    anndata.AnnData(X=X[:10, :7]).write_h5ad(narrow)
    with pytest.raises(ValueError, match="same genes"):
        clf.predict(narrow)


# ----------------------------------------------------------------------------- the docs' recipes
_DOCS = Path(__file__).resolve().parents[1] / "docs"


def _documented_output(command: str) -> str:
    """The line that docs/scaling.rst shows under ``$ command``."""
    lines = (_DOCS / "scaling.rst").read_text().splitlines()
    at = [i for i, line in enumerate(lines) if line.strip() == f"$ {command}"]
    assert len(at) == 1, f"docs/scaling.rst shows no (or several) '$ {command}'"
    return lines[at[0] + 1].strip()


def _same_output(printed: str, documented: str, tol: float = 0.05) -> None:
    """Equal up to the floating-point figures, which may move a little between machines."""
    import re

    number = r"-?\d+\.\d+"
    assert re.sub(number, "#", printed) == re.sub(number, "#", documented), (printed, documented)
    for a, b in zip(re.findall(number, printed), re.findall(number, documented), strict=True):
        assert abs(float(a) - float(b)) <= tol, (printed, documented)


def test_scaling_recipes_run_as_written(tmp_path):
    """The four scripts of the "Scaling out" page, run with the commands it shows."""
    import os
    import shutil
    import subprocess

    for script in (_DOCS / "scaling").glob("*.py"):
        shutil.copy(script, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    for command in (
        "python fit_h5ad.py",
        "python infer_dask.py",
        "python search_dask.py",
        "torchrun --standalone --nproc_per_node=2 train_ddp.py",
    ):
        argv = command.split()
        argv = ([sys.executable] if argv[0] == "python" else torchrun) + argv[1:]
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr[-3000:]}"
        printed = [line for line in done.stdout.splitlines() if line.strip()]
        _same_output(printed[-1].strip(), _documented_output(command))
    assert (tmp_path / "pbmc_ddp.tgem").is_file()  # rank 0's checkpoint
