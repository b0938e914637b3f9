"""The safe model file: tgem._io.save / load (TGEMClassifier.save, tgem.load)."""

import io
import json
import os
import pickle
import warnings
import zipfile

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.exceptions import NotFittedError

from tgem import TGEMClassifier
from tgem._io import FORMAT, FORMAT_VERSION, _digest, load, save
from tgem.exceptions import DeviceWarning, ModelFileError


def _data(n=40, genes=7, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, genes)).astype(np.float32)
    y = np.arange(n) % n_classes
    X[np.arange(n), y] += 2.0
    return X, y


def _fit(X, y, **params):
    kw = dict(n_layers=2, n_heads=2, max_epochs=3, batch_size=8, learning_rate=1e-2, random_state=0)
    kw.update(params)
    return TGEMClassifier(**kw).fit(X, y)


@pytest.fixture(scope="module")
def fitted():
    X, y = _data()
    return _fit(X, y, early_stopping=True, validation_fraction=0.25), X


def _to_bytes(model) -> bytes:
    buffer = io.BytesIO()
    save(model, buffer)
    return buffer.getvalue()


def _rebuild(data: bytes, *, header=None, entries=None, checksum=True) -> bytes:
    """Rewrite a model file: edit its header and/or entries, recompute the checksum or not."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        items = [(i.filename, archive.read(i.filename)) for i in archive.infolist()]
    items = dict(items)
    digest = items.pop("SHA256")
    if header is not None:
        h = json.loads(items["tgem.json"])
        header(h)
        items["tgem.json"] = json.dumps(h).encode()
    if entries is not None:
        entries(items)
    if checksum:
        digest = _digest(list(items.items())).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, blob in [*items.items(), ("SHA256", digest)]:
            archive.writestr(name, blob)
    return out.getvalue()


# ------------------------------------------------------------------------ round trips
@pytest.mark.parametrize(
    "params",
    [
        dict(),
        dict(activation=None, shared_norm=False, n_layers=1),
        dict(activation="gelu", dropout=0.0, class_weight="balanced"),
    ],
)
def test_loaded_model_predicts_bit_for_bit_on_cpu(params, tmp_path):
    X, y = _data(seed=1)
    clf = _fit(X, y, **params)
    path = tmp_path / "model.tgem"
    clf.save(path)
    loaded = load(path)
    assert np.array_equal(loaded.predict_proba(X), clf.predict_proba(X))
    assert np.array_equal(loaded.predict_log_proba(X), clf.predict_log_proba(X))
    assert np.array_equal(loaded.predict(X), clf.predict(X))
    for key, value in clf.module_.state_dict().items():
        assert torch.equal(loaded.module_.state_dict()[key], value), key
    assert not loaded.module_.training


def test_fitted_attributes_and_params_round_trip(fitted):
    clf, _ = fitted
    loaded = load(io.BytesIO(_to_bytes(clf)))
    assert loaded.get_params() == clf.get_params()
    assert loaded.n_features_in_ == clf.n_features_in_
    assert loaded.best_epoch_ == clf.best_epoch_
    assert loaded.n_iter_ == clf.n_iter_
    assert loaded.attention_backend_ == clf.attention_backend_
    assert loaded.device_ == torch.device("cpu")
    assert not hasattr(loaded, "feature_names_in_")
    # NaN-aware equality of every history entry (valid_loss is NaN without validation)
    assert len(loaded.history_) == len(clf.history_)
    for a, b in zip(loaded.history_, clf.history_):
        assert a.keys() == b.keys()
        np.testing.assert_array_equal(np.array(list(a.values())), np.array(list(b.values())))
    assert loaded._train_state_.best_loss == clf._train_state_.best_loss


def test_history_with_nan_entries_round_trips():
    X, y = _data()
    clf = _fit(X, y, max_epochs=2)  # no validation: valid_loss is NaN
    loaded = load(io.BytesIO(_to_bytes(clf)))
    assert np.isnan(loaded.history_[0]["valid_loss"])
    assert loaded.history_[1]["train_loss"] == clf.history_[1]["train_loss"]


def test_save_twice_gives_identical_bytes(fitted):
    clf, _ = fitted
    assert _to_bytes(clf) == _to_bytes(clf)
    assert _to_bytes(load(io.BytesIO(_to_bytes(clf)))) == _to_bytes(clf)


@pytest.mark.parametrize(
    "classes",
    [
        np.array(["down", "up", "x"]),
        np.array(["a", "bb", "ccc"], dtype=object),
        np.array([3, 7, 11], dtype=np.int64),
        np.array([-1, 0, 5], dtype=np.int32),
        np.array([0, 1, 255], dtype=np.uint8),
        np.array([0.5, 1.5, 1e300], dtype=np.float64),
        np.array([0.1, 0.2, 0.3], dtype=np.float32),
        np.array([b"a", b"b", b"\xff"]),
        np.array([1, "two", 3.5], dtype=object),
    ],
)
def test_classes_keep_their_exact_dtype_and_values(fitted, classes):
    clf, X = fitted
    clf = pickle.loads(pickle.dumps(clf))
    clf.classes_ = classes
    loaded = load(io.BytesIO(_to_bytes(clf)))
    assert loaded.classes_.dtype == classes.dtype
    assert [type(c) for c in loaded.classes_] == [type(c) for c in classes]
    assert loaded.classes_.tolist() == classes.tolist()
    assert np.array_equal(loaded.predict(X), clf.predict(X))


def test_bool_labels_round_trip():
    X, y = _data(n_classes=2)
    clf = _fit(X, y == 1, max_epochs=1)
    loaded = load(io.BytesIO(_to_bytes(clf)))
    assert loaded.classes_.dtype == bool
    assert np.array_equal(loaded.predict(X), clf.predict(X))


def test_feature_names_round_trip_and_are_enforced():
    X, y = _data()
    frame = pd.DataFrame(X, columns=[f"GENE{i}" for i in range(X.shape[1])])
    clf = _fit(frame, y, max_epochs=1)
    loaded = load(io.BytesIO(_to_bytes(clf)))
    assert loaded.feature_names_in_.dtype == object
    assert loaded.feature_names_in_.tolist() == clf.feature_names_in_.tolist()
    assert np.array_equal(loaded.predict_proba(frame), clf.predict_proba(frame))
    with pytest.raises(ValueError, match="feature names"):
        loaded.predict(frame.rename(columns={"GENE0": "OTHER"}))


def test_computed_feature_importances_are_saved(fitted):
    clf, _ = fitted
    clf = pickle.loads(pickle.dumps(clf))
    importances = np.linspace(0, 1, clf.n_features_in_)
    clf._feature_importances = importances / importances.sum()
    loaded = load(io.BytesIO(_to_bytes(clf)))
    assert np.array_equal(loaded.feature_importances_, clf._feature_importances)


def test_mapping_parameter_round_trips(fitted):
    clf, _ = fitted
    clf = pickle.loads(pickle.dumps(clf))
    weights = {0: 1.0, 1: 2.5, 2: 0.5}
    clf.set_params(class_weight=weights)
    loaded = load(io.BytesIO(_to_bytes(clf)))
    assert loaded.class_weight == weights
    assert [type(k) for k in loaded.class_weight] == [int, int, int]


def test_random_state_instance_is_saved_as_none_with_a_warning(fitted):
    clf, _ = fitted
    clf = pickle.loads(pickle.dumps(clf))
    clf.set_params(random_state=np.random.RandomState(0))
    with pytest.warns(UserWarning, match="random_state"):
        data = _to_bytes(clf)
    assert load(io.BytesIO(data)).random_state is None


def test_warm_start_after_load_equals_warm_start_in_memory():
    X, y = _data()
    clf = _fit(X, y, max_epochs=2, dropout=0.0)
    loaded = load(io.BytesIO(_to_bytes(clf)))
    for model in (clf, loaded):
        model.set_params(warm_start=True, max_epochs=2).fit(X, y)
    assert [r["epoch"] for r in loaded.history_] == [1, 2, 3, 4]
    assert np.array_equal(loaded.predict_proba(X), clf.predict_proba(X))


def test_file_is_plain_json_and_npy_arrays(fitted, tmp_path):
    clf, _ = fitted
    path = tmp_path / "m.tgem"
    clf.save(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert names[0] == "tgem.json" and names[-1] == "SHA256"
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
        header = json.loads(archive.read("tgem.json"))
        weight = np.load(
            io.BytesIO(archive.read("module/classifier.weight.npy")), allow_pickle=False
        )
    assert header["format"] == FORMAT and header["format_version"] == FORMAT_VERSION
    assert {"tgem", "torch", "numpy"} <= set(header["versions"])
    assert header["params"]["n_heads"] == 2
    assert header["module"]["n_genes"] == clf.n_features_in_
    assert np.array_equal(weight, clf.module_.classifier.weight.detach().numpy())
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind


def test_save_replaces_an_existing_file(fitted, tmp_path):
    clf, X = fitted
    path = tmp_path / "m.tgem"
    path.write_bytes(b"old content")
    clf.save(path)
    assert np.array_equal(load(path).predict_proba(X), clf.predict_proba(X))


def test_pickle_and_joblib_still_work(fitted, tmp_path):
    clf, X = fitted
    joblib.dump(clf, tmp_path / "m.joblib")
    for other in (pickle.loads(pickle.dumps(clf)), joblib.load(tmp_path / "m.joblib")):
        assert np.array_equal(other.predict_proba(X), clf.predict_proba(X))


# ------------------------------------------------------------------------ devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_model_loads_on_cpu_with_one_device_warning(fitted):
    clf, X = fitted
    clf = pickle.loads(pickle.dumps(clf))
    clf.device_ = torch.device("cuda:0")  # as written on a GPU machine
    data = _to_bytes(clf)
    assert (
        json.loads(zipfile.ZipFile(io.BytesIO(data)).read("tgem.json"))["fitted"]["device_"]
        == "cuda:0"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load(io.BytesIO(data))
    device_warnings = [w for w in caught if issubclass(w.category, DeviceWarning)]
    assert len(device_warnings) == 1 and "cuda:0" in str(device_warnings[0].message)
    assert loaded.device_ == torch.device("cpu")
    assert np.array_equal(loaded.predict_proba(X), clf.predict_proba(X))


def test_explicit_device_argument(fitted):
    clf, _ = fitted
    data = _to_bytes(clf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(io.BytesIO(data), device="cpu").device_ == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            load(io.BytesIO(data), device="cuda")


@pytest.mark.cuda
def test_cuda_model_round_trip_to_cpu(tmp_path):
    if not torch.cuda.is_available():
        if os.environ.get("TGEM_REQUIRE_CUDA") == "1":
            pytest.fail("TGEM_REQUIRE_CUDA=1 but no CUDA GPU is available")
        pytest.skip("needs CUDA")
    X, y = _data()
    clf = _fit(X, y, device="cuda", max_epochs=1)
    clf.save(tmp_path / "m.tgem")
    on_gpu = load(tmp_path / "m.tgem")
    on_cpu = load(tmp_path / "m.tgem", device="cpu")
    assert on_gpu.device_.type == "cuda"
    np.testing.assert_allclose(on_cpu.predict_proba(X), clf.predict_proba(X), atol=1e-5)


# ------------------------------------------------------------------------ refusals
def test_save_refuses_an_unfitted_model(tmp_path):
    with pytest.raises(NotFittedError):
        TGEMClassifier().save(tmp_path / "m.tgem")
    with pytest.raises(TypeError, match="TGEMClassifier"):
        save(object(), tmp_path / "m.tgem")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nothing.tgem")


def test_unknown_format_version_is_refused(fitted):
    clf, _ = fitted
    data = _rebuild(_to_bytes(clf), header=lambda h: h.update(format_version=4))
    with pytest.raises(
        ModelFileError,
        match=r"format version 4 .*reads format version\(s\) "
        r"\[1, 2, 3\]",
    ):
        load(io.BytesIO(data))


def test_wrong_checksum_is_refused(fitted):
    clf, _ = fitted

    def edit(items):  # a changed weight, with a valid ZIP CRC but the old SHA-256
        array = np.load(io.BytesIO(items["module/classifier.bias.npy"]))
        buffer = io.BytesIO()
        np.save(buffer, array + np.float32(1e-3))
        items["module/classifier.bias.npy"] = buffer.getvalue()

    data = _rebuild(_to_bytes(clf), entries=edit, checksum=False)
    with pytest.raises(ModelFileError, match="checksum"):
        load(io.BytesIO(data))


def test_edited_header_fails_the_checksum(fitted):
    clf, _ = fitted
    data = _rebuild(_to_bytes(clf), header=lambda h: h["params"].update(n_heads=3), checksum=False)
    with pytest.raises(ModelFileError, match="checksum"):
        load(io.BytesIO(data))


@pytest.mark.parametrize(
    "entry", ["tgem.json", "module/layers.0.WQ.npy", "module/classifier.bias.npy", "SHA256"]
)
def test_flipped_byte_in_any_entry_is_refused(fitted, entry):
    clf, _ = fitted
    data = bytearray(_to_bytes(clf))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo(entry)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for offset in (0, info.file_size // 2, info.file_size - 1):
        tampered = bytearray(data)
        tampered[start + offset] ^= 0x01
        with pytest.raises(ModelFileError):
            load(io.BytesIO(bytes(tampered)))


@pytest.mark.parametrize("keep", [0, 1, 3, 4, 100, 0.5, 0.9, -22, -1])
def test_truncated_file_is_refused(fitted, tmp_path, keep):
    clf, _ = fitted
    data = _to_bytes(clf)
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path = tmp_path / "cut.tgem"
    path.write_bytes(data[:cut])
    with pytest.raises(ModelFileError):
        load(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello",
        json.dumps({"format": "tgem-model"}).encode(),
        b"\x89PNG\r\n\x1a\n" * 10,
    ],
)
def test_foreign_files_are_refused(content):
    with pytest.raises(ModelFileError, match="not a tgem model file"):
        load(io.BytesIO(content))


def test_a_pickle_or_joblib_file_is_refused_with_a_hint(fitted, tmp_path):
    clf, _ = fitted
    joblib.dump(clf, tmp_path / "m.joblib")
    for data in (pickle.dumps(clf), (tmp_path / "m.joblib").read_bytes()):
        with pytest.raises(ModelFileError, match="pickle/joblib"):
            load(io.BytesIO(data))


def test_other_zip_archives_are_refused():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.csv", "a,b\n1,2\n")
    with pytest.raises(ModelFileError, match="not a tgem model file"):
        load(io.BytesIO(buffer.getvalue()))


def test_compressed_entries_are_refused(fitted):
    clf, _ = fitted
    with zipfile.ZipFile(io.BytesIO(_to_bytes(clf))) as archive:
        items = [(n, archive.read(n)) for n in archive.namelist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, blob in items:
            archive.writestr(name, blob)
    with pytest.raises(ModelFileError, match="uncompressed"):
        load(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h.update(format="other"), "format"),
        (lambda h: h["module"].update(n_genes=10**12), "n_genes"),
        (lambda h: h["module"].update(n_layers=10**9), "layers"),
        (lambda h: h["module"].update(n_heads=1), "architecture"),
        (lambda h: h["module"].update(activation="os.system"), "arguments"),
        (lambda h: h["fitted"].update(n_features_in_=3), "features"),
        (lambda h: h["fitted"]["classes_"].update(values=["a", "b"]), "classes"),
        (lambda h: h["fitted"]["classes_"].update(dtype="|O"), "dtype"),
        (lambda h: h["fitted"].update(history_=[{"epoch": "x"}]), "history"),
        (lambda h: h["params"].update(n_heads=-1), "n_heads"),
        (lambda h: h["params"].update(new_param=1), "new_param"),
        (lambda h: h["arrays"][0].update(dtype="<f8"), "dtype"),
        (lambda h: h["arrays"][0].update(shape=[1, 2, 3]), "shape"),
        (lambda h: h["arrays"].pop(), "manifest"),
    ],
)
def test_inconsistent_headers_are_refused_even_with_a_valid_checksum(fitted, edit, match):
    clf, _ = fitted
    data = _rebuild(_to_bytes(clf), header=edit)
    with pytest.raises(ModelFileError, match=match):
        load(io.BytesIO(data))


def test_skops_round_trip_when_installed(fitted, tmp_path):
    sio = pytest.importorskip("skops.io")
    clf, X = fitted
    sio.dump(clf, tmp_path / "m.skops")
    untrusted = sio.get_untrusted_types(file=tmp_path / "m.skops")
    assert set(untrusted) <= {"tgem._classifier.TGEMClassifier", "tgem._training.TrainState"}
    loaded = sio.load(tmp_path / "m.skops", trusted=untrusted)
    assert np.array_equal(loaded.predict_proba(X), clf.predict_proba(X))
