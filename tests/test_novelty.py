"""The "neighbors" rejection rule: the reference of training cells, its fit, files and use."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

import tgem
from tests.test_io import _rebuild, _to_bytes
from tgem import TGEMClassifier, load
from tgem._calibration import TARGET_REJECTION
from tgem._novelty import NeighborReference
from tgem.cli import EXIT_OK, main
from tgem.exceptions import ModelFileError

FAST = dict(n_layers=1, n_heads=2, max_epochs=3, batch_size=16, learning_rate=1e-2, n_threads=1)


def _clusters(n=240, genes=12, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    centres = rng.normal(scale=3.0, size=(n_classes, genes))
    X = (centres[y] + rng.normal(size=(n, genes))).astype(np.float32)
    return X, np.array(["a", "b", "c", "d"])[y]


@pytest.fixture(scope="module")
def fitted():
    X, y = _clusters()
    names = [f"g{j}" for j in range(X.shape[1])]
    clf = TGEMClassifier(calibration="temperature", calibration_fraction=0.25, random_state=0)
    clf.set_params(**FAST).fit(pd.DataFrame(X, columns=names), y)
    return clf, X, y, names


# ------------------------------------------------------------------ the reference itself
def test_distances_equal_scikit_learns_scaler_pca_and_neighbours():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 9)) * rng.uniform(0.5, 3.0, size=9) + 4.0
    X[:, 3] = 2.0  # a constant gene keeps scale 1
    new = rng.normal(size=(30, 9)) * 2.0
    ref = NeighborReference.fit(X, np.zeros(120, int), seed=0, n_components=5, n_neighbors=7)
    z = StandardScaler().fit(X)
    pca = PCA(5, svd_solver="full").fit(z.transform(X))
    nn = NearestNeighbors(n_neighbors=7).fit(pca.transform(z.transform(X)))
    expected = nn.kneighbors(pca.transform(z.transform(new)))[0].mean(axis=1)
    np.testing.assert_allclose(ref.distances(new), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ref.scores(new), -expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ref.components @ ref.components.T, np.eye(5), atol=1e-12)


def test_the_randomised_svd_spans_the_leading_components():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 150)) + 0.01 * rng.normal(size=(400, 150))
    ref = NeighborReference.fit(X, np.zeros(400, int), seed=0, n_components=6)
    z = StandardScaler().fit_transform(X)
    exact = np.linalg.svd(z, full_matrices=False)[2][:6]
    # the same 6-dimensional subspace: the projections onto it agree
    np.testing.assert_allclose(ref.components.T @ ref.components, exact.T @ exact, atol=1e-6)


def test_sparse_dense_and_float32_inputs_give_one_score_and_stay_untouched():
    X, y = _clusters(n=90)
    before = X.copy()
    ref = NeighborReference.fit(X, y, seed=3, n_components=4)
    ref_sparse = NeighborReference.fit(sp.csr_matrix(X), y, seed=3, n_components=4)
    np.testing.assert_allclose(ref.cells, ref_sparse.cells, atol=1e-10)
    np.testing.assert_allclose(ref.scores(X), ref_sparse.scores(sp.csr_matrix(X)), atol=1e-10)
    np.testing.assert_array_equal(X, before)


def test_at_most_max_cells_are_kept_and_every_class_is_in_them():
    X, y = _clusters(n=300)
    ref = NeighborReference.fit(X, y, seed=0, max_cells=60, n_components=3)
    assert ref.cells.shape == (60, 3) and ref.n_neighbors == 10
    tiny = NeighborReference.fit(X[:4], y[:4], seed=0)
    assert tiny.cells.shape == (4, 3) and tiny.n_neighbors == 4  # fewer cells than asked


def test_a_reference_cell_is_its_own_nearest_neighbour():
    X, y = _clusters(n=60)
    ref = NeighborReference.fit(X, y, seed=0, n_components=5, n_neighbors=1)
    np.testing.assert_allclose(ref.distances(X), 0.0, atol=1e-6)


def test_only_the_candidate_rows_are_used_and_read():
    X, y = _clusters(n=120)

    class Rows:  # records which rows are read
        shape = X.shape
        read: list = []

        def __getitem__(self, rows):
            Rows.read.extend(np.asarray(rows).tolist())
            return X[rows]

    keep = np.flatnonzero(np.arange(120) % 4 != 0)  # e.g. the rows of positive weight
    ref = NeighborReference.fit(Rows(), y, seed=0, rows=keep, max_cells=50, n_components=4)
    assert set(Rows.read) <= set(keep.tolist()) and len(Rows.read) == 50
    same = NeighborReference.fit(X[keep], y[keep], seed=0, max_cells=50, n_components=4)
    np.testing.assert_array_equal(ref.cells, same.cells)


def test_a_dataset_is_scored_in_row_blocks():
    X, y = _clusters(n=50)
    ref = NeighborReference.fit(X, y, seed=0, n_components=4)

    class Blocks:  # like an .h5ad dataset: row slices only, each one a read
        shape = X.shape
        reads: list = []

        def __getitem__(self, rows):
            assert isinstance(rows, slice)
            Blocks.reads.append(rows)
            return X[rows]

    scores = ref.scores(Blocks(), block_rows=16)
    assert [(r.start, r.stop) for r in Blocks.reads] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    np.testing.assert_allclose(scores, ref.scores(X), rtol=1e-9, atol=1e-12)


def test_non_finite_training_values_are_refused():
    X, y = _clusters(n=30)
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        NeighborReference.fit(X, y, seed=0)


def test_the_wrong_number_of_genes_is_refused():
    X, y = _clusters(n=30)
    ref = NeighborReference.fit(X, y, seed=0, n_components=3)
    with pytest.raises(ValueError, match="12 genes"):
        ref.scores(X[:, :5])


# ------------------------------------------------------------------ the estimator
def test_a_calibrated_fit_builds_the_reference_from_its_training_cells(fitted):
    clf, X, y, _ = fitted
    train = np.setdiff1d(np.arange(len(y)), clf.calibration_indices_)
    y_enc = np.searchsorted(clf.classes_, y)
    # all training cells (fewer than 10,000) and 12 genes (an exact SVD): no seed matters
    expected = NeighborReference.fit(X[train], y_enc[train], seed=12345)
    for name, array in expected.arrays().items():
        np.testing.assert_allclose(clf.neighbor_reference_.arrays()[name], array, atol=1e-12)
    assert clf.neighbor_reference_.cells.shape == (len(train), X.shape[1])


def test_the_neighbors_threshold_rejects_at_most_the_target_share_of_held_out_cells(fitted):
    clf, X, _, names = fitted
    threshold = clf.rejection_thresholds_["neighbors"]
    held = pd.DataFrame(X[clf.calibration_indices_], columns=names)
    scores = tgem.rejection_scores(clf, held, rule="neighbors")
    assert np.mean(scores < threshold) <= TARGET_REJECTION
    assert threshold == pytest.approx(
        tgem.fit_rejection_threshold(
            clf, held, clf.classes_[np.zeros(len(held), int)], rule="neighbors"
        )
    )


def test_the_combined_threshold_and_scores_are_those_of_the_held_out_p_values(fitted):
    clf, X, _, names = fitted
    held = pd.DataFrame(X[clf.calibration_indices_], columns=names)
    combined = tgem.rejection_scores(clf, held, rule="combined")
    energy = tgem.rejection_scores(clf, held, rule="energy")
    neighbors = tgem.rejection_scores(clf, held, rule="neighbors")
    np.testing.assert_allclose(clf.calibration_scores_["energy"], np.sort(energy), rtol=1e-9)
    np.testing.assert_allclose(clf.calibration_scores_["neighbors"], np.sort(neighbors), rtol=1e-9)
    n = len(held)
    p_energy = (np.sum(energy[None, :] <= energy[:, None] + 1e-12, axis=1) + 1) / (n + 1)
    p_neigh = (np.sum(neighbors[None, :] <= neighbors[:, None] + 1e-12, axis=1) + 1) / (n + 1)
    np.testing.assert_allclose(combined, np.minimum(p_energy, p_neigh))
    # the threshold: on the held-out cells' p-values with each one's own score left out
    own = np.minimum(p_energy, p_neigh) - 1 / (n + 1)
    threshold = clf.rejection_thresholds_["combined"]
    assert threshold == pytest.approx(np.sort(own)[int(TARGET_REJECTION * n)])
    # (scores recomputed here may differ from fit's in the last bit: one tie may move)
    assert 0 < threshold <= 1 and np.mean(own < threshold) <= TARGET_REJECTION + 1 / n


@pytest.mark.parametrize("rule", ["neighbors", "combined"])
def test_cells_far_from_every_training_cell_are_unassigned(fitted, rule):
    clf, X, _, names = fitted
    far = pd.DataFrame(X[:20] + 40.0, columns=names)
    labels = tgem.predict_with_rejection(clf, far, rule=rule)
    assert set(labels) == {"unassigned"}
    near = pd.DataFrame(X[clf.calibration_indices_], columns=names)
    kept = tgem.predict_with_rejection(clf, near, rule=rule)
    assert np.mean(kept == "unassigned") <= TARGET_REJECTION


def test_an_uncalibrated_model_has_no_reference_and_says_how_to_get_one():
    X, y = _clusters(n=60)
    clf = TGEMClassifier(random_state=0, **FAST).fit(X, y)
    assert not hasattr(clf, "neighbor_reference_")
    with pytest.raises(ValueError, match="calibration='temperature'"):
        tgem.predict_with_rejection(clf, X, rule="neighbors", threshold=-1.0)
    with pytest.raises(ValueError, match="calibration='temperature'"):
        tgem.rejection_scores(clf, X, rule="neighbors")


def test_a_refit_without_calibration_drops_the_reference(fitted):
    clf, X, y, names = fitted
    model = pickle.loads(pickle.dumps(clf))
    model.set_params(calibration=None).fit(pd.DataFrame(X, columns=names), y)
    assert not hasattr(model, "neighbor_reference_")


def test_the_other_rules_and_the_network_are_unchanged_by_the_reference(fitted):
    """The reference draws from a generator of its own: fit's other draws are as before."""
    clf, X, y, names = fitted
    frame = pd.DataFrame(X, columns=names)
    P = clf.predict_proba(frame)
    again = TGEMClassifier(calibration="temperature", calibration_fraction=0.25, random_state=0)
    again.set_params(**FAST).fit(frame, y)
    np.testing.assert_array_equal(again.predict_proba(frame), P)
    np.testing.assert_array_equal(again.neighbor_reference_.cells, clf.neighbor_reference_.cells)


def test_h5ad_datasets_score_in_blocks_like_arrays(fitted, tmp_path):
    anndata = pytest.importorskip("anndata")
    clf, X, _, names = fitted
    adata = anndata.AnnData(X[:50])
    adata.var_names = names
    adata.write_h5ad(tmp_path / "c.h5ad")
    clf = pickle.loads(pickle.dumps(clf))
    clf.predict_batch_size = 7  # blocks of 7 rows: 50 rows end in a partial block
    from_file = tgem.rejection_scores(clf, tgem.H5ADDataset(tmp_path / "c.h5ad"), rule="neighbors")
    in_memory = tgem.rejection_scores(clf, pd.DataFrame(X[:50], columns=names), rule="neighbors")
    np.testing.assert_allclose(from_file, in_memory, rtol=1e-7)  # BLAS blocks differ
    with pytest.raises(TypeError, match="annotate"):
        tgem.rejection_scores(clf, adata, rule="neighbors")


# ------------------------------------------------------------------ annotate and the CLI
def test_annotate_with_the_neighbors_rule_writes_the_distance_and_round_trips(fitted, tmp_path):
    anndata = pytest.importorskip("anndata")
    clf, X, _, names = fitted
    cells = np.vstack([X[:30], X[:10] + 40.0])
    adata = anndata.AnnData(cells)
    adata.var_names = names
    tgem.annotate(adata, clf, reject="neighbors", batch_size=16)
    labels = adata.obs["tgem_label"].astype(str).to_numpy()
    assert set(labels[30:]) == {"unassigned"}
    distance = adata.obs["tgem_neighbor_distance"].to_numpy()
    np.testing.assert_allclose(distance, clf.neighbor_reference_.distances(cells), rtol=1e-12)
    rejection = adata.uns["tgem"]["rejection"]
    assert rejection["rule"] == "neighbors" and rejection["threshold_source"] == "calibration"
    adata.write_h5ad(tmp_path / "out.h5ad")
    back = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert back.uns["tgem"]["rejection"]["rule"] == "neighbors"


def test_the_cli_annotates_with_the_neighbors_rule(fitted, tmp_path):
    anndata = pytest.importorskip("anndata")
    clf, X, _, names = fitted
    clf.save(tmp_path / "m.tgem")
    adata = anndata.AnnData(np.vstack([X[:20], X[:5] + 40.0]))
    adata.var_names = names
    adata.write_h5ad(tmp_path / "cells.h5ad")
    out = tmp_path / "out.h5ad"
    argv = ["annotate", str(tmp_path / "m.tgem"), str(tmp_path / "cells.h5ad"), "-o", str(out)]
    assert main([*argv, "--rule", "neighbors"]) == EXIT_OK
    labels = anndata.read_h5ad(out).obs["tgem_label"].astype(str).to_numpy()
    assert set(labels[20:]) == {"unassigned"}


# ------------------------------------------------------------------ files and pickles
def test_model_files_and_pickles_keep_the_reference(fitted, tmp_path):
    clf, X, _, names = fitted
    frame = pd.DataFrame(X, columns=names)
    clf.save(tmp_path / "m.tgem")
    for copy in (load(tmp_path / "m.tgem"), pickle.loads(pickle.dumps(clf))):
        for name, array in clf.neighbor_reference_.arrays().items():
            np.testing.assert_array_equal(copy.neighbor_reference_.arrays()[name], array)
        assert copy.rejection_thresholds_ == clf.rejection_thresholds_
        np.testing.assert_array_equal(
            tgem.predict_with_rejection(copy, frame, rule="neighbors"),
            tgem.predict_with_rejection(clf, frame, rule="neighbors"),
        )


def test_format_2_files_load_without_the_reference(fitted):
    clf, X, _, names = fitted

    def as_version_2(h):
        h["format_version"] = 2
        calibration = h["fitted"]["calibration"]
        del calibration["neighbor_reference"]
        del calibration["rejection_thresholds_"]["neighbors"]
        del calibration["rejection_thresholds_"]["combined"]
        h["arrays"] = [a for a in h["arrays"] if not _new_in_3(a["name"])]

    def drop(items):
        for name in [n for n in items if _new_in_3(n)]:
            del items[name]

    old = load(io.BytesIO(_rebuild(_to_bytes(clf), header=as_version_2, entries=drop)))
    assert not hasattr(old, "neighbor_reference_") and not hasattr(old, "calibration_scores_")
    assert set(old.rejection_thresholds_) == {"max_proba", "energy"}
    frame = pd.DataFrame(X, columns=names)
    np.testing.assert_array_equal(old.predict_proba(frame), clf.predict_proba(frame))


def _new_in_3(name: str) -> bool:
    return "neighbor_reference/" in name or "calibration_scores/" in name


def _set_array(name, array):
    def edit(items):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
        items[f"attributes/neighbor_reference/{name}.npy"] = buffer.getvalue()

    return edit


def _reference(h):
    return h["fitted"]["calibration"]


@pytest.mark.parametrize(
    "header, entries, match",
    [
        (lambda h: _reference(h).update(neighbor_reference={"n_neighbors": 0}), None, "n_neigh"),
        (lambda h: _reference(h).update(neighbor_reference={"n_neighbors": 1e9}), None, "n_neigh"),
        (lambda h: _reference(h).update(neighbor_reference={"k": 3}), None, "exactly n_neigh"),
        (lambda h: _reference(h).update(neighbor_reference=None), None, "no neighbor_reference"),
        (lambda h: _reference(h).pop("neighbor_reference"), None, "keys"),
        (lambda h: _reference(h)["rejection_thresholds_"].pop("neighbors"), None, "neighbors"),
        (
            lambda h: _reference(h)["rejection_thresholds_"].update(neighbors="NaN"),
            None,
            "finite",
        ),
        (lambda h: _reference(h)["rejection_thresholds_"].update(combined=1.5), None, "probab"),
        (lambda h: _reference(h)["rejection_thresholds_"].pop("combined"), None, "combined"),
    ],
)
def test_a_tampered_reference_header_is_refused(fitted, header, entries, match):
    clf = fitted[0]
    with pytest.raises(ModelFileError, match=match):
        load(io.BytesIO(_rebuild(_to_bytes(clf), header=header, entries=entries)))


@pytest.mark.parametrize(
    "change, match",
    [(lambda a: a[::-1].copy(), "sorted"), (lambda a: a[:-1], "finite numbers")],
)
def test_tampered_held_out_scores_are_refused(fitted, change, match):
    clf = fitted[0]
    array = change(clf.calibration_scores_["energy"])
    name = "attributes/calibration_scores/energy.npy"

    def manifest(h):
        for entry in h["arrays"]:
            if entry["name"] == name:
                entry["shape"] = list(array.shape)

    def entries(items):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, allow_pickle=False)
        items[name] = buffer.getvalue()

    with pytest.raises(ModelFileError, match=match):
        load(io.BytesIO(_rebuild(_to_bytes(clf), header=manifest, entries=entries)))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("scale", lambda r: -r.scale, "positive"),
        ("components", lambda r: 2.0 * r.components, "orthonormal"),
        ("cells", lambda r: np.where(r.cells == r.cells[0, 0], np.inf, r.cells), "finite"),
        ("mean", lambda r: r.mean[:-1], "one length"),
    ],
)
def test_tampered_reference_arrays_are_refused(fitted, field, value, match):
    clf = fitted[0]
    array = value(clf.neighbor_reference_)

    def manifest(h):
        for entry in h["arrays"]:
            if entry["name"] == f"attributes/neighbor_reference/{field}.npy":
                entry["shape"] = list(array.shape)

    with pytest.raises(ModelFileError, match=match):
        load(
            io.BytesIO(_rebuild(_to_bytes(clf), header=manifest, entries=_set_array(field, array)))
        )


def test_a_type_left_out_of_the_bundled_pbmc_cells_is_far_from_the_reference():
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    X, y = tgem.datasets.load_pbmc68k(return_X_y=True)
    X, y = np.asarray(X, dtype=np.float32), np.asarray(y).astype(str)
    unseen = np.flatnonzero(y == "CD19+ B")
    seen = np.flatnonzero(y != "CD19+ B")
    train, rest = train_test_split(seen, test_size=0.4, stratify=y[seen], random_state=0)
    cal, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=0)
    ref = NeighborReference.fit(X[train], np.unique(y[train], return_inverse=True)[1], seed=0)
    threshold = np.sort(ref.scores(X[cal]))[int(0.05 * len(cal))]
    rejected_seen = np.mean(ref.scores(X[test]) < threshold)
    rejected_unseen = np.mean(ref.scores(X[unseen]) < threshold)
    assert rejected_unseen > rejected_seen + 0.3, (rejected_seen, rejected_unseen)
    truth = np.r_[np.zeros(len(test)), np.ones(len(unseen))]
    assert roc_auc_score(truth, -np.r_[ref.scores(X[test]), ref.scores(X[unseen])]) > 0.8


def test_annotate_picks_the_combined_rule_for_a_calibrated_model_by_default(fitted, monkeypatch):
    anndata = pytest.importorskip("anndata")
    clf, X, _, names = fitted
    assert len(clf.calibration_indices_) < 100  # too few held-out cells: neighbors
    adata = anndata.AnnData(X[:5])
    adata.var_names = names
    tgem.annotate(adata, clf)
    assert adata.uns["tgem"]["rejection"]["rule"] == "neighbors"
    monkeypatch.setattr(tgem._annotate, "AUTO_COMBINED_MIN_CALIBRATION", 50)
    adata = anndata.AnnData(np.vstack([X[:30], X[:10] + 40.0]))
    adata.var_names = names
    tgem.annotate(adata, clf)
    rejection = adata.uns["tgem"]["rejection"]
    assert rejection["rule"] == "combined"
    assert rejection["threshold"] == clf.rejection_thresholds_["combined"]
    assert set(adata.obs["tgem_label"].astype(str)[30:]) == {"unassigned"}
    np.testing.assert_allclose(
        adata.obs["tgem_combined_p"].to_numpy(),
        tgem.rejection_scores(clf, adata.to_df(), rule="combined"),
    )
    tgem.annotate(adata, clf, threshold=0.5)  # a given threshold: a probability
    assert adata.uns["tgem"]["rejection"]["rule"] == "max_proba"
    plain = TGEMClassifier(random_state=0, **FAST).fit(pd.DataFrame(X, columns=names), fitted[2])
    tgem.annotate(adata, plain)
    assert adata.uns["tgem"]["rejection"]["rule"] == "max_proba"
