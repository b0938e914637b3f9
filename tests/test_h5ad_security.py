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

from tests._fuzz import limit_memory, run_in_fork
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
        ("X/indices", ("replace", np.full(120, 50_000_000, ">i4")), r"column index 50000000"),
        ("X/indices", ("replace", np.full(120, -7, ">i8")), r"column index -7"),
        ("X/indices", ("replace", np.full(120, 2**64 - 1, ">u8")), r"column index 1844674"),
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


def test_read_h5ad_checks_declared_shapes_before_anndata_allocates_them(tmp_path):
    from tgem.datasets import read_h5ad

    for fmt, attrs, pattern in (
        ("csr", [2**31 - 1, N_GENES], r"\(/X\).*says 2147483647 rows.*41 entries"),
        ("csc", [N_CELLS, 2**31 - 1], r"\(/X\).*says 2147483647 columns.*7 entries"),
    ):
        path = _write(tmp_path / f"{fmt}.h5ad", sp.random(N_CELLS, N_GENES, 0.5, fmt, np.float32))
        with h5py.File(path, "r+") as f:
            f["X"].attrs["shape"] = np.asarray(attrs)

        def call(path=path):
            limit_memory(2 << 30)  # before the fix, anndata asked for 8 GiB here
            read_h5ad(path)

        outcome = run_in_fork(_refused(call, pattern), b"", timeout=120)
        assert outcome == "ok", (fmt, outcome)


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
    import tgem._h5ad_checks

    path = _write(tmp_path / "wide.h5ad")
    width = 5000  # the cap is lowered below so that the test file stays small
    with h5py.File(path, "r+") as f:
        names = np.array([f"g{j}".encode() for j in range(N_GENES)], dtype=f"S{width}")
        attrs = dict(f["var/_index"].attrs)
        del f["var/_index"]
        f["var/_index"] = names
        f["var/_index"].attrs.update(attrs)
    monkeypatch.setattr(tgem._h5ad_checks, "MAX_STRING_BYTES", 4096)
    with pytest.raises(ValueError, match=r"wide\.h5ad.*var/_index.*5000 bytes.*4096"):
        H5ADDataset(path)


def test_in_memory_anndata_with_bad_indices_is_refused(tmp_path):
    X = sp.random(N_CELLS, N_GENES, density=0.5, format="csr", dtype=np.float32, random_state=0)
    X.indices[:] = 50_000_000  # what anndata.read_h5ad returns for a crafted file
    adata = _adata(X)

    def call():
        TGEMClassifier(max_epochs=1, n_threads=1).fit(adata, "cell_type")

    assert run_in_fork(_refused(call, r"column index 50000000"), b"", timeout=120) == "ok"


def test_a_file_that_is_not_hdf5_is_a_clear_error(tmp_path):
    path = tmp_path / "text.h5ad"
    path.write_text("cell,gene\n")
    with pytest.raises(ValueError, match=r"could not open .*text\.h5ad.* as an \.h5ad"):
        H5ADDataset(path)


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


# ----------------------------------------------------------------------------- fuzzing
#: Values that break naive index arithmetic: off-by-one, sign, int32 and int64 limits.
_NASTY = [-(2**63), -(2**31), -3_000_000, -1, 0, 1, 5, 39, 40, 41, 2**31 - 1, 2**62, 50_000_000]
_FUZZ_SECONDS = float(os.environ.get("TGEM_FUZZ_SECONDS", "150"))


def _nasty(rng, n=None):
    values = np.array(_NASTY, dtype=np.int64)
    return rng.choice(values) if n is None else rng.choice(values, size=n)


def _replace(f, key, value, attrs=True):
    kept = dict(f[key].attrs) if attrs and key in f else {}
    if key in f:
        del f[key]
    f[key] = value
    f[key].attrs.update(kept)


def _mutate_h5(path, rng) -> str:
    """One random structural mutation of the file, through h5py; returns what it did."""
    with h5py.File(path, "r+") as f:
        sparse = isinstance(f["X"], h5py.Group)
        kind = rng.choice(
            ["indices", "indptr", "data", "shape", "encoding", "codes", "var", "obs", "delete"]
            if sparse
            else ["dense", "codes", "var", "obs", "delete"]
        )
        if kind == "indices":
            values = f["X/indices"][...].astype(np.int64)
            at = rng.integers(len(values), size=rng.integers(1, 4))
            values[at] = _nasty(rng, len(at))
            dtype = rng.choice(["int32", "int64", "uint64", "float32"])
            _replace(f, "X/indices", values.astype(dtype))
            return f"indices[{at.tolist()}] = {values[at].tolist()} as {dtype}"
        if kind == "indptr":
            values = f["X/indptr"][...].astype(np.int64)
            how = rng.choice(["set", "shorter", "longer", "reverse", "uint64", "float"])
            if how == "set":
                at = int(rng.integers(len(values)))
                values[at] = _nasty(rng)
                out, what = values, f"indptr[{at}] = {values[at]}"
            elif how == "shorter":
                out, what = values[: int(rng.integers(len(values)))], "indptr shortened"
            elif how == "longer":
                out, what = np.r_[values, values[-1]], "indptr lengthened"
            elif how == "reverse":
                out, what = values[::-1].copy(), "indptr reversed"
            elif how == "uint64":
                out = values.astype(np.uint64)
                out[int(rng.integers(len(out)))] = np.uint64(2**64 - 5)
                what = "indptr uint64 near 2**64"
            else:
                out, what = values.astype(np.float64) + 0.5, "indptr float"
            _replace(f, "X/indptr", out)
            return what
        if kind == "data":
            values = f["X/data"][...].astype(np.float64)
            how = rng.choice(["special", "length", "strings", "2d"])
            if how == "special":
                at = int(rng.integers(len(values)))
                values[at] = rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e300, 1e16])
                _replace(f, "X/data", values)
                return f"data[{at}] = {values[at]}"
            if how == "length":
                n = int(rng.integers(0, 2 * len(values)))
                _replace(f, "X/data", np.resize(values, n))
                return f"data of length {n}"
            if how == "strings":
                _replace(f, "X/data", values.astype("S8"))
                return "data as strings"
            _replace(f, "X/data", np.resize(values, (len(values), 2)))
            return "data two-dimensional"
        if kind == "shape":
            shapes = [
                np.array([_nasty(rng), N_GENES]),
                np.array([N_CELLS, _nasty(rng)]),
                np.array([N_CELLS, N_GENES, 1]),
                np.array([N_CELLS + 0.5, N_GENES]),
                np.array(["40", "6"], dtype="S2"),
                np.array([N_CELLS]),
            ]
            shape = shapes[int(rng.integers(len(shapes)))]
            f["X"].attrs["shape"] = shape
            return f"shape attribute {shape!r}"
        if kind == "encoding":
            value = str(rng.choice(["csc_matrix", "dense", "", "csr_matrix ", "array"]))
            f["X"].attrs["encoding-type"] = value
            return f"X encoding-type {value!r}"
        if kind == "codes":
            codes = f["obs/cell_type/codes"][...].astype(np.int64)
            at = int(rng.integers(len(codes)))
            codes[at] = int(rng.choice([-2, 2, 127, -128, 2**40]))
            dtype = rng.choice(["int8", "int64", "float32"])
            _replace(f, "obs/cell_type/codes", codes.astype(dtype))
            return f"codes[{at}] = {codes[at]} as {dtype}"
        if kind == "var":
            how = rng.choice(["shorter", "longer", "wide"])
            names = np.array([f"g{j}".encode() for j in range(N_GENES)])
            if how == "shorter":
                names = names[: int(rng.integers(N_GENES))]
            elif how == "longer":
                names = np.r_[names, names]
            else:
                names = names.astype("S70000")
            _replace(f, "var/_index", names)
            return f"var/_index {how}"
        if kind == "obs":
            n = int(rng.integers(0, 2 * N_CELLS))
            _replace(f, "obs/cell_type/codes", (np.arange(n) % 2).astype(np.int8))
            return f"obs codes of length {n}"
        if kind == "dense":
            how = rng.choice(["special", "rank", "strings"])
            values = f["X"][...].astype(np.float64)
            if how == "special":
                values.flat[int(rng.integers(values.size))] = rng.choice([np.nan, np.inf, 1e30])
                _replace(f, "X", values)
            elif how == "rank":
                _replace(f, "X", values[..., None])
            else:
                _replace(f, "X", values.astype("S4"))
            return f"dense X {how}"
        names = []
        f.visit(names.append)
        victim = str(rng.choice(names))
        del f[victim]
        return f"deleted {victim}"


def _storage_ranges(path) -> list[tuple[int, int]]:
    """File offsets of the contiguous datasets' bytes (the arrays, not HDF5's own metadata)."""
    ranges = []
    with h5py.File(path, "r") as f:

        def visit(_, obj):
            if isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None:
                ranges.append((obj.id.get_offset(), obj.id.get_storage_size()))

        f.visititems(visit)
    return [(start, size) for start, size in ranges if size]


def _flip_bytes(data: bytes, ranges, rng) -> tuple[bytes, str]:
    mutated = bytearray(data)
    flips = []
    for _ in range(int(rng.integers(1, 9))):
        start, size = ranges[int(rng.integers(len(ranges)))]
        at = start + int(rng.integers(size))
        mutated[at] ^= 1 << int(rng.integers(8))
        flips.append(at)
    return bytes(mutated), f"bit flips at offsets {flips}"


@pytest.mark.slow
def test_fuzz_h5ad_readers_never_crash(tmp_path):
    """Random mutations of small valid files, read, fitted on and predicted from in a forked
    worker: a Python exception is a refusal (fine); a crash, a hang or a ``MemoryError`` (an
    allocation the file asked for) fails the test.

    Structural mutations go through h5py (indices, indptr, shape attributes, dtypes, encodings,
    categorical codes, obs/var lengths, string widths, deleted elements); raw bit flips hit
    the datasets' stored bytes. Flips in HDF5's own metadata (B-trees, object headers) test
    libhdf5, which tgem trusts to parse the container (see the security page), not tgem.
    Seeded; stops after ``TGEM_FUZZ_SECONDS`` (150 s by default).
    """
    import time

    from tests._fuzz import ForkWorker, is_failure, limit_memory
    from tgem.datasets import read_h5ad

    sources = {
        "csr": _write(tmp_path / "csr.h5ad"),
        "dense": _write(
            tmp_path / "dense.h5ad",
            np.abs(np.random.default_rng(2).normal(size=(N_CELLS, N_GENES))).astype(np.float32),
        ),
    }
    model = TGEMClassifier(n_layers=1, n_heads=1, max_epochs=1, n_threads=1, random_state=0)
    model.fit(sources["csr"], "cell_type")
    work = tmp_path / "work"
    work.mkdir()

    def exercise(data: bytes):
        path = work / f"case{os.getpid()}.h5ad"
        path.write_bytes(data)
        outcomes = []
        for step in (
            lambda: H5ADDataset(path)[:],
            lambda: H5ADDataset(path, chunk_size=3, chunks_per_read=2).mean(),
            lambda: model.predict_proba(path),
            lambda: TGEMClassifier(
                n_layers=1, n_heads=1, max_epochs=1, n_threads=1, batch_size=7
            ).fit(path, "cell_type"),
            lambda: _dense_of(read_h5ad(path, "cell_type").data),
        ):
            try:
                step()
                outcomes.append("ok")
            except (ValueError, KeyError, TypeError, OSError, IndexError) as exc:
                outcomes.append(type(exc).__name__)
        return outcomes

    rng = np.random.default_rng(20261207)
    ranges = {name: _storage_ranges(path) for name, path in sources.items()}
    failures, cases, deadline = [], 0, time.monotonic() + _FUZZ_SECONDS
    # 2 GiB of address space: an allocation a crafted file asks for is a MemoryError (a
    # failure below: sizes must be checked before allocating), not an OOM kill
    with ForkWorker(exercise, timeout=60, setup=lambda: limit_memory(2 << 30)) as worker:
        while time.monotonic() < deadline:
            name = "csr" if rng.random() < 0.7 else "dense"
            case = tmp_path / "case.h5ad"
            case.write_bytes(sources[name].read_bytes())
            if rng.random() < 0.25:
                data, what = _flip_bytes(case.read_bytes(), ranges[name], rng)
            else:
                what = _mutate_h5(case, rng)
                data = case.read_bytes()
            outcome = worker(data)
            cases += 1
            if is_failure(outcome) or outcome == "exception:MemoryError":
                failures.append(f"{name}: {what} -> {outcome}")
    assert cases >= 50, f"only {cases} cases ran in {_FUZZ_SECONDS} s"
    assert not failures, f"{len(failures)} of {cases} mutated files crashed or hung:\n" + "\n".join(
        failures[:20]
    )


def _dense_of(X):
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def test_read_expression_table_refuses_an_index_col_outside_the_table(tmp_path):
    from tgem.datasets import read_expression_table

    path = tmp_path / "t.csv"
    path.write_text("cell,A,B\nc1,1,2\nc2,3,4\n")
    for index_col, pattern in (
        (10, r"index_col=10 .*t\.csv' has 3 columns"),
        (-5, r"index_col=-5 .*3 columns"),
        ("nope", r"index_col='nope' .*'cell', 'A', 'B'"),
    ):
        with pytest.raises(ValueError, match=pattern):
            read_expression_table(path, index_col=index_col)
    assert read_expression_table(path, index_col=-3).data.index.tolist() == ["c1", "c2"]
