"""Bundled data and the file readers of tgem.datasets."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tgem.datasets import load_pbmc68k, read_expression_table, read_gmt, read_h5ad

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --- load_pbmc68k -------------------------------------------------------------------------


def test_load_pbmc68k_matches_the_shared_source_file():
    bunch = load_pbmc68k()
    with np.load(DATA / "pbmc68k_reduced.npz") as src:
        np.testing.assert_array_equal(bunch.data, src["X"])
        assert list(bunch.feature_names) == list(src["features"])
        assert list(bunch.target) == list(src["y_cell_type"])
        assert list(bunch.sample_names) == list(src["samples"])
    assert bunch.data.dtype == np.float32
    assert bunch.data.shape == (700, 765)
    assert bunch.frame is None


def test_load_pbmc68k_target_names_are_the_ten_sorted_cell_types():
    bunch = load_pbmc68k()
    assert len(bunch.target_names) == 10
    assert list(bunch.target_names) == sorted(set(bunch.target))
    counts = pd.Series(bunch.target).value_counts()
    assert counts["Dendritic"] == 240 and counts["CD4+/CD45RA+/CD25- Naive T"] == 8


def test_load_pbmc68k_descr_names_provenance_and_licence():
    descr = load_pbmc68k().DESCR
    for needle in ("10x Genomics", "Zheng", "scanpy", "BSD 3-Clause", "700 cells"):
        assert needle in descr


def test_load_pbmc68k_as_frame_labels_rows_and_columns():
    bunch = load_pbmc68k(as_frame=True)
    assert isinstance(bunch.data, pd.DataFrame)
    assert list(bunch.data.columns) == list(bunch.feature_names)
    assert list(bunch.data.index) == list(bunch.sample_names)
    assert bunch.target.name == "cell_type"
    assert bunch.frame.shape == (700, 766)
    assert (bunch.frame["cell_type"] == bunch.target).all()


def test_load_pbmc68k_return_x_y_and_fresh_arrays_each_call():
    X, y = load_pbmc68k(return_X_y=True)
    assert X.shape == (700, 765) and y.shape == (700,)
    X[:] = -1.0
    assert load_pbmc68k().data.min() == 0.0


def test_bundled_licence_file_ships_with_the_data():
    from importlib import resources

    text = resources.files("tgem.datasets.descr").joinpath("LICENSE_scanpy.txt").read_text()
    assert "BSD 3-Clause" in text and "Wolf" in text


# --- read_gmt -------------------------------------------------------------------------------


def test_read_gmt_reads_the_24_original_pathways_with_1708_genes():
    sets = read_gmt(DATA / "tgem_24_pathways.gmt")
    assert len(sets) == 24
    assert len({g for genes in sets.values() for g in genes}) == 1708
    assert list(sets)[0] == "Hypoxia"
    assert sets["Hypoxia"][:3] == ["FOS", "SERPINE1", "EFNA1"]


def test_read_gmt_skips_blank_lines_trailing_tabs_and_repeated_genes(tmp_path):
    path = tmp_path / "s.gmt"
    path.write_text("A\tdesc\tG1\tG2\t\n\nB\t\tG3\tG3\tG1\r\n")
    assert read_gmt(path) == {"A": ["G1", "G2"], "B": ["G3", "G1"]}


@pytest.mark.parametrize(
    "content, lineno",
    [
        ("A\tdesc\tG1\nB\tdesc only\n", 2),
        ("A desc G1 G2\n", 1),
        ("A\td\tG1\n\n\tdesc\tG2\n", 3),
    ],
)
def test_read_gmt_malformed_line_error_names_the_line(tmp_path, content, lineno):
    path = tmp_path / "bad.gmt"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"line {lineno} is not a GMT gene set"):
        read_gmt(path)


def test_read_gmt_repeated_set_name_is_refused(tmp_path):
    path = tmp_path / "dup.gmt"
    path.write_text("A\td\tG1\nA\td\tG2\n")
    with pytest.raises(ValueError, match="line 2 repeats the gene-set name 'A'"):
        read_gmt(path)


def test_read_gmt_non_utf8_file_is_a_clear_error(tmp_path):
    (tmp_path / "latin1.gmt").write_bytes(b"S\tdesc\tG\xe9NE\n")
    with pytest.raises(ValueError, match="not UTF-8 text.*re-save the file as UTF-8"):
        read_gmt(tmp_path / "latin1.gmt")


def test_read_gmt_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.gmt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no gene set"):
        read_gmt(tmp_path / "empty.gmt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_gmt(tmp_path / "nope.gmt")


# --- read_expression_table ------------------------------------------------------------------


@pytest.fixture
def small_frame():
    bunch = load_pbmc68k(as_frame=True)
    return bunch.data.iloc[:30, :12], bunch.target.iloc[:30]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".txt", ".csv.gz"])
def test_read_expression_table_round_trips_genes_as_columns(tmp_path, small_frame, suffix):
    X, y = small_frame
    path = tmp_path / f"expr{suffix}"
    X.join(y).to_csv(path, sep="," if ".csv" in suffix else "\t")
    bunch = read_expression_table(path, "cell_type")
    pd.testing.assert_frame_equal(
        bunch.data, X.astype(np.float64), check_names=False, check_exact=False, rtol=1e-6
    )
    assert bunch.target.tolist() == y.tolist()
    assert list(bunch.feature_names) == list(X.columns)
    assert list(bunch.sample_names) == list(X.index)


def test_read_expression_table_genes_as_rows_transposes_and_reads_label_row(tmp_path, small_frame):
    X, y = small_frame
    table = X.T.astype(object)
    table.loc["cell_type"] = y
    path = tmp_path / "bulk.tsv"
    table.to_csv(path, sep="\t")
    Xr, yr = read_expression_table(path, "cell_type", genes_as="rows", return_X_y=True)
    np.testing.assert_allclose(Xr.to_numpy(), X.to_numpy(), rtol=1e-6)
    assert list(Xr.columns) == list(X.columns)
    assert yr.tolist() == y.tolist()


def test_read_expression_table_without_labels_returns_none_target(tmp_path, small_frame):
    X, _ = small_frame
    X.to_csv(tmp_path / "x.csv")
    X2, y2 = read_expression_table(tmp_path / "x.csv", return_X_y=True)
    assert y2 is None and X2.shape == X.shape


def test_read_expression_table_unknown_label_column_lists_available(tmp_path, small_frame):
    X, y = small_frame
    X.join(y).to_csv(tmp_path / "x.csv")
    with pytest.raises(
        ValueError,
        match=r"label column 'celltype' is not in the columns.*"
        r"Did you mean 'cell_type'",
    ):
        read_expression_table(tmp_path / "x.csv", "celltype")
    X.T.to_csv(tmp_path / "rows.csv")
    with pytest.raises(ValueError, match="label column 'cell_type' is not in the rows"):
        read_expression_table(tmp_path / "rows.csv", "cell_type", genes_as="rows")


def test_read_expression_table_text_gene_column_is_refused(tmp_path, small_frame):
    X, y = small_frame
    X.join(y).to_csv(tmp_path / "x.csv")
    with pytest.raises(ValueError, match=r"1 gene column\(s\) are not numeric \('cell_type'\)"):
        read_expression_table(tmp_path / "x.csv")


def test_read_expression_table_duplicated_gene_names_are_refused(tmp_path):
    (tmp_path / "d.csv").write_text("id,G1,G2,G1\na,1,2,3\n")
    with pytest.raises(ValueError, match="names 1 gene.*'G1'"):
        read_expression_table(tmp_path / "d.csv")


def test_read_expression_table_missing_file_and_bad_orientation(tmp_path):
    with pytest.raises(FileNotFoundError, match="expression table"):
        read_expression_table(tmp_path / "none.csv")
    (tmp_path / "x.csv").write_text("id,G1\na,1\n")
    with pytest.raises(ValueError, match="genes_as must be"):
        read_expression_table(tmp_path / "x.csv", genes_as="diagonal")


def test_read_expression_table_does_not_touch_the_file(tmp_path, small_frame):
    X, y = small_frame
    path = tmp_path / "x.csv"
    X.join(y).to_csv(path)
    before = path.read_bytes()
    read_expression_table(path, "cell_type")
    assert path.read_bytes() == before


# --- read_h5ad ------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_read_h5ad_dense_and_sparse_with_categorical_labels(tmp_path, small_frame, sparse):
    anndata = pytest.importorskip("anndata")
    X, y = small_frame
    values = X.to_numpy()
    adata = anndata.AnnData(
        X=sp.csr_matrix(values) if sparse else values,
        obs=pd.DataFrame({"cell_type": pd.Categorical(y.to_numpy())}, index=X.index),
        var=pd.DataFrame(index=X.columns),
    )
    adata.layers["counts"] = np.rint(np.expm1(values) * 10)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    bunch = read_h5ad(path, "cell_type")
    assert sp.issparse(bunch.data) == sparse
    dense = bunch.data.toarray() if sparse else bunch.data
    np.testing.assert_array_equal(dense, values)
    assert list(bunch.target) == y.tolist()
    assert list(bunch.feature_names) == list(X.columns)
    assert list(bunch.sample_names) == list(X.index)
    counts, _ = read_h5ad(path, layer="counts", return_X_y=True)
    np.testing.assert_array_equal(counts, adata.layers["counts"])


def test_read_h5ad_unknown_obs_column_and_layer(tmp_path, small_frame):
    anndata = pytest.importorskip("anndata")
    X, y = small_frame
    adata = anndata.AnnData(
        X=X.to_numpy(), obs=pd.DataFrame({"cell_type": y.to_numpy()}, index=X.index)
    )
    adata.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(ValueError, match="label column 'louvain' is not in obs"):
        read_h5ad(tmp_path / "a.h5ad", "louvain")
    with pytest.raises(ValueError, match="layer 'counts' is not in"):
        read_h5ad(tmp_path / "a.h5ad", layer="counts")


def test_read_h5ad_without_anndata_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "anndata", None)
    with pytest.raises(ImportError, match=r'pip install "tgem\[anndata\]"'):
        read_h5ad(tmp_path / "a.h5ad")


def test_read_h5ad_garbage_file_is_a_clear_error(tmp_path):
    pytest.importorskip("anndata")
    (tmp_path / "bad.h5ad").write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="could not read .* as an AnnData"):
        read_h5ad(tmp_path / "bad.h5ad")
