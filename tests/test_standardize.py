"""Per-gene standardisation inside the network (``standardize=True``) and ``qk_init_scale``."""

import io
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tgem import TGEMClassifier, load
from tgem._model import TGEMNet
from tgem._standardize import gene_statistics

FAST = dict(n_layers=2, n_heads=2, max_epochs=3, batch_size=8, random_state=0, n_threads=1)


def _data(n=60, g=7, seed=0):
    """Genes on very different scales and offsets (log-expression-like), two classes."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, g)) * np.arange(1, g + 1) + 3.0 * np.arange(g)
    X[:, 1] = np.abs(X[:, 1])
    X[rng.random((n, g)) < 0.3] = 0.0  # sparse-looking
    y = np.where(X[:, 0] > np.median(X[:, 0]), "up", "down")
    return X.astype(np.float32), y


def _write_h5ad(path, X, y):
    anndata = pytest.importorskip("anndata")
    import pandas as pd

    adata = anndata.AnnData(
        X=sp.csr_matrix(X),
        obs=pd.DataFrame({"label": pd.Categorical(y)}, index=[f"c{i}" for i in range(len(y))]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])]),
    )
    adata.write_h5ad(path)
    return path


# ------------------------------------------------------------------------------ statistics
def test_statistics_equal_numpy_for_dense_sparse_and_h5ad_input(tmp_path):
    pytest.importorskip("h5py")
    from tgem import H5ADDataset

    X, y = _data(n=103, g=9)
    mean, scale = X.astype(np.float64).mean(0), X.astype(np.float64).std(0)
    kinds = {
        "dense": X,
        "csr": sp.csr_matrix(X),
        "csc": sp.csc_matrix(X),
        "coo": sp.coo_matrix(X),
        "h5ad": H5ADDataset(_write_h5ad(tmp_path / "x.h5ad", X, y)),
    }
    dense = gene_statistics(X, block_rows=10)  # 11 blocks, the last one short
    np.testing.assert_allclose(dense[0], mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dense[1], scale, rtol=1e-12)
    for name, data in kinds.items():
        for got, want in zip(gene_statistics(data, block_rows=10), dense, strict=True):
            assert np.array_equal(got, want), name


def test_statistics_of_many_blocks_are_numerically_safe():
    # a large offset and a small spread: the naive sum-of-squares formula loses all digits
    rng = np.random.default_rng(1)
    X = 1e4 + rng.normal(size=(5000, 3))
    mean, scale = gene_statistics(X, block_rows=7)
    np.testing.assert_allclose(mean, X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(scale, X.std(0), rtol=1e-10)


def test_duplicated_sparse_entries_add_up_as_in_toarray():
    X = sp.csr_matrix((np.array([1.0, 2.0, 5.0]), np.array([0, 0, 1]), np.array([0, 2, 3])))
    assert not X.has_canonical_format
    mean, scale = gene_statistics(X)
    want = X.toarray()
    np.testing.assert_allclose(mean, want.mean(0))
    np.testing.assert_allclose(scale, want.std(0))


def test_zero_variance_genes_get_scale_one_and_become_exact_zeros():
    X, y = _data()
    X[:, 2] = np.float32(3.7)  # constant but not representable: a sum/n mean would be off
    X[:, 4] = 0.0
    mean, scale = gene_statistics(X)
    assert scale[2] == 1.0 and scale[4] == 1.0
    assert mean[2] == np.float64(np.float32(3.7)) and mean[4] == 0.0
    clf = TGEMClassifier(standardize=True, **FAST).fit(X, y)
    z = clf.module_.standardize_input(torch.as_tensor(X))
    assert torch.all(z[:, [2, 4]] == 0)
    reference = StandardScaler().fit(X.astype(np.float64))
    np.testing.assert_allclose(scale, reference.scale_, rtol=1e-12)


def test_non_finite_values_in_a_dataset_are_refused():
    X = np.ones((4, 3))
    X[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        gene_statistics(X)


# ------------------------------------------------------------------------------ the estimator
def test_standardize_equals_a_pipeline_scaler_up_to_float32_rounding():
    X, y = _data()
    inside = TGEMClassifier(standardize=True, **FAST).fit(X, y)
    pipe = make_pipeline(StandardScaler(), TGEMClassifier(**FAST)).fit(X, y)
    Xt = _data(n=40, seed=5)[0]
    np.testing.assert_allclose(inside.predict_proba(Xt), pipe.predict_proba(Xt), atol=1e-5)
    scaler = pipe[0]
    np.testing.assert_allclose(inside.module_.input_mean.numpy(), scaler.mean_, rtol=1e-6)
    np.testing.assert_allclose(inside.module_.input_scale.numpy(), scaler.scale_, rtol=1e-6)


def test_dense_sparse_and_h5ad_fits_give_the_same_model(tmp_path):
    pytest.importorskip("h5py")
    X, y = _data()
    dense = TGEMClassifier(standardize=True, **FAST).fit(X, y)
    sparse = TGEMClassifier(standardize=True, **FAST).fit(sp.csr_matrix(X), y)
    path = _write_h5ad(tmp_path / "x.h5ad", X, y)
    from tgem import H5ADDataset

    h5ad = TGEMClassifier(standardize=True, **FAST).fit(H5ADDataset(path, chunk_size=1), y)
    for other in (sparse, h5ad):
        for key, value in dense.module_.state_dict().items():
            assert torch.equal(value, other.module_.state_dict()[key]), key


def test_the_users_arrays_are_not_modified():
    X, y = _data()
    for data in (X, sp.csr_matrix(X), sp.csc_matrix(X)):
        before = data.copy()
        TGEMClassifier(standardize=True, **FAST).fit(data, y)
        if sp.issparse(data):
            assert (data != before).nnz == 0
        else:
            assert np.array_equal(data, before)


def test_on_by_default_and_off_leaves_the_network_without_statistics():
    X, y = _data()
    assert TGEMClassifier().standardize is True
    clf = TGEMClassifier(**{**FAST, "standardize": False}).fit(X, y)
    assert not any(k.startswith("input_") for k in clf.module_.state_dict())
    on = TGEMClassifier(**{**FAST, "standardize": True}).fit(X, y)
    assert {"input_mean", "input_scale"} <= set(on.module_.state_dict())


def test_warm_start_keeps_the_statistics_of_the_first_fit():
    X, y = _data()
    clf = TGEMClassifier(standardize=True, warm_start=True, **FAST).fit(X, y)
    mean, scale = clf.module_.input_mean.clone(), clf.module_.input_scale.clone()
    clf.fit(X * 2 + 1, y)
    assert torch.equal(clf.module_.input_mean, mean)
    assert torch.equal(clf.module_.input_scale, scale)
    with pytest.raises(ValueError, match="standardize=False while the fitted model"):
        clf.set_params(standardize=False).fit(X, y)


def test_model_files_and_pickles_keep_the_statistics():
    X, y = _data()
    clf = TGEMClassifier(standardize=True, qk_init_scale=3.0, **FAST).fit(X, y)
    buffer = io.BytesIO()
    clf.save(buffer)
    for copy in (load(io.BytesIO(buffer.getvalue())), pickle.loads(pickle.dumps(clf))):
        assert copy.standardize is True and copy.qk_init_scale == 3.0
        assert torch.equal(copy.module_.input_mean, clf.module_.input_mean)
        assert torch.equal(copy.module_.input_scale, clf.module_.input_scale)
        assert np.array_equal(copy.predict_proba(X), clf.predict_proba(X))


def test_a_model_file_with_invalid_statistics_is_refused(monkeypatch):
    from tgem.exceptions import ModelFileError

    X, y = _data()
    clf = TGEMClassifier(standardize=True, **FAST).fit(X, y)
    clf.module_.input_scale[3] = 0.0  # a file that says so is written as it is
    buffer = io.BytesIO()
    clf.save(buffer)
    with pytest.raises(ModelFileError, match="input statistics"):
        load(io.BytesIO(buffer.getvalue()))


def test_distributed_fits_use_rank_zeros_statistics():
    from tgem._classifier import input_statistics

    class Rank1:  # stands in for DistContext.broadcast: rank 0's values arrive here
        def broadcast(self, values):
            return np.asarray(values) + 1.0

    X, _ = _data()
    mean, scale = gene_statistics(X)
    got_mean, got_scale = input_statistics(X, Rank1())
    assert np.array_equal(got_mean, mean + 1.0) and np.array_equal(got_scale, scale + 1.0)


def test_integrated_gradients_zero_baseline_is_zero_expression_in_input_units():
    from tgem.interpret import attribute

    X, y = _data()
    clf = TGEMClassifier(standardize=True, **FAST).fit(X, y)
    attr, delta = attribute(
        clf, X[:5], target="predicted", baseline="zeros", return_convergence_delta=True
    )
    assert attr.shape == (5, X.shape[1])
    # completeness against f(raw zeros): the baseline is zero expression, not the gene means
    with torch.no_grad():
        lp_x = clf.module_(torch.as_tensor(X[:5]))
        lp_0 = clf.module_(torch.zeros(1, X.shape[1]))
    target = lp_x.argmax(1)
    gap = (lp_x.gather(1, target[:, None])[:, 0] - lp_0[0, target]).double().numpy()
    np.testing.assert_allclose(attr.sum(1), gap, atol=2e-3 * max(1.0, np.abs(gap).max()))
    assert np.all(np.abs(delta) <= 2e-3 * np.maximum(1.0, np.abs(gap)))


# ------------------------------------------------------------------------------ qk_init_scale
def _net(**kw):
    return TGEMNet(n_genes=6, n_classes=3, generator=torch.Generator().manual_seed(0), **kw)


def test_qk_init_scale_one_is_bit_identical_and_ten_scales_wq_and_wk_only():
    base, one, ten = _net(), _net(qk_init_scale=1.0), _net(qk_init_scale=10.0)
    for key, value in base.state_dict().items():
        assert torch.equal(one.state_dict()[key], value), key
        scaled = key.endswith(("WQ", "WK"))
        want = value * 10 if scaled else value
        assert torch.equal(ten.state_dict()[key], want), key
    assert any(k.endswith("WQ") for k in base.state_dict())


def test_qk_init_scale_reaches_the_fitted_network():
    X, y = _data()
    kw = dict(FAST, max_epochs=1, learning_rate=1e-12)  # the weights barely move
    default = TGEMClassifier(**kw).fit(X, y)
    scaled = TGEMClassifier(qk_init_scale=10.0, **kw).fit(X, y)
    ratio = scaled.module_.layers[0].WQ / default.module_.layers[0].WQ
    np.testing.assert_allclose(ratio.detach().numpy(), 10.0, rtol=1e-4)
    with pytest.raises(ValueError, match="qk_init_scale"):
        TGEMClassifier(qk_init_scale=-1.0).fit(X, y)


def test_qk_init_scale_zero_keeps_the_attention_uniform_during_the_fit():
    X, y = _data()
    clf = TGEMClassifier(qk_init_scale=0.0, learning_rate=1e-2, **FAST).fit(X, y)
    for layer in clf.module_.layers:
        assert torch.all(layer.WQ == 0) and torch.all(layer.WK == 0)
        assert torch.any(layer.WV != 0)


def _ddp_statistics(rank, init_file, out_dir, X, y):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mine = X if rank == 0 else X * 2 + 1  # a rank given other rows must still use rank 0's
        clf = TGEMClassifier(standardize=True, **dict(FAST, max_epochs=1)).fit(mine, y)
        stats = (clf.module_.input_mean.numpy(), clf.module_.input_scale.numpy())
        np.save(f"{out_dir}/rank{rank}.npy", np.stack(stats))
    finally:
        tdist.destroy_process_group()


def test_every_ddp_process_standardises_with_rank_zeros_statistics(tmp_path):
    import torch.multiprocessing as mp

    X, y = _data()
    mp.spawn(
        _ddp_statistics, args=(str(tmp_path / "rdv"), str(tmp_path), X, y), nprocs=2, join=True
    )
    mean, scale = gene_statistics(X)
    want = np.stack([mean, scale]).astype(np.float32)
    for rank in range(2):
        assert np.array_equal(np.load(tmp_path / f"rank{rank}.npy"), want)


def test_attention_analyses_see_the_standardised_input():
    X, y = _data()
    inside = TGEMClassifier(standardize=True, **FAST).fit(X, y)
    Z = StandardScaler().fit_transform(X)  # float32 in, float32 out: the same rounding
    outside = TGEMClassifier(**FAST).fit(Z, y)
    np.testing.assert_allclose(
        inside.attention_entropy(X), outside.attention_entropy(Z), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(inside.layer_outputs(X), outside.layer_outputs(Z), atol=1e-5)
