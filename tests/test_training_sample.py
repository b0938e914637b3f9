"""The private training sample of ``feature_importances_`` (tgem._sampling, issue 23).

``fit`` copies the stratified rows the lazy ``feature_importances_`` attributes and keeps no
reference to the user's ``X``; pickles and model files never hold the rows. The importances
equal tgem 0.1's formulation: the subsample drawn on first access from the whole training
data, attributed with Integrated Gradients and averaged.
"""

import copy
import io
import pickle
import zipfile

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.feature_selection import SelectFromModel
from sklearn.utils import check_random_state

import tgem
from tgem import TGEMClassifier
from tgem._runtime import MAX_SEED, draw_seed
from tgem._sampling import TrainingSample, stratified_subsample
from tgem.cli import _subsample
from tgem.interpret import attribute

N_GENES = 6
PARAMS = dict(
    n_layers=1,
    n_heads=2,
    learning_rate=1e-2,
    max_epochs=3,
    n_threads=1,
    importance_n_samples=30,
    random_state=0,
)


def _data(n=80, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_GENES)).astype(np.float32) + 1.0
    y = np.where(X[:, 0] > 1.2, "up", np.where(X[:, 1] > 1.0, "mid", "down"))
    return X, y


def _importances_as_in_0_1(clf, X, y, baseline="zeros"):
    """tgem 0.1's feature_importances_: the subsample drawn on first access from all of X."""
    y_enc = np.searchsorted(clf.classes_, y)
    rng = np.random.default_rng(draw_seed(clf.random_state))
    idx = stratified_subsample(y_enc, clf.importance_n_samples, rng)
    if isinstance(baseline, str) and baseline == "mean":
        baseline = np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
    rows = X[idx]
    attr = attribute(clf, rows, target="true", y=y[idx], baseline=baseline)
    imp = np.abs(attr).mean(0)
    return imp / imp.sum()


@pytest.mark.parametrize("kind", ["dense", "sparse", "mean"])
def test_importances_equal_the_formulation_of_0_1(kind):
    X, y = _data()
    data = sp.csr_matrix(X) if kind == "sparse" else X
    baseline = "mean" if kind == "mean" else "zeros"
    clf = TGEMClassifier(**PARAMS, importance_baseline=baseline).fit(data, y)
    np.testing.assert_array_equal(
        clf.feature_importances_, _importances_as_in_0_1(clf, data, y, baseline)
    )


@pytest.mark.filterwarnings("ignore:X does not have valid feature names")
def test_importances_of_an_h5ad_input_equal_the_formulation_of_0_1(tmp_path):
    anndata = pytest.importorskip("anndata")
    X, y = _data()
    obs = pd.DataFrame({"cell_type": y}, index=[f"c{i}" for i in range(len(y))])
    adata = anndata.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]))
    adata.write_h5ad(tmp_path / "train.h5ad")
    clf = TGEMClassifier(**PARAMS).fit(str(tmp_path / "train.h5ad"), y="cell_type")
    assert isinstance(clf._training_sample.X, np.ndarray)  # rows read from the file
    assert clf._training_sample.X.shape[0] <= PARAMS["importance_n_samples"] + 3 * 20
    reference = _importances_as_in_0_1(clf, X, y)
    np.testing.assert_allclose(clf.feature_importances_, reference, rtol=1e-6, atol=1e-9)


def test_the_sample_is_a_copy_so_changing_x_after_fit_changes_nothing():
    X, y = _data()
    untouched = TGEMClassifier(**PARAMS).fit(X.copy(), y).feature_importances_
    clf = TGEMClassifier(**PARAMS).fit(X, y)
    assert not np.shares_memory(clf._training_sample.X, X)
    assert clf._training_sample.X.shape[0] < len(X)  # a subsample, not the training data
    X[:] = 0.0  # the user reuses the array
    np.testing.assert_array_equal(clf.feature_importances_, untouched)


def test_a_dataframe_is_copied_too():
    X, y = _data()
    frame = pd.DataFrame(X, columns=[f"g{j}" for j in range(N_GENES)])
    clf = TGEMClassifier(**PARAMS).fit(frame, y)
    expected = TGEMClassifier(**PARAMS).fit(X.copy(), y).feature_importances_
    frame.iloc[:, :] = 5.0
    np.testing.assert_array_equal(clf.feature_importances_, expected)


def test_the_sample_is_never_pickled_nor_written_to_model_files(tmp_path):
    X, y = _data()
    clf = TGEMClassifier(**PARAMS).fit(X, y)
    rows = clf._training_sample.X
    assert "_training_sample" not in clf.__getstate__()
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(clf._training_sample)
    blobs = [pickle.dumps(clf)]
    buffer = io.BytesIO()
    clf.save(buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        blobs.append(b"".join(archive.read(n) for n in archive.namelist()))
    for blob in blobs:
        for row in rows[:5]:
            assert row.astype(np.float32).tobytes() not in blob
            assert row.astype(np.float64).tobytes() not in blob
    assert not hasattr(pickle.loads(blobs[0]), "_training_sample")


def test_loaded_models_keep_their_saved_importances(tmp_path):
    X, y = _data()
    clf = TGEMClassifier(**PARAMS).fit(X, y)
    imp = clf.feature_importances_
    clf.save(tmp_path / "m.tgem")
    np.testing.assert_array_equal(tgem.load(tmp_path / "m.tgem").feature_importances_, imp)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(clf)).feature_importances_, imp)


def test_deep_copies_share_the_sample_and_compute_the_same_importances():
    X, y = _data()
    clf = TGEMClassifier(**PARAMS).fit(X, y)
    twin = copy.deepcopy(clf)
    assert twin._training_sample is clf._training_sample
    np.testing.assert_array_equal(twin.feature_importances_, clf.feature_importances_)


@pytest.mark.parametrize("prefit", [True, False])
def test_select_from_model_with_importances_not_yet_computed(prefit):
    X, y = _data()
    est = TGEMClassifier(**PARAMS)
    if prefit:
        est.fit(X, y)  # SelectFromModel deep-copies it before the importances exist
        assert "_feature_importances" not in est.__dict__
    sel = SelectFromModel(est, prefit=prefit, threshold="mean").fit(X, y)
    imp = sel.estimator_.feature_importances_
    expected = TGEMClassifier(**PARAMS).fit(X, y).feature_importances_
    np.testing.assert_array_equal(imp, expected)
    np.testing.assert_array_equal(sel.get_support(), imp >= imp.mean())


def test_fit_draws_nothing_more_from_a_random_state_instance():
    X, y = _data()
    rs = np.random.RandomState(7)
    clf = TGEMClassifier(**{**PARAMS, "random_state": rs}).fit(X, y)
    reference = np.random.RandomState(7)
    reference.randint(0, MAX_SEED, size=4)  # fit's four seeds, as in tgem 0.1
    assert rs.randint(0, MAX_SEED) == reference.randint(0, MAX_SEED)
    # the subsample's seed is the draw tgem 0.1 made on first access
    ref_rs = np.random.RandomState(7)
    ref_rs.randint(0, MAX_SEED, size=4)
    y_enc = np.searchsorted(clf.classes_, y)
    idx = stratified_subsample(y_enc, 30, np.random.default_rng(draw_seed(ref_rs)))
    np.testing.assert_array_equal(clf._training_sample.X, X[idx])
    np.testing.assert_array_equal(clf._training_sample.y, y_enc[idx])


def test_take_copies_rows_labels_and_the_mean():
    X = np.arange(40.0).reshape(20, 2)
    y = np.array([0] * 15 + [1] * 5)
    sample = TrainingSample.take(X, y, 8, 3)
    idx = stratified_subsample(y, 8, np.random.default_rng(3))
    np.testing.assert_array_equal(sample.X, X[idx])
    np.testing.assert_array_equal(sample.y, y[idx])
    np.testing.assert_array_equal(sample.mean, X.mean(axis=0))
    assert not np.shares_memory(sample.X, X)
    assert check_random_state(0).randint(0, MAX_SEED) == draw_seed(0)


@pytest.mark.parametrize("min_per_class", [0, 1, 20])
def test_stratified_subsample_allocates_in_proportion(min_per_class):
    y = np.array(["a"] * 300 + ["b"] * 60 + ["c"] * 6)
    idx = stratified_subsample(y, 100, np.random.default_rng(0), min_per_class=min_per_class)
    counts = {c: int((y[idx] == c).sum()) for c in "abc"}
    assert np.all(np.diff(idx) > 0) and len(set(idx)) == len(idx)
    if min_per_class == 0:
        assert len(idx) == 100 and counts == {"a": 82, "b": 16, "c": 2}
    else:
        assert len(idx) == 100 and counts["c"] >= min(6, min_per_class)
    small = stratified_subsample(y, 10, np.random.default_rng(0), min_per_class=min_per_class)
    # each class first keeps min_per_class rows: possibly more than asked for
    assert len(small) == max(10, sum(min(n, min_per_class) for n in (300, 60, 6)))


def test_cli_subsample_keeps_at_most_max_samples_stratified_in_order():
    X, y = _data(n=200)
    frame = pd.DataFrame(X, index=[f"s{i}" for i in range(len(X))])
    kept, labels = _subsample(frame, y, 50, 0)
    assert len(kept) == len(labels) == 50
    rows = frame.index.get_indexer(kept.index)
    assert np.all(np.diff(rows) > 0)  # original order
    np.testing.assert_array_equal(labels, y[rows])
    for cls in np.unique(y):  # proportional to the classes' sizes, within one row
        assert abs((labels == cls).sum() - 50 * (y == cls).mean()) < 1
    same, _ = _subsample(frame, y, 50, 0)
    assert same.index.equals(kept.index)
    whole, _ = _subsample(frame, y, None, 0)
    assert whole is frame
