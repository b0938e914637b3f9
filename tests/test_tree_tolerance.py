"""The tree code's tolerance: its bound, the estimator parameter, model files, pickles, CLI."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone

import tgem._kernels._tree as T
from tests._oracle import attention_and_grads
from tests.test_io import _rebuild, _to_bytes
from tgem import TGEMClassifier, load
from tgem._io import save
from tgem._kernels import (
    TOL_RANGE,
    _tree_native,
    check_tolerance,
    reference_attention,
    resolve_backend,
)
from tgem._kernels._tree import DEFAULT_TOL, tree_attention
from tgem._kernels._tree_native import tree_native_attention
from tgem._model import TGEMNet, module_init
from tgem.cli import build_parser
from tgem.cli._train import _classifier
from tgem.exceptions import ModelFileError

REQUIRE = os.environ.get("TGEM_REQUIRE_NATIVE", "").strip() not in ("", "0")
IMPLEMENTATIONS = ["tree", "tree_native"]


@pytest.fixture
def fn(request):
    """The implementation named by the test's ``impl`` (skip or, under TGEM_REQUIRE_NATIVE=1,
    fail where the native tree code cannot run)."""
    if request.param == "tree":
        return tree_attention
    reason = _tree_native._unavailable(torch.device("cpu"), torch.float32)
    if reason is not None:
        if REQUIRE:
            pytest.fail(f"TGEM_REQUIRE_NATIVE=1 but {reason}")
        pytest.skip(reason)
    return tree_native_attention


NAMES = ("out", "dq", "dk", "dv")


def _qkv(g, scale, seed=0, dtype=torch.float64, b=2, h=2):
    """Model-like inputs: x in [0, 4), Xavier-normal weights, q and k weights x ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, g, generator=gen, dtype=torch.float64) * 4.0
    w = torch.randn(3, h, g, generator=gen, dtype=torch.float64) * (2.0 / (g + 1)) ** 0.5
    grad = torch.randn(b, h, g, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (x * w[0] * scale, x * w[1] * scale, x * w[2], grad)]


def _scales(q, k, v, grad):
    """The scale of the terms each result sums: output, dq, dk, dv (the float32 rule's)."""
    mq, mk, mv, mg = (float(t.abs().max()) for t in (q, k, v, grad))
    return [mv, mg * mv * mk, mg * mv * mq, mg]


def _errors(fn, q, k, v, grad, tol):
    """Max abs error of the output and each gradient against the float64 reference."""
    wide = [t.double() for t in (q, k, v, grad)]
    ref = attention_and_grads(reference_attention, *wide)
    got = attention_and_grads(lambda a, b, c: fn(a, b, c, tol=tol), q, k, v, grad)
    return [float((e.double() - r).abs().max()) for e, r in zip(got, ref)], ref


def _metric(fn, q, k, v, grad, tol):
    """The documented metric: error / max(largest reference entry, scale of the terms)."""
    errors, ref = _errors(fn, q, k, v, grad, tol)
    return [
        err / max(float(r.abs().max()), scale)
        for err, r, scale in zip(errors, ref, _scales(q, k, v, grad))
    ]


# ------------------------------------------------------------------------ the bound
@pytest.mark.parametrize("fn", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("tol", [0.1, 1e-3, 1e-6, 1e-9, 1e-13])
@pytest.mark.parametrize("g, scale", [(50, 1.0), (300, 1.0), (300, 30.0), (300, 3000.0)])
def test_stated_bound_holds_in_float64(fn, tol, g, scale):
    for name, value in zip(NAMES, _metric(fn, *_qkv(g, scale), tol)):
        assert value <= tol, f"{name}: {value:.3g} of the scale at tolerance {tol:g}"


@pytest.mark.parametrize("fn", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("scale", [1.0, 30.0, 3000.0])
def test_output_error_is_below_the_tolerance_of_the_largest_reference_entry(fn, scale):
    q, k, v, grad = _qkv(300, scale)
    for tol in (0.1, 1e-4, 1e-8):
        errors, ref = _errors(fn, q, k, v, grad, tol)
        assert errors[0] <= tol * float(ref[0].abs().max())


@pytest.mark.parametrize("fn", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_looser_tolerance_gives_a_larger_but_bounded_error(fn, scale):
    q, k, v, grad = _qkv(300, scale, seed=1)
    worst = [max(_metric(fn, q, k, v, grad, tol)) for tol in (1e-2, 1e-5, 1e-9)]
    assert worst[0] > worst[1] > worst[2] > 0
    assert worst[0] <= 1e-2 and worst[1] <= 1e-5 and worst[2] <= 1e-9


@pytest.mark.parametrize("fn", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("tol", [None, 1e-3, 1e-6])
@pytest.mark.parametrize("scale", [1.0, 30.0, 3000.0])
def test_float32_error_is_the_float32_rule_plus_the_tolerance(fn, tol, scale):
    q, k, v, grad = _qkv(300, scale, dtype=torch.float32)
    wide = [t.double() for t in (q, k, v, grad)]
    exact = attention_and_grads(reference_attention, *wide)
    plain = attention_and_grads(reference_attention, q, k, v, grad)
    errors, _ = _errors(fn, q, k, v, grad, tol)
    eps = torch.finfo(torch.float32).eps
    for name, err, e, p, s in zip(NAMES, errors, exact, plain, _scales(*wide)):
        ref_err = float((p.double() - e).abs().max())
        bound = 2 * ref_err + 4 * eps * s + (0.0 if tol is None else tol * max(s, e.abs().max()))
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"


def test_defaults_keep_float32_far_below_its_rounding():
    assert DEFAULT_TOL[torch.float32] <= torch.finfo(torch.float32).eps / 50
    assert DEFAULT_TOL[torch.float64] == TOL_RANGE[0]


@pytest.mark.parametrize("tol", [0.0, -1.0, 1e-14, 0.5, float("nan"), "tight", True])
def test_tolerance_out_of_range_is_refused_by_the_kernels_and_the_network(tol):
    with pytest.raises(ValueError, match=r"tree_tolerance must be a number between 1e-13 and 0.1"):
        check_tolerance(tol)
    q, k, v, _ = _qkv(20, 1.0)
    with pytest.raises(ValueError, match="default"):
        tree_attention(q, k, v, tol=tol)
    with pytest.raises(ValueError, match="tree_tolerance"):
        TGEMNet(n_genes=4, n_classes=2, tree_tolerance=tol)


def test_resolve_binds_the_tolerance_to_the_tree_backends_only():
    for name in ("tree", "tree_native"):
        if name == "tree_native" and not _tree_native.tree_native_available():
            continue  # not built here: its own tests skip or fail
        assert resolve_backend(name, "cpu", torch.float64, tol=1e-3).fn.keywords == {"tol": 1e-3}
    assert resolve_backend("tree", "cpu", torch.float64).fn is tree_attention
    assert resolve_backend("exact", "cpu", tol=1e-3) is resolve_backend("exact", "cpu")


# ------------------------------------------------------------------------ the estimator
def _data(n=40, genes=9, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, genes)).astype(np.float32)
    y = np.arange(n) % 2
    X[np.arange(n), y] += 2.0
    return X, y


def _fit(**params):
    kw = dict(n_layers=1, n_heads=2, max_epochs=2, batch_size=8, random_state=0)
    return TGEMClassifier(**(kw | params)).fit(*_data())


@pytest.fixture(scope="module")
def loose():
    return _fit(attention_backend="tree", tree_tolerance=1e-4)


@pytest.mark.parametrize("value", [0, 0.5, -1e-9, 1e-20, float("nan"), "1e-6", True])
def test_invalid_parameter_is_refused_with_the_range(value):
    X, y = _data()
    with pytest.raises(ValueError, match=r"'tree_tolerance' parameter .* \[1e-13, 0.1\] or None"):
        TGEMClassifier(tree_tolerance=value, max_epochs=1).fit(X, y)


@pytest.mark.parametrize("fn", IMPLEMENTATIONS, indirect=True)
def test_the_network_passes_the_tolerance_to_the_tree(fn, monkeypatch):
    seen = []

    def spy(dtype, genes, tol=None):
        seen.append(tol)
        return parameters(dtype, genes, tol)

    parameters = T.tree_parameters
    monkeypatch.setattr(T, "tree_parameters", spy)
    name = "tree" if fn is tree_attention else "tree_native"
    clf = _fit(attention_backend=name, tree_tolerance=1e-4)
    assert clf.module_.tree_tolerance == 1e-4 and clf.attention_backend_ == name
    assert seen and set(seen) == {1e-4}
    seen.clear()
    clf.predict_proba(_data()[0][:3])
    assert seen and set(seen) == {1e-4}
    seen.clear()
    _fit(attention_backend=name)
    assert seen and set(seen) == {None}  # the dtype's default


def test_module_init_holds_a_set_tolerance_only(loose):
    assert module_init(loose.module_)["tree_tolerance"] == 1e-4
    assert "tree_tolerance" not in module_init(TGEMNet(n_genes=4, n_classes=2))


def test_warm_start_takes_the_new_tolerance():
    clf = _fit(attention_backend="tree", tree_tolerance=1e-4, warm_start=True)
    clf.set_params(tree_tolerance=1e-6).fit(*_data())
    assert clf.module_.tree_tolerance == 1e-6


def test_clone_and_get_params_keep_the_tolerance(loose):
    assert clone(loose).get_params()["tree_tolerance"] == 1e-4
    assert TGEMClassifier().get_params()["tree_tolerance"] is None


def test_model_file_round_trip_keeps_the_tolerance(loose, tmp_path):
    X = _data()[0]
    save(loose, tmp_path / "m.tgem")
    again = load(tmp_path / "m.tgem")
    assert again.tree_tolerance == again.module_.tree_tolerance == 1e-4
    assert np.array_equal(again.predict_proba(X), loose.predict_proba(X))


def test_pickle_round_trip_keeps_the_tolerance(loose):
    X = _data()[0]
    again = pickle.loads(pickle.dumps(loose))
    assert again.tree_tolerance == again.module_.tree_tolerance == 1e-4
    assert np.array_equal(again.predict_proba(X), loose.predict_proba(X))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_file_without_the_parameter_loads_with_the_default(version):
    clf = _fit(attention_backend="tree")

    def older(header):
        header["format_version"] = version
        del header["params"]["tree_tolerance"]
        assert "tree_tolerance" not in header["module"]  # the default is not written there

    again = load(io.BytesIO(_rebuild(_to_bytes(clf), header=older)))
    assert again.tree_tolerance is None and again.module_.tree_tolerance is None
    X = _data()[0]
    assert np.array_equal(again.predict_proba(X), clf.predict_proba(X))


def test_a_pickle_without_the_parameter_loads_with_the_default(loose):
    state = loose.__getstate__()
    del state["tree_tolerance"]
    del state["_module_init"]["tree_tolerance"]
    again = TGEMClassifier.__new__(TGEMClassifier)
    again.__setstate__(state)
    assert again.tree_tolerance is None and again.module_.tree_tolerance is None


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["params"].update(tree_tolerance=5.0), "tree_tolerance"),
        (lambda h: h["params"].update(tree_tolerance="tight"), "tree_tolerance"),
        (lambda h: h["module"].update(tree_tolerance=1e-30), "arguments"),
        (lambda h: h["module"].update(tree_tolerance=True), "arguments"),
    ],
)
def test_a_file_with_an_invalid_tolerance_is_refused(loose, edit, match):
    with pytest.raises(ModelFileError, match=match):
        load(io.BytesIO(_rebuild(_to_bytes(loose), header=edit)))


# ------------------------------------------------------------------------ the CLI
def test_cli_flag_sets_the_parameter():
    parse = build_parser().parse_args
    base = ["train", "d.csv", "--label", "y"]
    assert parse(base).tree_tolerance is None
    args = parse([*base, "--tree-tolerance", "1e-4"])
    assert args.tree_tolerance == 1e-4
    assert _classifier(args).tree_tolerance == 1e-4
