"""Attention analysis: entropy, maps, layer outputs, attention attribution, gene networks."""

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tgem._memory as memory_mod
from tgem import TGEMClassifier
from tgem._kernels import reference_softmax
from tgem.attention import (
    attention_attribution,
    attention_edges,
    attention_entropy,
    attention_map,
    attention_network,
    entropy_table,
    hub_genes,
    layer_outputs,
    to_networkx,
    write_edges,
    write_graphml,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _fit(n_genes=6, n_layers=2, n_heads=3, activation="leakyrelu", n=40, seed=0, epochs=2):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_genes)).astype(np.float32)
    y = np.where(X[:, 0] + 0.5 * X[:, 1] > 0, "up", "down")
    clf = TGEMClassifier(
        n_layers=n_layers,
        n_heads=n_heads,
        activation=activation,
        learning_rate=1e-2,
        max_epochs=epochs,
        random_state=seed,
        device="cpu",
    ).fit(X, y)
    return clf, X, y


@pytest.fixture(scope="module")
def fitted():
    return _fit()


def _states(clf, X):
    with torch.no_grad():
        _, states = clf.module_(torch.as_tensor(X), return_layers=True)
    return states


def _reference_maps(clf, X, layer):
    """(n, heads, G, G) unmasked softmax maps of ``layer`` from the reference formulation."""
    with torch.no_grad():
        q, k, _ = clf.module_.layers[layer].qkv(_states(clf, X)[layer])
        return reference_softmax(q.double(), k.double())


# ----------------------------------------------------------------------------- entropy
def test_entropy_matches_reference_softmax(fitted):
    clf, X, _ = fitted
    ent = attention_entropy(clf, X, per_sample=True, per_gene=True)
    for layer in range(2):
        a = _reference_maps(clf, X, layer)
        expected = -(a * torch.log(a.clamp_min(1e-300))).sum(-1).numpy()
        np.testing.assert_allclose(ent[:, layer], expected, atol=2e-5)


def test_entropy_reductions_are_means_of_the_full_array(fitted):
    clf, X, _ = fitted
    full = attention_entropy(clf, X, per_sample=True, per_gene=True)
    assert full.shape == (40, 2, 3, 6)
    np.testing.assert_allclose(attention_entropy(clf, X), full.mean((0, 3)), rtol=1e-6)
    np.testing.assert_allclose(attention_entropy(clf, X, per_sample=True), full.mean(3), rtol=1e-6)
    np.testing.assert_allclose(attention_entropy(clf, X, per_gene=True), full.mean(0), rtol=1e-6)


def test_classifier_method_delegates(fitted):
    clf, X, _ = fitted
    np.testing.assert_array_equal(
        clf.attention_entropy(X, per_sample=True), attention_entropy(clf, X, per_sample=True)
    )


@settings(max_examples=15, deadline=None)
@given(scale=st.floats(0.01, 30.0), seed=st.integers(0, 2**16))
def test_entropy_lies_between_zero_and_log_genes(fitted, scale, seed):
    clf, _, _ = fitted
    X = np.random.default_rng(seed).normal(scale=scale, size=(5, 6)).astype(np.float32)
    ent = attention_entropy(clf, X, per_sample=True, per_gene=True)
    assert np.all(ent >= 0) and np.all(ent <= math.log(6) + 1e-6)


def test_uniform_attention_has_entropy_log_genes(fitted):
    clf, X, _ = fitted
    import copy

    flat = copy.deepcopy(clf)
    with torch.no_grad():
        for layer in flat.module_.layers:
            layer.WQ.zero_()  # q = 0: every score 0, the softmax is uniform
    np.testing.assert_allclose(attention_entropy(flat, X), math.log(6), rtol=1e-6)


def test_one_hot_attention_has_entropy_near_zero(fitted):
    clf, _, _ = fitted
    import copy

    sharp = copy.deepcopy(clf)
    with torch.no_grad():
        layer = sharp.module_.layers[0]
        layer.WQ.fill_(50.0)
        layer.WK.copy_(torch.arange(6.0).view(1, 6, 1).expand_as(layer.WK))
    X = np.ones((3, 6), dtype=np.float32)  # q_i = 50, k_j = j: all mass on the last gene
    ent = attention_entropy(sharp, X, per_sample=True)
    assert np.all(ent[:, 0] < 1e-6)


def test_entropy_table_is_long_and_matches_the_array(fitted):
    clf, X, _ = fitted
    ent = attention_entropy(clf, X[:4], per_sample=True)
    table = entropy_table(ent)
    assert list(table.columns) == ["sample", "layer", "head", "entropy"]
    assert len(table) == ent.size
    row = table[(table["sample"] == 3) & (table["layer"] == 1) & (table["head"] == 2)]
    assert row["entropy"].item() == ent[3, 1, 2]
    per_gene = entropy_table(
        attention_entropy(clf, X, per_gene=True), per_gene=True, genes=list("abcdef")
    )
    assert list(per_gene.columns) == ["layer", "head", "gene", "entropy"]
    assert set(per_gene["gene"]) == set("abcdef")
    with pytest.raises(ValueError, match="per_gene=True"):
        entropy_table(np.ones((2, 2, 2, 2)))


# ----------------------------------------------------------------------------- maps
@pytest.mark.parametrize("masked", [True, False])
def test_attention_map_matches_reference(fitted, masked):
    clf, X, _ = fitted
    a = _reference_maps(clf, X[:7], 1)
    if masked:
        a = a * (1 - torch.eye(6, dtype=a.dtype))
    per_sample = attention_map(clf, X[:7], layer=1, head=2, average=False, masked=masked)
    np.testing.assert_allclose(per_sample, a[:, 2].numpy(), atol=1e-6)
    mean = attention_map(clf, X[:7], layer=-1, head=None, masked=masked)
    np.testing.assert_allclose(mean, a.mean((0, 1)).numpy(), atol=1e-6)


def test_attention_map_gene_subset_is_the_submatrix(fitted):
    clf, X, _ = fitted
    full = attention_map(clf, X, layer=0, head=1)
    idx = [4, 1, 3]
    np.testing.assert_allclose(
        attention_map(clf, X, layer=0, head=1, genes=idx), full[np.ix_(idx, idx)], atol=1e-6
    )


def test_attention_map_gene_names_from_dataframe():
    clf, X, y = _fit(n_genes=5, n_layers=1, n_heads=1, epochs=1)
    cols = [f"g{i}" for i in range(5)]
    clf_df = TGEMClassifier(n_layers=1, n_heads=1, max_epochs=1, random_state=0, device="cpu").fit(
        pd.DataFrame(X, columns=cols), y
    )
    Xdf = pd.DataFrame(X, columns=cols)
    by_name = attention_map(clf_df, Xdf, genes=["g3", "g0"])
    by_pos = attention_map(clf_df, Xdf, genes=[3, 0])
    np.testing.assert_array_equal(by_name, by_pos)
    with pytest.raises(ValueError, match="not in the model"):
        attention_map(clf_df, Xdf, genes=["nope"])


def test_attention_map_too_large_raises_memory_error_with_size(fitted, monkeypatch):
    clf, X, _ = fitted
    monkeypatch.setattr(memory_mod, "available_memory", lambda: (1000, "cgroup memory limit"))
    with pytest.raises(MemoryError, match=r"shape \(40, 6, 6\) needing.*cgroup memory limit"):
        attention_map(clf, X, average=False)


def test_attention_map_rejects_bad_layer_and_head(fitted):
    clf, X, _ = fitted
    with pytest.raises(ValueError, match="layer=5"):
        attention_map(clf, X, layer=5)
    with pytest.raises(ValueError, match="head=3"):
        attention_map(clf, X, head=3)


# ----------------------------------------------------------------------------- embeddings
def test_layer_outputs_are_the_blocks_outputs(fitted):
    clf, X, _ = fitted
    states = _states(clf, X)
    out = layer_outputs(clf, X)
    assert out.shape == (2, 40, 6)
    for li in range(2):
        np.testing.assert_allclose(out[li], states[li + 1].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(layer_outputs(clf, X, layers=[1]), out[1:])


def test_analysis_leaves_inputs_and_model_unchanged(fitted):
    clf, X, _ = fitted
    X_before = X.copy()
    params = {k: v.clone() for k, v in clf.module_.state_dict().items()}
    attention_entropy(clf, X)
    attention_map(clf, X)
    attention_attribution(clf, X[:3], "up", n_steps=4)
    np.testing.assert_array_equal(X, X_before)
    for k, v in clf.module_.state_dict().items():
        assert torch.equal(v, params[k])
    assert not clf.module_.training


# ----------------------------------------------------------------------------- attribution
class _SoftmaxMap(nn.Module):
    """The reference formulation's softmax map as a module captum can hook."""

    def forward(self, q, k):
        return reference_softmax(q, k)


class _ReferenceNet(nn.Module):
    """TGEMNet's forward with materialised, hookable softmax maps (the original's layout)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.maps = nn.ModuleList(_SoftmaxMap() for _ in net.layers)

    def forward(self, x):
        h = self.net.standardize_input(x)  # the network's first operation (standardize=True)
        for i, layer in enumerate(self.net.layers):
            q, k, v = layer.qkv(h)
            a = self.maps[i](q, k)
            a = a.masked_fill(torch.eye(a.shape[-1], dtype=torch.bool), 0.0)
            h = self.net.block(i, h, (a @ v.unsqueeze(-1)).squeeze(-1))
        return self.net.head(h)


def _captum_scores(clf, X, target, layer, n_steps, method):
    from captum.attr import LayerIntegratedGradients

    ref = _ReferenceNet(clf.module_).eval()
    lig = LayerIntegratedGradients(ref, ref.maps[layer])
    t = int(np.flatnonzero(clf.classes_ == target)[0])
    a = lig.attribute(torch.as_tensor(X), baselines=0, target=t, n_steps=n_steps, method=method)
    return a.sum(1).mean(0).detach().numpy()


@pytest.mark.parametrize("method,n_steps", [("gausslegendre", 16), ("riemann_trapezoid", 9)])
def test_attribution_matches_captum_layer_integrated_gradients(method, n_steps):
    clf, X, y = _fit(n_genes=7, n_layers=3, n_heads=2)
    Xc = X[y == "up"][:6]
    scores = attention_attribution(clf, Xc, "up", n_steps=n_steps, method=method)
    assert scores.shape == (3, 7, 7)
    for layer in range(3):
        expected = _captum_scores(clf, Xc, "up", layer, n_steps, method)
        scale = np.abs(expected).max()
        assert scale > 0
        np.testing.assert_allclose(scores[layer], expected, atol=1e-5 * scale + 1e-9)


def test_attribution_other_class_and_layer_subset_match_captum(fitted):
    clf, X, y = fitted
    Xc = X[y == "down"][:5]
    scores = attention_attribution(clf, Xc, "up", layers=[1], n_steps=10)
    expected = _captum_scores(clf, Xc, "up", 1, 10, "gausslegendre")
    np.testing.assert_allclose(scores[0], expected, atol=1e-5 * np.abs(expected).max())


def test_attribution_does_not_depend_on_batch_size(fitted):
    clf, X, _ = fitted
    a = attention_attribution(clf, X[:9], "down", n_steps=6, batch_size=2)
    b = attention_attribution(clf, X[:9], "down", n_steps=6, batch_size=9)
    np.testing.assert_allclose(a, b, atol=1e-6 * np.abs(a).max())


def test_attribution_completeness_without_activation_kinks():
    clf, X, _ = _fit(activation=None)
    scores, delta = attention_attribution(
        clf, X[:8], "up", n_steps=30, return_convergence_delta=True
    )
    assert delta.shape == (8, 2)
    assert np.abs(delta).max() < 1e-5
    assert np.all(np.diagonal(scores, axis1=1, axis2=2) == 0)


def test_attribution_completeness_gap_shrinks_with_steps():
    clf, X, _ = _fit(activation="leakyrelu")
    gaps = [
        np.abs(
            attention_attribution(
                clf,
                X[:8],
                "up",
                n_steps=n,
                method="riemann_trapezoid",
                return_convergence_delta=True,
            )[1]
        ).max()
        for n in (4, 64)
    ]
    assert gaps[1] < gaps[0] / 4


def test_attribution_rejects_unknown_target_and_method(fitted):
    clf, X, _ = fitted
    with pytest.raises(ValueError, match="not one of the classes"):
        attention_attribution(clf, X, "sideways")
    with pytest.raises(ValueError, match="method="):
        attention_attribution(clf, X, "up", method="simpson")


# ----------------------------------------------------------------------------- networks
def _original_selection(scores, fraction):
    """The original get_net.py: normalise by max |.|, keep > the value at int(N*fraction)."""
    norm = np.array([s / np.max(np.abs(s)) for s in scores.astype(np.float64)])
    order = np.argsort(-norm.flatten())
    cut = norm.flatten()[order[int(len(order) * fraction)]]
    return {tuple(i) for i in np.argwhere(norm > cut)}


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), fraction=st.sampled_from([0.01, 0.05, 0.2]))
def test_edges_follow_the_original_selection(seed, fraction):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(3, 8, 8)).astype(np.float32) * np.array([1, 10, 0.1])[:, None, None]
    for s in scores:
        np.fill_diagonal(s, 0.0)
    edges = attention_edges(scores, [f"g{i}" for i in range(8)], top_fraction=fraction)
    got = {(r.layer, int(r.query[1:]), int(r.key[1:])) for r in edges.itertuples()}
    assert got == _original_selection(scores, fraction)
    assert edges["score"].is_monotonic_decreasing
    assert len(edges) == 0 or edges["score"].max() <= 1.0


def test_edges_selection_does_not_depend_on_the_scan_chunk(monkeypatch):
    import tgem.attention._network as net

    scores = np.random.default_rng(3).normal(size=(2, 9, 9)).astype(np.float32)
    whole = attention_edges(scores, top_fraction=0.1)
    monkeypatch.setattr(net, "EDGE_CHUNK", 5)
    pd.testing.assert_frame_equal(attention_edges(scores, top_fraction=0.1), whole)
    assert 0 < len(whole) <= int(2 * 81 * 0.1)


def test_edges_threshold_normalises_each_layer():
    s = np.zeros((2, 3, 3))
    s[0, 0, 1], s[0, 1, 0], s[1, 2, 1], s[1, 0, 2] = 2.0, 1.0, 100.0, -100.0
    edges = attention_edges(s, ["a", "b", "c"], threshold=0.4)
    assert edges[["layer", "query", "key"]].values.tolist() == [
        [0, "a", "b"],
        [1, "c", "b"],
        [0, "b", "a"],
    ]
    np.testing.assert_allclose(edges["score"], [1.0, 1.0, 0.5])
    assert len(attention_edges(s, top_fraction=0.0)) == 0


def test_hub_genes_count_degrees_per_class():
    edges = pd.DataFrame(
        {
            "class": ["x", "x", "x", "y"],
            "layer": [0, 1, 0, 0],
            "query": ["a", "a", "b", "c"],
            "key": ["b", "b", "c", "a"],
            "score": [1.0, 0.5, 0.25, 1.0],
        }
    )
    hubs = hub_genes(edges, top=None)
    x = hubs[hubs["class"] == "x"].set_index("gene")
    assert x.loc["b", "degree"] == 3 and x.loc["b", "in_degree"] == 2
    assert x.loc["a", "out_degree"] == 2 and x.loc["a", "degree"] == 2
    assert x.index[0] == "b"
    np.testing.assert_allclose(x.loc["b", "weighted_degree"], 1.75)
    assert hub_genes(edges, top=1, by="weighted_degree")["gene"].tolist() == ["b", "a"]


def test_tsv_and_graphml_export_round_trip(tmp_path):
    nx = pytest.importorskip("networkx")
    edges = pd.DataFrame(
        {
            "class": ["T&1", "T&1"],
            "layer": [0, 2],
            "query": ["CD3<E>", "CD3<E>"],
            "key": ["LCK", "LCK"],
            "score": [1.0, 0.25],
        }
    )
    write_edges(edges, tmp_path / "net.tsv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "net.tsv", sep="\t"), edges)
    write_graphml(edges, tmp_path / "net.graphml")
    graph = nx.read_graphml(tmp_path / "net.graphml")
    assert graph.is_directed() and graph.number_of_edges() == 2
    data = sorted(d["score"] for _, _, d in graph.edges(data=True))
    assert data == [0.25, 1.0]
    assert {d["class"] for _, _, d in graph.edges(data=True)} == {"T&1"}
    g2 = to_networkx(edges)
    assert set(g2.nodes) == {"CD3<E>", "LCK"} and g2.number_of_edges() == 2


def test_to_networkx_names_the_extra_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "networkx", None)
    edges = pd.DataFrame({"query": ["a"], "key": ["b"], "score": [1.0]})
    with pytest.raises(ImportError, match=r'pip install "tgem\[network\]"'):
        to_networkx(edges)


def test_attention_network_per_class_matches_attribution_and_edges(fitted):
    clf, X, y = fitted
    edges = attention_network(clf, X, y, target="up", top_fraction=0.1, n_steps=6)
    scores = attention_attribution(clf, X[y == "up"], "up", n_steps=6)
    expected = attention_edges(scores, [f"gene_{i}" for i in range(6)], top_fraction=0.1)
    pd.testing.assert_frame_equal(edges.drop(columns="class"), expected)
    assert set(edges["class"]) == {"up"}
    # without labels: the rows given are the class's samples
    no_y = attention_network(clf, X[y == "up"], target="up", top_fraction=0.1, n_steps=6)
    pd.testing.assert_frame_equal(no_y, edges)


# ----------------------------------------------------------------------------- plots
def test_plots_draw_without_error(fitted):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tgem.plotting import plot_attention_map, plot_entropy, plot_network

    clf, X, y = fitted
    ax = plot_entropy(attention_entropy(clf, X, per_sample=True), n_genes=6)
    assert len(ax.get_xticks()) == 6
    ax = plot_attention_map(attention_map(clf, X, genes=[0, 1, 2]), ["a", "b", "c"])
    assert ax.get_xlabel() == "key gene"
    edges = attention_network(clf, X, y, top_fraction=0.2, n_steps=4)
    with pytest.raises(ValueError, match="label="):
        plot_network(edges)
    ax = plot_network(edges, label="up", top=3)
    assert len(ax.texts) == 3
    plt.close("all")


def test_plots_name_the_extra_when_matplotlib_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    from tgem.plotting._attention import plot_entropy

    with pytest.raises(ImportError, match=r'pip install "tgem\[plot\]"'):
        plot_entropy(np.ones((2, 1, 1)))


# ----------------------------------------------------------------------------- real data
def test_entropy_and_attribution_on_pbmc_genes():
    with np.load(DATA / "pbmc68k_reduced.npz") as d:
        X, y = d["X"][::10], d["y_cell_type"][::10]
    clf = TGEMClassifier(n_layers=2, n_heads=2, max_epochs=1, random_state=0, device="cpu").fit(
        X, y
    )
    ent = attention_entropy(clf, X)
    assert ent.shape == (2, 2)
    assert np.all(ent > 0) and np.all(ent <= math.log(X.shape[1]) + 1e-6)
    target = "CD14+ Monocyte"
    scores, delta = attention_attribution(
        clf, X[y == target][:2], target, n_steps=4, return_convergence_delta=True
    )
    assert scores.shape == (2, 765, 765) and np.isfinite(scores).all()
    assert np.abs(scores).max() > 0


# ----------------------------------------------------------------------------- finite (item 6)
def _overflowing(clf):
    """A copy of ``clf`` whose first layer's values are infinite (``clf`` is untouched)."""
    import pickle

    other = pickle.loads(pickle.dumps(clf))
    with torch.no_grad():
        other.module_.layers[0].WV[0, 2, 0] = float("inf")
        other.module_.layers[0].WQ[0, 2, 0] = float("inf")
    return other


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (lambda clf, X: layer_outputs(clf, X), "layer_outputs' values"),
        (lambda clf, X: attention_map(clf, X, layer=0), "attention_map's attention weights"),
        (lambda clf, X: attention_entropy(clf, X), "attention_entropy's entropies"),
        (lambda clf, X: attention_attribution(clf, X, target="up"), "attention_attribution's"),
    ],
)
def test_non_finite_results_are_a_clear_error(fitted, call, what):
    """Overflowing numbers gave NaN outputs silently (issue 24, item 6)."""
    clf, X, _ = fitted
    with pytest.raises(FloatingPointError, match=rf"{what}.* not finite.*log-transform X"):
        call(_overflowing(clf), X[:5])


# ----------------------------------------------------------------------------- memory (item 14)
GIB = 1 << 30


def _fake_memory(monkeypatch, tmp_path, *, available_kib, cgroup=None, rlimit_as=None):
    """Point the memory limits' sources at files under ``tmp_path``.

    ``cgroup`` is ``(version, limit, usage)`` for this process's cgroup (``limit`` None: no
    limit), ``rlimit_as`` the soft RLIMIT_AS (None: unlimited) with a VmSize of 1 GiB.
    """
    import resource

    tmp_path.mkdir(parents=True, exist_ok=True)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: 65536000 kB\nMemAvailable: {available_kib} kB\n")
    status = tmp_path / "status"
    status.write_text(f"Name: python\nVmSize: {GIB // 1024} kB\nVmData: {GIB // 2048} kB\n")
    root = tmp_path / "cgroup"
    proc_cgroup = tmp_path / "proc_cgroup"
    proc_cgroup.write_text("")
    if cgroup is not None:
        version, limit, usage = cgroup
        if version == "v2":
            d = root / "user.slice" / "job"
            d.mkdir(parents=True)
            (d / "memory.max").write_text("max\n" if limit is None else f"{limit}\n")
            (d / "memory.current").write_text(f"{usage}\n")
            proc_cgroup.write_text("0::/user.slice/job\n")
        else:
            d = root / "memory" / "job"
            d.mkdir(parents=True)
            unlimited = 9223372036854771712
            (d / "memory.limit_in_bytes").write_text(f"{unlimited if limit is None else limit}\n")
            (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
            proc_cgroup.write_text("4:memory:/job\n3:cpu:/job\n")
    monkeypatch.setattr(memory_mod, "MEMINFO", str(meminfo))
    monkeypatch.setattr(memory_mod, "PROC_STATUS", str(status))
    monkeypatch.setattr(memory_mod, "PROC_CGROUP", str(proc_cgroup))
    monkeypatch.setattr(memory_mod, "CGROUP_ROOT", str(root))
    real = resource.getrlimit

    def getrlimit(which):
        if which == resource.RLIMIT_AS and rlimit_as is not None:
            return rlimit_as, resource.RLIM_INFINITY
        if which in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
            return resource.RLIM_INFINITY, resource.RLIM_INFINITY
        return real(which)

    monkeypatch.setattr(resource, "getrlimit", getrlimit)


def test_available_memory_is_free_memory_when_nothing_else_limits(monkeypatch, tmp_path):
    _fake_memory(monkeypatch, tmp_path, available_kib=8 * GIB // 1024)
    assert memory_mod.memory_limits() == {"available memory": 8 * GIB}
    assert memory_mod.available_memory() == (8 * GIB, "available memory")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_available_memory_is_bounded_by_the_cgroup_limit(monkeypatch, tmp_path, version):
    cgroup = (version, 3 * GIB, 1 * GIB)
    _fake_memory(monkeypatch, tmp_path, available_kib=8 * GIB // 1024, cgroup=cgroup)
    assert memory_mod.available_memory() == (2 * GIB, "cgroup memory limit")
    unlimited = (version, None, 1 * GIB)
    _fake_memory(monkeypatch, tmp_path / "x", available_kib=8 * GIB // 1024, cgroup=unlimited)
    assert memory_mod.available_memory() == (8 * GIB, "available memory")


def test_available_memory_is_bounded_by_the_ulimit(monkeypatch, tmp_path):
    # RLIMIT_AS of 2.5 GiB with 1 GiB of address space in use: 1.5 GiB left
    cgroup = ("v2", 4 * GIB, 1 * GIB)
    _fake_memory(
        monkeypatch, tmp_path, available_kib=8 * GIB // 1024, cgroup=cgroup, rlimit_as=5 * GIB // 2
    )
    limits = memory_mod.memory_limits()
    assert limits["RLIMIT_AS"] == 3 * GIB // 2 and "RLIMIT_DATA" not in limits
    assert memory_mod.available_memory() == (3 * GIB // 2, "RLIMIT_AS")


def test_attention_map_guard_follows_the_cgroup_limit_not_physical_memory(
    fitted, monkeypatch, tmp_path
):
    """The guard allowed half of physical RAM whatever the cgroup or ulimit (issue 24,
    item 14): a 64 GiB machine with 10 kB left in this process's cgroup must refuse."""
    clf, X, _ = fitted
    cgroup = ("v2", 64 * GIB, 64 * GIB - 10_000)
    _fake_memory(monkeypatch, tmp_path, available_kib=60 * GIB // 1024, cgroup=cgroup)
    with pytest.raises(MemoryError, match=r"shape \(40, 6, 6\).*cgroup memory limit"):
        attention_map(clf, X, average=False)
    assert attention_map(clf, X[:2], average=False).shape == (2, 6, 6)  # 288 bytes fit


def test_default_gene_names_are_the_same_in_interpret_and_attention():
    """One rule, ``gene_<j>``, wherever genes have no names (it was ``gene<i>`` in attention)."""
    from tgem.interpret import gene_ranking

    scores = np.zeros((1, 3, 3), dtype=np.float32)
    scores[0, 0, 1] = 1.0
    edges = attention_edges(scores, threshold=0.5)
    assert edges[["query", "key"]].values.tolist() == [["gene_0", "gene_1"]]
    ranking = gene_ranking(np.ones((2, 3)), np.array(["a", "a"]))
    assert sorted(ranking["gene"]) == ["gene_0", "gene_1", "gene_2"]
