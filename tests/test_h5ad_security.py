""".h5ad files are untrusted input: crafted structure is refused with a clear error, never a
crash, and their values get the checks arrays get (issue 24, items 1 and 7).

Calls that crashed the process before the fix (SIGSEGV, glibc abort) run in a forked child
(``tests._fuzz.run_in_fork``) or a subprocess, so that a regression fails the test instead of
killing the test run.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tests._fuzz import run_in_fork
from tgem import H5ADDataset, TGEMClassifier

anndata = pytest.importorskip("anndata")
h5py = pytest.importorskip("h5py")

N_CELLS, N_GENES = 40, 6


def _adata(X=None) -> "anndata.AnnData":
    rng = np.random.default_rng(0)
    if X is None:
        X = sp.random(N_CELLS, N_GENES, density=0.5, format="csr", dtype=np.float32, random_state=0)
    labels = pd.Categorical(np.array(["a", "b"])[rng.permutation(N_CELLS) % 2])
    return anndata.AnnData(
        X=X,
        obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(N_CELLS)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]),
    )


def _write(path, X=None):
    _adata(X).write_h5ad(path)
    return path


def _set(path, key, value):
    """Overwrite dataset ``key`` of the file (same shape), or replace it when ``value`` is a
    dataset of another shape or dtype (``("replace", array)``)."""
    with h5py.File(path, "r+") as f:
        if isinstance(value, tuple) and value[0] == "replace":
            del f[key]
            f[key] = value[1]
        else:
            f[key][...] = value


def _fit(path):
    TGEMClassifier(n_layers=1, n_heads=1, max_epochs=1, n_threads=1).fit(path, "cell_type")


def _refused(func, pattern):
    """A function for run_in_fork: ``func()`` must raise ValueError matching ``pattern``."""

    def check(_):
        with pytest.raises(ValueError, match=pattern):
            func()

    return check


# ----------------------------------------------------------------------------- item 1: CSR
@pytest.mark.parametrize("index", [50_000_000, -3_000_000])
def test_out_of_range_csr_indices_are_refused_by_fit_not_a_crash(tmp_path, index):
    path = _write(tmp_path / "bad.h5ad")
    _set(path, "X/indices", index)
    pattern = rf"bad\.h5ad.*column index {index}.*{N_GENES} columns"
    assert run_in_fork(_refused(lambda: _fit(path), pattern), b"", timeout=120) == "ok"


def test_out_of_range_csr_indices_are_refused_by_predict_and_readers(tmp_path):
    good = _write(tmp_path / "good.h5ad")
    path = _write(tmp_path / "bad.h5ad")
    with h5py.File(path, "r+") as f:
        indices = f["X/indices"][...]
        indices[len(indices) // 2] = 50_000_000
        f["X/indices"][...] = indices
    clf = TGEMClassifier(n_layers=1, n_heads=1, max_epochs=1, n_threads=1).fit(good, "cell_type")
    pattern = r"column index 50000000"
    for call in (
        lambda: clf.predict(path),
        lambda: H5ADDataset(path)[:],
        lambda: H5ADDataset(path).mean(),
        lambda: __import__("tgem.datasets").datasets.read_h5ad(path),
    ):
        assert run_in_fork(_refused(call, pattern), b"", timeout=120) == "ok"


def test_cli_predict_refuses_a_crafted_h5ad_with_exit_2(tmp_path):
    good = _write(tmp_path / "good.h5ad")
    model = tmp_path / "model.tgem"
    clf = TGEMClassifier(n_layers=1, n_heads=1, max_epochs=1, n_threads=1).fit(good, "cell_type")
    clf.save(model)
    bad = _write(tmp_path / "bad.h5ad")
    _set(bad, "X/indices", -3_000_000)
    run = subprocess.run(
        [sys.executable, "-c", "from tgem.cli import main; raise SystemExit(main())"]
        + ["predict", str(model), str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert "column index -3000000" in run.stderr and "Traceback" not in run.stderr


def test_crafted_csc_is_refused_by_read_h5ad_before_conversion(tmp_path):
    path = _write(tmp_path / "csc.h5ad", sp.random(N_CELLS, N_GENES, 0.5, "csc", np.float32, 0))
    _set(path, "X/indices", 50_000_000)
    call = lambda: __import__("tgem.datasets").datasets.read_h5ad(path)  # noqa: E731
    assert run_in_fork(_refused(call, r"row index 50000000.*40 rows"), b"", timeout=120) == "ok"


@pytest.mark.parametrize(
    "key, value, pattern",
    [
        ("X/indptr", ("replace", np.arange(N_CELLS, dtype=np.int64)), r"indptr has 40 entries"),
        ("X/indptr", ("replace", np.r_[5, np.full(N_CELLS, 120)]), r"indptr starts at 5"),
        ("X/indptr", ("replace", np.r_[0, np.full(N_CELLS, 10**9)]), r"indptr ends at 1000000000"),
        (
            "X/indptr",
            ("replace", np.r_[0, 80, np.full(N_CELLS - 2, 40), 120]),
            r"decreas",
        ),
        ("X/indptr", ("replace", np.linspace(0, 120, N_CELLS + 1)), r"indptr.*float64.*integer"),
        ("X/indices", ("replace", np.zeros(120, dtype=np.float32)), r"indices.*float32.*integer"),
        ("X/indices", ("replace", np.zeros(7, dtype=np.int32)), r"indices.*7.*data.*120"),
        ("X/data", ("replace", np.array(["x"] * 120, dtype="S1")), r"data.*\|S1.*numbers"),
        ("X/indptr", ("replace", np.zeros((N_CELLS + 1, 2), dtype=np.int64)), r"one-dim"),
    ],
)
def test_inconsistent_csr_structure_is_refused(tmp_path, key, value, pattern):
    path = _write(tmp_path / "bad.h5ad")
    with h5py.File(path, "r+") as f:
        assert f["X/data"].shape == (120,)  # the patterns above assume 120 stored values
    _set(path, key, value)
    check = _refused(lambda: H5ADDataset(path)[:], rf"bad\.h5ad.*{pattern}")
    assert run_in_fork(check, b"", timeout=120) == "ok"


@pytest.mark.parametrize(
    "shape, pattern",
    [
        ((N_CELLS + 5, N_GENES), r"shape attribute says 45 rows.*indptr.*40"),
        ((N_CELLS, N_GENES + 3), r"9 columns.*var.*6 genes"),
        ((N_CELLS, N_GENES, 2), r"shape attribute .* two non-negative integers"),
        ((-1, N_GENES), r"shape attribute .* two non-negative integers"),
    ],
)
def test_declared_shape_must_match_the_arrays(tmp_path, shape, pattern):
    path = _write(tmp_path / "bad.h5ad")
    with h5py.File(path, "r+") as f:
        f["X"].attrs["shape"] = np.asarray(shape)
    check = _refused(lambda: H5ADDataset(path)[:], pattern)
    assert run_in_fork(check, b"", timeout=120) == "ok"


def test_dense_x_of_wrong_rank_or_dtype_is_refused(tmp_path):
    for value, pattern in (
        (np.zeros((N_CELLS, N_GENES, 2), np.float32), r"3 dimensions.*two"),
        (np.array([["x"] * N_GENES] * N_CELLS, dtype="S1"), r"\|S1.*numbers"),
    ):
        path = _write(tmp_path / "dense.h5ad", np.zeros((N_CELLS, N_GENES), np.float32))
        _set(path, "X", ("replace", value))
        with pytest.raises(ValueError, match=pattern):
            H5ADDataset(path)


def test_var_of_another_length_than_x_is_refused(tmp_path):
    path = _write(tmp_path / "dense.h5ad", np.zeros((N_CELLS, N_GENES + 2), np.float32)[:, :-2])
    with h5py.File(path, "r+") as f:
        del f["X"]
        f["X"] = np.zeros((N_CELLS, N_GENES + 2), np.float32)
    with pytest.raises(ValueError, match=r"8 columns.*var.*6 genes"):
        H5ADDataset(path)


def test_categorical_codes_out_of_range_are_refused_naming_the_column(tmp_path):
    path = _write(tmp_path / "bad.h5ad")
    with h5py.File(path, "r+") as f:
        codes = f["obs/cell_type/codes"][...]
        codes[3] = 100
        f["obs/cell_type/codes"][...] = codes
    with pytest.raises(ValueError, match=r"bad\.h5ad.*'cell_type'.*code 100.*2 categories"):
        H5ADDataset(path).obs_column("cell_type")
    with pytest.raises(ValueError, match=r"code 100"):
        TGEMClassifier(max_epochs=1).fit(path, "cell_type")


def test_obs_column_of_another_length_than_x_is_refused(tmp_path):
    path = _write(tmp_path / "bad.h5ad")
    with h5py.File(path, "r+") as f:
        del f["obs/cell_type"]
        f["obs/cell_type"] = np.array(["a", "b"] * 10, dtype=object).astype("S1")
        f["obs/cell_type"].attrs["encoding-type"] = "array"
        f["obs/cell_type"].attrs["encoding-version"] = "0.2.0"
    with pytest.raises(ValueError, match=r"'cell_type' has 20 values.*40 rows"):
        H5ADDataset(path).obs_column("cell_type")


def test_absurdly_wide_strings_are_refused_before_they_are_read(tmp_path, monkeypatch):
    import tgem._h5ad

    path = _write(tmp_path / "wide.h5ad")
    width = 5000  # the cap is lowered below so that the test file stays small
    with h5py.File(path, "r+") as f:
        names = np.array([f"g{j}".encode() for j in range(N_GENES)], dtype=f"S{width}")
        attrs = dict(f["var/_index"].attrs)
        del f["var/_index"]
        f["var/_index"] = names
        f["var/_index"].attrs.update(attrs)
    monkeypatch.setattr(tgem._h5ad, "MAX_STRING_BYTES", 4096)
    with pytest.raises(ValueError, match=r"wide\.h5ad.*var/_index.*5000 bytes.*4096"):
        H5ADDataset(path)


def test_in_memory_anndata_with_bad_indices_is_refused(tmp_path):
    X = sp.random(N_CELLS, N_GENES, density=0.5, format="csr", dtype=np.float32, random_state=0)
    X.indices[:] = 50_000_000  # what anndata.read_h5ad returns for a crafted file
    adata = _adata(X)

    def call():
        TGEMClassifier(max_epochs=1, n_threads=1).fit(adata, "cell_type")

    assert run_in_fork(_refused(call, r"column index 50000000"), b"", timeout=120) == "ok"


def test_valid_files_still_stream_exactly(tmp_path):
    X = sp.random(N_CELLS, N_GENES, density=0.5, format="csr", dtype=np.float32, random_state=0)
    path = _write(tmp_path / "good.h5ad", X)
    np.testing.assert_array_equal(H5ADDataset(path)[:], X.toarray())
    empty_rows = X.tolil()
    empty_rows[5:9] = 0
    path = _write(tmp_path / "empty_rows.h5ad", sp.csr_matrix(empty_rows))
    np.testing.assert_array_equal(H5ADDataset(path)[3:12], empty_rows.toarray()[3:12])


# ----------------------------------------------------------------------------- item 7: values
@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
@pytest.mark.parametrize(
    "value, pattern",
    [
        (np.nan, r"Input X contains NaN"),
        (np.inf, r"Input X contains infinity"),
        (1e20, r"X contains values as large as 1e\+20.*below 1e\+15"),
    ],
    ids=["nan", "inf", "large"],
)
def test_h5ad_values_get_the_checks_arrays_get(tmp_path, sparse, value, pattern):
    X = np.abs(np.random.default_rng(1).normal(size=(N_CELLS, N_GENES))).astype(np.float64)
    X[37, 2] = value
    with pytest.raises(ValueError, match=pattern):  # the array path's message
        TGEMClassifier(max_epochs=1).fit(X, np.arange(N_CELLS) % 2)
    path = _write(tmp_path / "values.h5ad", sp.csr_matrix(X) if sparse else X)
    where = re.escape("values.h5ad")
    with pytest.raises(ValueError, match=rf"{where}.*row 37: {pattern}"):
        _fit(path)
    clf = TGEMClassifier(n_layers=1, n_heads=1, max_epochs=1, n_threads=1)
    clf.fit(np.nan_to_num(X, posinf=0.0, nan=0.0, copy=True).clip(max=10), np.arange(N_CELLS) % 2)
    with pytest.raises(ValueError, match=rf"{where}.*{pattern}"):
        clf.predict(path)
    with pytest.raises(ValueError, match=pattern):  # an in-memory AnnData too
        _fit(_adata(sp.csr_matrix(X) if sparse else X))


# ----------------------------------------------------------------------------- other readers
def test_readers_refuse_what_is_not_a_regular_file(tmp_path):
    from tgem.datasets import read_expression_table, read_gmt, read_h5ad

    fifo = tmp_path / "pipe.gmt"
    os.mkfifo(fifo)
    link = tmp_path / "zero.csv"
    link.symlink_to("/dev/zero")
    for reader in (read_gmt, read_expression_table, read_h5ad, H5ADDataset):
        for path in (fifo, link):  # these would hang, or read forever

            def call(_, reader=reader, path=path):
                with pytest.raises((ValueError, FileNotFoundError), match="not a regular file"):
                    reader(path)

            assert run_in_fork(call, b"", timeout=30) == "ok", (reader.__name__, path.name)


def test_read_gmt_refuses_absurd_lines_and_files(tmp_path, monkeypatch):
    import tgem.datasets._readers as readers
    from tgem.datasets import read_gmt

    path = tmp_path / "long.gmt"
    path.write_text("OK\tdesc\tA\tB\nLONG\tdesc\t" + "\t".join(f"G{i}" for i in range(400)) + "\n")
    monkeypatch.setattr(readers, "MAX_GMT_LINE_BYTES", 1000)
    with pytest.raises(ValueError, match=r"long\.gmt: line 2 is longer than 1000 bytes"):
        read_gmt(path)
    monkeypatch.setattr(readers, "MAX_GMT_BYTES", 100)
    with pytest.raises(ValueError, match=r"long\.gmt is \d+ bytes.*100 bytes"):
        read_gmt(path)


def test_read_gmt_utf8_error_gives_the_file_offset(tmp_path):
    from tgem.datasets import read_gmt

    path = tmp_path / "latin.gmt"
    path.write_bytes(b"A\td\tX\tY\nB\td\tZ\xe9\n")
    with pytest.raises(ValueError, match=r"byte 0xe9 at offset 13"):
        read_gmt(path)
