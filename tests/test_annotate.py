"""tgem.annotate (AnnData round trip) and rejection of cells of unseen types."""

import hashlib

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.model_selection import train_test_split

import tgem
from tgem import TGEMClassifier
from tgem._annotate import rejection_scores
from tgem._calibration import MODEL_RULES as RULES  # the model has no neighbours reference
from tgem.cli import EXIT_INPUT, EXIT_OK, main
from tgem.datasets._gene_ids import _load_table

anndata = pytest.importorskip("anndata", reason="annotate needs the optional anndata extra")


@pytest.fixture(scope="module")
def frame(pbmc):
    X, y, genes = pbmc
    return pd.DataFrame(X, columns=genes.astype(str)), y.astype(str)


@pytest.fixture(scope="module")
def model(frame):
    X, y = frame
    clf = TGEMClassifier(max_epochs=2, random_state=0, standardize=True)
    return clf.fit(X.iloc[:400], y[:400])


@pytest.fixture
def adata(frame):
    X, _ = frame
    cells = X.iloc[400:520].copy()
    cells.index = [f"cell{i}" for i in range(len(cells))]
    return anndata.AnnData(cells)


def test_round_trip_through_write_and_read_h5ad(adata, model, tmp_path):
    tgem.annotate(adata, model)
    path = tmp_path / "annotated.h5ad"
    adata.write_h5ad(path)
    back = anndata.read_h5ad(path)
    labels = back.obs["tgem_label"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert list(labels.cat.categories) == [*map(str, model.classes_), "unassigned"]
    np.testing.assert_array_equal(labels.to_numpy(), adata.obs["tgem_label"].to_numpy())
    proba = back.obsm["tgem_probabilities"]
    np.testing.assert_allclose(proba, model.predict_proba(adata.to_df()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(back.obs["tgem_confidence"], proba.max(axis=1))
    uns = back.uns["tgem"]
    assert list(uns["classes"]) == list(map(str, model.classes_))
    assert uns["tgem_version"] == tgem.__version__
    assert uns["rejection"]["rule"] == "max_proba" and uns["rejection"]["threshold"] == 0.5
    assert int(uns["gene_match"]["counts"]["exact"]) == model.n_features_in_
    assert uns["params"]["random_state"] == 0
    unsure = proba.max(axis=1) < 0.5
    assert (labels.to_numpy()[unsure] == "unassigned").all()
    assert (labels.to_numpy()[~unsure] != "unassigned").all()


def test_sparse_and_dense_layers_give_the_same_result(adata, model):
    adata.layers["counts_sparse"] = sp.csr_matrix(adata.X)
    adata.layers["csc"] = sp.csc_matrix(adata.X)
    dense = tgem.annotate(adata, model, copy=True, batch_size=7)
    for layer in ("counts_sparse", "csc"):
        other = tgem.annotate(adata, model, layer=layer, copy=True, batch_size=50)
        np.testing.assert_allclose(
            other.obsm["tgem_probabilities"], dense.obsm["tgem_probabilities"], rtol=1e-5, atol=1e-6
        )
        assert other.uns["tgem"]["layer"] == layer


def test_copy_leaves_the_users_anndata_untouched(adata, model):
    before = adata.X.copy()
    out = tgem.annotate(adata, model, copy=True)
    assert out is not adata and "tgem_label" in out.obs
    assert list(adata.obs.columns) == [] and len(adata.obsm) == 0 and len(adata.uns) == 0
    np.testing.assert_array_equal(adata.X, before)
    assert tgem.annotate(adata, model) is None and "tgem_label" in adata.obs


def test_backed_read_only_file_is_untouched(adata, model, tmp_path):
    path = tmp_path / "cells.h5ad"
    adata.X = sp.csr_matrix(adata.X)
    adata.write_h5ad(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    backed = anndata.read_h5ad(path, backed="r")
    try:
        tgem.annotate(backed, model, batch_size=32)
        assert "tgem_label" in backed.obs
        memory = tgem.annotate(adata, model, copy=True)
        np.testing.assert_allclose(
            backed.obsm["tgem_probabilities"],
            memory.obsm["tgem_probabilities"],
            rtol=1e-5,
            atol=1e-6,
        )
        with pytest.raises(ValueError, match="copy=True is not available for a backed"):
            tgem.annotate(backed, model, copy=True)
    finally:
        backed.file.close()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def _ensembl_names(genes):
    table = _load_table("human")
    ensembl_of = {}
    for ensembl_id, entrez in table.ensembl.items():
        if len(entrez) == 1:
            ensembl_of.setdefault(entrez[0], []).append(ensembl_id)
    renamed = []
    for gene in genes:
        entrez = table.symbols.get(gene.upper(), ())
        ids = ensembl_of.get(entrez[0], []) if len(entrez) == 1 else []
        renamed.append(f"{ids[0]}.7" if len(ids) == 1 else gene)
    return renamed


def test_ensembl_ids_give_identical_labels(adata, model):
    renamed = adata.copy()
    renamed.var_names = _ensembl_names(list(adata.var_names))
    n_converted = sum(name.startswith("ENSG") for name in renamed.var_names)
    assert n_converted > 0.5 * adata.n_vars
    tgem.annotate(adata, model)
    tgem.annotate(renamed, model)
    np.testing.assert_array_equal(renamed.obs["tgem_label"], adata.obs["tgem_label"])
    counts = renamed.uns["tgem"]["gene_match"]["counts"]
    assert counts["id_conversion"] == n_converted


def test_missing_genes_filled_with_training_mean_or_refused(adata, model, frame):
    dropped = adata[:, 5:].copy()
    tgem.annotate(dropped, model, min_overlap=0.9)
    filled = adata.copy()
    filled.X[:, :5] = model.module_.input_mean.numpy()[:5]
    expected = model.predict_proba(filled.to_df())
    np.testing.assert_allclose(dropped.obsm["tgem_probabilities"], expected, rtol=1e-5, atol=1e-6)
    assert dropped.uns["tgem"]["fill_rule"] == "training_mean"
    assert len(dropped.uns["tgem"]["gene_match"]["missing"]) == 5

    X, y = frame
    plain = TGEMClassifier(max_epochs=1, standardize=False, random_state=0).fit(
        X.iloc[:100], y[:100]
    )
    with pytest.raises(ValueError, match="5 of the model's 765 genes are missing.*fill_value"):
        tgem.annotate(dropped, plain, min_overlap=0.9)
    tgem.annotate(dropped, plain, min_overlap=0.9, fill_value=0.0)
    assert dropped.uns["tgem"]["fill_rule"] == "value"


def test_anndata_without_the_models_genes_is_refused(adata, model):
    other = anndata.AnnData(adata.X, var=pd.DataFrame(index=[f"g{i}" for i in range(765)]))
    with pytest.raises(ValueError, match="of the model's 765 genes .* below min_overlap"):
        tgem.annotate(other, model)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"threshold": 1.5}, ValueError, r"probability in \[0, 1\]; got 1.5"),
        ({"threshold": -0.1}, ValueError, r"probability in \[0, 1\]"),
        ({"threshold": float("nan")}, ValueError, "got nan"),
        ({"threshold": "high"}, TypeError, "real number"),
        ({"reject": "energy"}, ValueError, "no default threshold"),
        ({"reject": "entropy"}, ValueError, "rule must be one of"),
        ({"layer": "nope"}, ValueError, "layer 'nope' is not in adata.layers"),
        ({"majority_voting": "leiden"}, ValueError, "not a column of adata.obs"),
        ({"unassigned": "CD19+ B"}, ValueError, "one of the model's classes"),
        ({"batch_size": 0}, ValueError, "at least 1"),
    ],
)
def test_bad_arguments_are_refused(adata, model, kw, error, match):
    with pytest.raises(error, match=match):
        tgem.annotate(adata, model, **kw)
    assert "tgem_label" not in adata.obs


def test_majority_voting_and_nan_clusters(adata, model):
    adata.obs["leiden"] = pd.Categorical(np.arange(adata.n_obs) % 3)
    tgem.annotate(adata, model, majority_voting="leiden", reject=None)
    labels = adata.obs["tgem_label"].astype(str)
    for cluster in range(3):
        cells = adata.obs["leiden"] == cluster
        counts = labels[cells].value_counts()
        assert (adata.obs["tgem_majority_voting"][cells] == counts.index[0]).all()
        np.testing.assert_allclose(
            adata.obs["tgem_vote_share"][cells], counts.iloc[0] / cells.sum()
        )
    adata.obs["leiden"] = adata.obs["leiden"].astype(float)
    adata.obs.iloc[3, adata.obs.columns.get_loc("leiden")] = np.nan
    with pytest.raises(ValueError, match="1 cell\\(s\\) without a cluster"):
        tgem.annotate(adata, model, majority_voting="leiden")


def test_importances_go_to_varm(adata, model):
    small = adata[:6].copy()
    tgem.annotate(small, model, importances=True)
    values = small.varm["tgem_importances"]
    assert values.shape == (small.n_vars, len(model.classes_))
    assert np.isfinite(values).all() and np.abs(values).sum() > 0


def test_left_out_type_is_rejected_more_often(pbmc):
    # B cells are left out of training; each rule's threshold is fitted on held-out seen
    # cells. benchmarks/bench_annotate.py prints the same split's AUROC per rule.
    X, y, _ = pbmc
    unseen = "CD19+ B"
    seen = np.flatnonzero(y != unseen)
    train, rest = train_test_split(seen, test_size=0.4, stratify=y[seen], random_state=0)
    cal, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=0)
    clf = TGEMClassifier(max_epochs=15, learning_rate=1e-3, random_state=0, standardize=True)
    clf.fit(X[train], y[train])
    rejected = {}
    for rule in RULES:
        threshold = tgem.fit_rejection_threshold(clf, X[cal], y[cal], rule=rule)
        assert (rejection_scores(clf, X[cal], rule=rule) < threshold).mean() <= 0.05
        for name, rows in (("seen", test), ("unseen", np.flatnonzero(y == unseen))):
            labels = tgem.predict_with_rejection(clf, X[rows], threshold=threshold, rule=rule)
            rejected[rule, name] = np.mean(labels == "unassigned")
            if name == "seen":  # predict itself never rejects
                kept = labels != "unassigned"
                np.testing.assert_array_equal(labels[kept], clf.predict(X[rows])[kept])
        assert rejected[rule, "unseen"] > rejected[rule, "seen"] + 0.1, rejected


def test_threshold_fitting_refuses_bad_input(model, frame):
    X, y = frame
    with pytest.raises(ValueError, match=r"share of cells in \[0, 1\); got 1.0"):
        tgem.fit_rejection_threshold(model, X.iloc[:10], y[:10], target_rejection=1.0)
    with pytest.raises(ValueError, match="none of the calibration labels"):
        tgem.fit_rejection_threshold(model, X.iloc[:10], np.array(["x"] * 10))
    with pytest.raises(ValueError, match="has 10 rows but y_cal has 3"):
        tgem.fit_rejection_threshold(model, X.iloc[:10], y[:3])


def test_cli_annotate(adata, model, tmp_path, capsys):
    model_path, data_path, out = tmp_path / "m.tgem", tmp_path / "d.h5ad", tmp_path / "o.h5ad"
    model.save(model_path)
    adata.obs["leiden"] = pd.Categorical(np.arange(adata.n_obs) % 2)
    adata.write_h5ad(data_path)
    argv = ["annotate", str(model_path), str(data_path), "-o", str(out)]
    assert main([*argv, "--majority-voting", "leiden", "--threshold", "0.3"]) == EXIT_OK
    back = anndata.read_h5ad(out)
    assert {"tgem_label", "tgem_majority_voting"} <= set(back.obs)
    assert back.uns["tgem"]["rejection"]["threshold"] == 0.3
    assert main([*argv, "--threshold", "2"]) == EXIT_INPUT
    assert "probability in [0, 1]; got 2.0" in capsys.readouterr().err
    assert main([*argv, "--rule", "energy"]) == EXIT_INPUT
    assert main([*argv, "--layer", "nope"]) == EXIT_INPUT
    not_h5ad = tmp_path / "table.h5ad"
    not_h5ad.write_text("gene,cell\n")
    bad = ["annotate", str(model_path), str(not_h5ad), "-o", str(out)]
    assert main(bad) == EXIT_INPUT
    assert "could not be read as an .h5ad file" in capsys.readouterr().err
    assert main(["annotate", str(model_path), str(tmp_path / "none.h5ad"), "-o", str(out)]) == 2


def test_energy_is_logsumexp_of_the_logits(model, frame):
    import torch

    X, _ = frame
    x = torch.as_tensor(X.iloc[:20].to_numpy(np.float32))
    with torch.no_grad():
        model.module_.eval()
        _, states = model.module_(x, return_layers=True)
        logits = model.module_.classifier(torch.nn.functional.leaky_relu(states[-1], 0.1))
    expected = torch.logsumexp(logits.double(), dim=1).numpy()
    scores = rejection_scores(model, X.iloc[:20], rule="energy")
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    labels = tgem.predict_with_rejection(
        model, X.iloc[:20], rule="energy", threshold=float(np.median(scores))
    )
    np.testing.assert_array_equal(labels == "unassigned", scores < np.median(scores))


def test_labels_are_those_of_predict_with_rejection(adata, model):
    # kept cells carry predict's label, rejected ones the unassigned label, for both rules
    X = adata.to_df()
    for rule in RULES:
        scores = rejection_scores(model, X, rule=rule)
        threshold = float(np.quantile(scores, 0.3))
        tgem.annotate(adata, model, reject=rule, threshold=threshold, unassigned="none")
        expected = tgem.predict_with_rejection(
            model, X, rule=rule, threshold=threshold, unassigned="none"
        )
        got = adata.obs["tgem_label"]
        assert 0 < (got == "none").sum() < len(got)
        np.testing.assert_array_equal(got.astype(str).to_numpy(), expected.astype(str))
        assert list(got.cat.categories) == [*map(str, model.classes_), "none"]


def test_backed_dense_file(adata, model, tmp_path):
    path = tmp_path / "dense.h5ad"
    adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        tgem.annotate(backed, model, batch_size=50, reject=None)
    finally:
        backed.file.close()
    expected = model.predict(adata.to_df())
    np.testing.assert_array_equal(backed.obs["tgem_label"].astype(str), expected.astype(str))
