"""GeneSetSelector, align_genes and the raw-counts check."""

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tests._reliability import unchanged
from tgem._alignment import GeneAlignment, align_genes
from tgem._gene_sets import GeneSetSelector
from tgem._scale import RawCountsWarning, check_log_scale
from tgem.datasets import load_pbmc68k, read_gmt

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GMT = DATA / "tgem_24_pathways.gmt"


@pytest.fixture(scope="module")
def pbmc():
    return load_pbmc68k(as_frame=True)


@pytest.fixture
def frame():
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.random((6, 5)), columns=["G3", "G1", "G5", "G2", "G4"])


# --- GeneSetSelector ------------------------------------------------------------------------


def test_selector_keeps_set_genes_in_data_order(frame):
    sel = GeneSetSelector({"a": ["G2", "G3"], "b": ["G1"]}).fit(frame)
    assert sel.get_feature_names_out().tolist() == ["G3", "G1", "G2"]
    np.testing.assert_array_equal(sel.transform(frame), frame[["G3", "G1", "G2"]].to_numpy())
    assert sel.support_.tolist() == [True, True, False, True, False]
    assert sel.n_features_in_ == 5
    assert list(sel.feature_names_in_) == list(frame.columns)


def test_selector_order_does_not_depend_on_gene_set_order(frame):
    a = GeneSetSelector({"x": ["G4", "G1"], "y": ["G3"]}).fit(frame)
    b = GeneSetSelector({"y": ["G3"], "x": ["G1", "G4"]}).fit(frame)
    assert a.get_feature_names_out().tolist() == b.get_feature_names_out().tolist()


def test_selector_reports_missing_genes_by_attribute_and_logged_warning(frame, caplog):
    with caplog.at_level(logging.WARNING, logger="tgem._gene_sets"):
        sel = GeneSetSelector({"a": ["G1", "NOPE1"], "b": ["NOPE2", "G2"]}).fit(frame)
    assert sel.missing_genes_.tolist() == ["NOPE1", "NOPE2"]
    assert "2 of the 4 genes" in caplog.text and "NOPE1" in caplog.text
    assert sel.coverage_.loc["a", "n_found"] == 1
    assert sel.coverage_.loc["b", "fraction_found"] == 0.5


def test_selector_without_missing_genes_logs_nothing(frame, caplog):
    with caplog.at_level(logging.WARNING, logger="tgem._gene_sets"):
        sel = GeneSetSelector(["G1", "G2"]).fit(frame)
    assert sel.missing_genes_.size == 0 and caplog.text == ""


def test_selector_on_arrays_uses_feature_names(frame):
    sel = GeneSetSelector(["G5", "G3"], feature_names=list(frame.columns))
    out = sel.fit_transform(frame.to_numpy())
    np.testing.assert_array_equal(out, frame[["G3", "G5"]].to_numpy())
    assert sel.get_feature_names_out().tolist() == ["G3", "G5"]
    assert not hasattr(sel, "feature_names_in_")


def test_selector_on_sparse_input_stays_sparse(frame):
    sel = GeneSetSelector(["G1", "G4"], feature_names=list(frame.columns))
    out = sel.fit_transform(sp.csr_matrix(frame.to_numpy()))
    assert sp.issparse(out)
    np.testing.assert_allclose(out.toarray(), frame[["G1", "G4"]].to_numpy())


def test_selector_array_without_names_is_a_clear_error(frame):
    with pytest.raises(ValueError, match="needs gene names.*feature_names="):
        GeneSetSelector(["G1"]).fit(frame.to_numpy())
    with pytest.raises(ValueError, match="feature_names has 2 names but X has 5 columns"):
        GeneSetSelector(["G1"], feature_names=["G1", "G2"]).fit(frame.to_numpy())


@pytest.mark.parametrize(
    "gene_sets, message",
    [
        ({}, "empty mapping"),
        ([], "holds no gene"),
        ({"a": ["G1"], "empty": []}, "gene set 'empty' is empty"),
    ],
)
def test_selector_empty_gene_sets_are_refused(frame, gene_sets, message):
    with pytest.raises(ValueError, match=message):
        GeneSetSelector(gene_sets).fit(frame)


def test_selector_no_overlap_explains_identifier_mismatch(frame):
    with pytest.raises(ValueError, match="none of the 2 genes.*same kind of identifiers"):
        GeneSetSelector(["ENSG0001", "ENSG0002"]).fit(frame)


def test_selector_duplicated_selected_gene_is_refused():
    X = pd.DataFrame(np.ones((2, 3)), columns=["G1", "G1", "G2"])
    with pytest.raises(ValueError, match="(?s)unique column names.*G1"):  # scikit-learn's check
        GeneSetSelector(["G1"]).fit(X)
    with pytest.raises(ValueError, match="more than one column.*G1"):
        GeneSetSelector(["G1"], feature_names=X.columns).fit(X.to_numpy())


def test_selector_transform_checks_columns_against_fit(frame):
    sel = GeneSetSelector(["G1"]).fit(frame)
    with pytest.raises(ValueError, match="feature names"):
        sel.transform(frame[frame.columns[::-1]])


def test_selector_reads_a_gmt_path_and_selects_the_original_genes(pbmc):
    sel = GeneSetSelector(str(GMT)).fit(pbmc.data)
    union = {g for genes in read_gmt(GMT).values() for g in genes}
    kept = set(sel.get_feature_names_out())
    assert kept == union & set(pbmc.data.columns)
    assert len(sel.missing_genes_) == len(union - set(pbmc.data.columns))
    assert sel.coverage_.shape == (24, 3)


def test_selector_clone_keeps_parameters_and_does_not_modify_inputs(frame):
    sets = {"a": ["G1", "G2"]}
    before = frame.copy()
    sel = GeneSetSelector(sets)
    sel.fit_transform(frame)
    pd.testing.assert_frame_equal(frame, before)
    assert sets == {"a": ["G1", "G2"]}
    assert clone(sel).get_params() == {"gene_sets": sets, "feature_names": None}


def test_selector_set_output_pandas_keeps_gene_columns(frame):
    sel = GeneSetSelector(["G2", "G5"]).set_output(transform="pandas")
    out = sel.fit_transform(frame)
    assert list(out.columns) == ["G5", "G2"]


def test_selector_allows_nan_values(frame):
    X = frame.copy()
    X.iloc[0, 0] = np.nan
    assert np.isnan(GeneSetSelector(["G3"]).fit_transform(X)[0, 0])


def test_selector_in_a_pipeline_with_cross_validation(pbmc):
    sets = read_gmt(GMT)
    pipe = make_pipeline(
        GeneSetSelector(sets), StandardScaler(), LogisticRegression(C=0.1, max_iter=300)
    )
    scores = cross_val_score(pipe, pbmc.data, pbmc.target, cv=3)
    # The pathway genes carry cell-type signal: far above the 34 % majority class.
    assert scores.mean() > 0.5
    pipe.fit(pbmc.data, pbmc.target)
    assert pipe[-1].n_features_in_ == len(pipe[0].get_feature_names_out())


# --- GMT files and empty gene sets ---------------------------------------------------------


def test_empty_gene_sets_are_a_clear_error():
    frame = pd.DataFrame(np.ones((2, 3)), columns=["CD3E", "LYZ", "MS4A1"])
    for gene_sets, match in [
        ({"T": []}, "gene set 'T' is empty"),
        ({}, "empty mapping"),
        ([], "holds no gene"),
    ]:
        with pytest.raises(ValueError, match=match):
            unchanged(lambda gs=gene_sets: GeneSetSelector(gs).fit(frame), frame)
    with pytest.raises(ValueError, match="none of the 1 genes"):
        GeneSetSelector({"B": ["CD79A"]}).fit(frame)


@pytest.mark.parametrize(
    "line, match",
    [
        ("ONLY_A_NAME\n", "line 2 is not a GMT gene set"),
        ("NAME\tdescription\n", "line 2 is not a GMT gene set"),
        ("NAME description CD3E CD3D\n", "separated by tabs"),
        ("\tdescription\tCD3E\n", "line 2 is not a GMT gene set"),
        ("T\trepeated name\tCD4\n", "repeats the gene-set name 'T'"),
    ],
)
def test_malformed_gmt_lines_are_a_clear_error(tmp_path, line, match):
    path = tmp_path / "sets.gmt"
    path.write_text("T\tT cells\tCD3E\tCD3D\n" + line + "B\tB cells\tCD79A\n")
    with pytest.raises(ValueError, match=match):
        read_gmt(path)
    frame = pd.DataFrame(np.ones((2, 2)), columns=["CD3E", "CD79A"])
    with pytest.raises(ValueError, match=match):
        GeneSetSelector(path).fit(frame)


def test_empty_and_missing_gmt_files(tmp_path):
    (tmp_path / "empty.gmt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no gene set"):
        read_gmt(tmp_path / "empty.gmt")
    with pytest.raises(FileNotFoundError):
        read_gmt(tmp_path / "missing.gmt")
    (tmp_path / "latin1.gmt").write_bytes(b"S\tdesc\tG\xe9NE\n")
    with pytest.raises(ValueError):  # UnicodeDecodeError is a ValueError
        read_gmt(tmp_path / "latin1.gmt")


# --- align_genes ----------------------------------------------------------------------------


def test_align_genes_reorders_a_dataframe_and_reports(frame):
    out, report = align_genes(frame, ["G1", "G2", "G3"])
    assert list(out.columns) == ["G1", "G2", "G3"]
    np.testing.assert_array_equal(out.to_numpy(), frame[["G1", "G2", "G3"]].to_numpy())
    assert report == GeneAlignment(
        n_genes=3, n_matched=3, missing=(), extra=("G5", "G4"), reordered=True, fill_value=None
    )
    assert not report.is_exact


def test_align_genes_identity_is_exact(frame):
    out, report = align_genes(frame, list(frame.columns))
    assert report.is_exact
    pd.testing.assert_frame_equal(out, frame)
    assert out is not frame


def test_align_genes_missing_genes_are_an_error_unless_filled(frame):
    with pytest.raises(ValueError, match="lacks 2 of the 3 genes.*NEW1, NEW2.*fill_value"):
        align_genes(frame, ["G1", "NEW1", "NEW2"])
    out, report = align_genes(frame, ["G1", "NEW1", "NEW2"], fill_value=0.0)
    assert report.missing == ("NEW1", "NEW2") and report.fill_value == 0.0
    assert (out[["NEW1", "NEW2"]] == 0.0).all().all()
    np.testing.assert_array_equal(out["G1"], frame["G1"])


def test_align_genes_numpy_with_feature_names_and_nan_fill(frame):
    X = frame.to_numpy()
    out, report = align_genes(
        X, ["G4", "NEW", "G3"], feature_names=frame.columns, fill_value=np.nan
    )
    assert isinstance(out, np.ndarray) and out.shape == (6, 3)
    np.testing.assert_array_equal(out[:, 0], frame["G4"])
    assert np.isnan(out[:, 1]).all()
    np.testing.assert_array_equal(out[:, 2], frame["G3"])
    assert report.n_matched == 2


def test_align_genes_integer_array_upcasts_only_when_filling_needs_it():
    X = np.array([[1, 2], [3, 4]])
    out, _ = align_genes(X, ["b", "a"], feature_names=["a", "b"])
    assert out.dtype == X.dtype and out.tolist() == [[2, 1], [4, 3]]
    out, _ = align_genes(X, ["a", "c"], feature_names=["a", "b"], fill_value=0.5)
    assert out.dtype.kind == "f" and out.tolist() == [[1, 0.5], [3, 0.5]]


def test_align_genes_sparse_fills_zero_only(frame):
    X = sp.csr_matrix(frame.to_numpy())
    out, _ = align_genes(X, ["G2", "NEW"], feature_names=frame.columns, fill_value=0)
    assert sp.isspmatrix_csr(out)
    np.testing.assert_array_equal(out.toarray()[:, 0], frame["G2"])
    assert (out.toarray()[:, 1] == 0).all()
    with pytest.raises(ValueError, match="sparse X can only be filled with 0"):
        align_genes(X, ["G2", "NEW"], feature_names=frame.columns, fill_value=1.0)


def test_align_genes_uses_a_fitted_estimators_feature_names(frame):
    est = GeneSetSelector(["G1"]).fit(frame[["G2", "G1"]])
    out, _ = align_genes(frame, est)
    assert list(out.columns) == ["G2", "G1"]
    arrays_only = GeneSetSelector(["G1"], feature_names=frame.columns).fit(frame.to_numpy())
    with pytest.raises(ValueError, match="no feature_names_in_"):
        align_genes(frame, arrays_only)


def test_align_genes_refuses_duplicates_and_no_overlap(frame):
    dup = pd.DataFrame(np.ones((1, 2)), columns=["A", "A"])
    with pytest.raises(ValueError, match="more than one column"):
        align_genes(dup, ["A"])
    with pytest.raises(ValueError, match="pass each gene once"):
        align_genes(frame, ["G1", "G1"])
    with pytest.raises(ValueError, match="none of the 1 expected genes"):
        align_genes(frame, ["ENSG1"], fill_value=0.0)
    with pytest.raises(ValueError, match="needs gene names"):
        align_genes(frame.to_numpy(), ["G1"])


@settings(max_examples=50, deadline=None)
@given(
    st.integers(2, 12).flatmap(
        lambda n: st.tuples(
            st.permutations(list(range(n))), st.lists(st.booleans(), min_size=n, max_size=n)
        )
    )
)
def test_align_genes_recovers_any_permutation_and_subset(case):
    perm, keep = case
    n = len(perm)
    genes = [f"g{i}" for i in range(n)]
    X = np.arange(3 * n, dtype=np.float64).reshape(3, n)
    shuffled = X[:, perm]
    names = [genes[i] for i in perm]
    wanted = [g for g, k in zip(genes, keep, strict=True) if k] or genes[:1]
    before = shuffled.copy()
    out, report = align_genes(shuffled, wanted, feature_names=names)
    np.testing.assert_array_equal(out, X[:, [genes.index(g) for g in wanted]])
    np.testing.assert_array_equal(shuffled, before)
    assert report.n_matched == len(wanted)
    assert len(report.extra) == n - len(wanted)


# --- check_log_scale ------------------------------------------------------------------------


def test_check_log_scale_is_silent_on_the_log_normalised_pbmc_data(pbmc):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_log_scale(pbmc.data) is False
        assert check_log_scale(pbmc.data.to_numpy()) is False


def test_check_log_scale_warns_on_counts_and_points_to_preprocessing(pbmc):
    counts = np.rint(np.expm1(pbmc.data.to_numpy()) * 20)
    with pytest.warns(RawCountsWarning, match=r"raw counts.*preprocessing"):
        assert check_log_scale(counts)
    with pytest.warns(RawCountsWarning, match="raw counts"):
        check_log_scale(sp.csr_matrix(counts.astype(np.int64)))


def test_check_log_scale_warns_on_unlogged_non_integer_values(pbmc):
    tpm = np.expm1(pbmc.data.to_numpy()) * 1000.5
    with pytest.warns(RawCountsWarning, match="not log-transformed"):
        check_log_scale(tpm)


@pytest.mark.parametrize(
    "X",
    [
        np.array([[0.0, 1.0, 2.0]]),  # small integers: plausible log values
        np.array([[-3.0, 250.0, 4000.0]]),  # negative values: centred or scaled data
        np.array([[np.nan, np.inf, 3.5]]),  # non-finite values are ignored
        np.array([["a", "b"]]),  # not numeric: left to validation
        np.zeros((0, 3)),
    ],
)
def test_check_log_scale_stays_silent(X):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_log_scale(X) is False


def test_check_log_scale_does_not_modify_input_and_samples_large_data():
    X = np.full((5000, 400), 3, dtype=np.int32)
    X[-1, -1] = 500
    before = X.copy()
    with pytest.warns(RawCountsWarning):
        assert check_log_scale(X)
    np.testing.assert_array_equal(X, before)
