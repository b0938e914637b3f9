"""Model files and checkpoints against hostile or unusual files (issue 24, items 8, 9 and 10).

What ``tgem.load`` must refuse before reading or allocating (non-regular files, oversized files
and headers, declared dtypes and shapes the bytes do not hold), the atomic writer's temporary
files and concurrent saves, half-precision files, parameters checked against the constructor's
constraints, and files written by tgem 0.1.0 that must still load.
"""

import io
import json
import os
import pickle
import sys
import threading
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import torch

import tgem._io
from tests._fuzz import limit_memory, run_in_fork
from tgem import TGEMClassifier, load
from tgem._io import _digest
from tgem.exceptions import ModelFileError

COMPAT = Path(__file__).parent / "fixtures" / "compat_0.1"


# ------------------------------------------------------------------ files written by tgem 0.1.0
def _compat_expected():
    with np.load(COMPAT / "expected.npz", allow_pickle=False) as d:
        return d["X"], d["proba"], d["classes"]


@pytest.mark.parametrize("kind", ["tgem", "pickle", "joblib"])
def test_files_written_by_tgem_0_1_still_load_and_predict_the_same(kind):
    X, proba, classes = _compat_expected()
    if kind == "tgem":
        model = load(COMPAT / "model.tgem")
    elif kind == "pickle":
        with open(COMPAT / "model.pkl", "rb") as fh:
            model = pickle.load(fh)  # tgem's own committed test file
    else:
        model = joblib.load(COMPAT / "model.joblib")
    assert isinstance(model, TGEMClassifier)
    assert list(model.classes_) == list(classes)
    assert list(model.feature_names_in_) == ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY", "CD14"]
    frame = pd.DataFrame(X, columns=model.feature_names_in_)
    np.testing.assert_allclose(model.predict_proba(frame), proba, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ helpers
def _data(n=40, genes=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, genes)).astype(np.float32)
    y = np.arange(n) % 3
    X[np.arange(n), y] += 2.0
    return X, y


def _fit(**params):
    X, y = _data()
    kw = dict(n_layers=1, n_heads=2, max_epochs=2, batch_size=8, random_state=0)
    kw.update(params)
    return TGEMClassifier(**kw).fit(X, y), X


@pytest.fixture(scope="module")
def model_bytes():
    clf, X = _fit()
    buffer = io.BytesIO()
    clf.save(buffer)
    return buffer.getvalue(), X, clf.predict_proba(X)


def _rebuild(data: bytes, header=None) -> bytes:
    """Edit a model file's header (a function of the parsed JSON) and recompute the checksum."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        items = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    items.pop("SHA256")
    if header is not None:
        h = json.loads(items["tgem.json"])
        new = header(h)
        items["tgem.json"] = new if isinstance(new, bytes) else json.dumps(h).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, blob in [*items.items(), ("SHA256", _digest(list(items.items())).encode())]:
            archive.writestr(name, blob)
    return out.getvalue()


def _refused_in_a_child(target, match: str, timeout: float = 20) -> str:
    """Load ``target`` (a path, or bytes) in a forked child with bounded memory and time.

    Returns the child's outcome: "ok" when ``load`` raised ModelFileError matching ``match``;
    a hang, a crash or any other outcome (e.g. a MemoryError) is reported as such.
    """

    def check(_):
        source = io.BytesIO(target) if isinstance(target, bytes) else target
        with pytest.raises(ModelFileError, match=match):
            load(source)

    return run_in_fork(check, b"", timeout=timeout, setup=limit_memory)


needs_proc = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="bounds the child's memory through /proc"
)


# ------------------------------------------------------------------ item 8: what load reads
@needs_proc
def test_a_symlink_to_dev_zero_is_refused_before_reading(tmp_path):
    link = tmp_path / "model.tgem"
    link.symlink_to("/dev/zero")
    assert _refused_in_a_child(link, "not a regular file") == "ok"


@needs_proc
def test_a_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "model.tgem"
    os.mkfifo(fifo)
    assert _refused_in_a_child(fifo, "not a regular file", timeout=10) == "ok"


@pytest.mark.parametrize("target", ["directory", "/dev/null"])
def test_directories_and_devices_are_refused(tmp_path, target):
    path = tmp_path if target == "directory" else Path(target)
    with pytest.raises(ModelFileError, match=r"not a regular file.*pass the path of a \.tgem"):
        load(path)


@needs_proc
def test_a_file_above_the_size_cap_is_refused_before_reading(tmp_path):
    cap = getattr(tgem._io, "MAX_FILE_SIZE", 1 << 30)
    path = tmp_path / "huge.tgem"
    with open(path, "wb") as fh:  # sparse: takes no disk space
        fh.write(b"PK\x03\x04")
        fh.truncate(cap + 1)
    assert _refused_in_a_child(path, "size cap") == "ok"


def test_a_file_object_is_read_with_a_bound(model_bytes, monkeypatch):
    data, _, _ = model_bytes
    monkeypatch.setattr(tgem._io_read, "MAX_FILE_SIZE", len(data) - 1, raising=False)

    class Endless(io.RawIOBase):
        """A stream that never ends; reading it whole would never return."""

        def readable(self):
            return True

        def readinto(self, buffer):
            buffer[:] = b"\0" * len(buffer)
            return len(buffer)

        def readall(self):
            raise AssertionError("load read an unbounded stream whole")

    with pytest.raises(ModelFileError, match="size cap"):
        load(Endless())
    with pytest.raises(ModelFileError, match="size cap"):
        load(io.BytesIO(data))  # one byte over the (lowered) cap
    monkeypatch.setattr(tgem._io_read, "MAX_FILE_SIZE", len(data))
    assert load(io.BytesIO(data)).n_features_in_ == 6


def test_a_header_above_the_header_cap_is_refused(model_bytes):
    data, _, _ = model_bytes
    cap = getattr(tgem._io, "MAX_HEADER_SIZE", 16 << 20)
    padded = _rebuild(data, header=lambda h: json.dumps(h).encode() + b" " * cap)
    with pytest.raises(ModelFileError, match="header.*cap"):
        load(io.BytesIO(padded))


@needs_proc
def test_a_huge_declared_classes_dtype_is_refused_not_allocated(model_bytes):
    data, _, _ = model_bytes

    def edit(h):
        h["fitted"]["classes_"] = {"dtype": "<U200000000", "values": ["0", "1", "2"]}

    crafted = _rebuild(data, header=edit)
    assert len(crafted) < 20_000
    assert _refused_in_a_child(crafted, "classes_.*<U200000000") == "ok"


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["fitted"]["classes_"].update(dtype="|S100000000"), "classes_"),
        (lambda h: h["fitted"]["classes_"].update(dtype=["<f4"]), "classes_"),
        (lambda h: h["fitted"]["classes_"].update(dtype="V8"), "classes_"),
        (lambda h: h["arrays"][0].update(shape=[10**12, 10**12]), "shape"),
        (lambda h: h["arrays"][0].update(shape="big"), "shape"),
        (lambda h: h["arrays"][0].update(dtype="<U99999999"), "dtype"),
        (lambda h: h.update(arrays=[{"name": 1}] * 3), "manifest"),
    ],
)
def test_declared_dtypes_and_shapes_are_checked_before_allocating(model_bytes, edit, match):
    data, _, _ = model_bytes
    with pytest.raises(ModelFileError, match=match):
        load(io.BytesIO(_rebuild(data, header=edit)))


# ------------------------------------------------------------------ loaded parameters
@pytest.mark.parametrize(
    "param, value, match",
    [
        ("n_layers", 0, "n_layers"),
        ("n_threads", True, "n_threads"),
        ("n_threads", 10**30, "n_threads"),
        ("max_epochs", 2**40, "max_epochs"),
        ("batch_size", 2.5, "batch_size"),
        ("dropout", 1.5, "dropout"),
        ("device", "tpu", "device"),
        ("class_weight", {"mapping": [[0, "heavy"]]}, "class_weight"),
        ("class_weight", {"mapping": [[0, -1.0]]}, "class_weight"),
        ("class_weight", {"mapping": [[0, 1e309]]}, "class_weight"),
        ("class_weight", {"mapping": [[7, 1.0]]}, "class_weight"),
        ("class_weight", {"mapping": [[0, {"mapping": []}]]}, "class_weight"),
    ],
)
def test_loaded_parameters_are_checked_against_the_constructor(
    model_bytes, tmp_path, param, value, match
):
    data, _, _ = model_bytes
    path = tmp_path / "crafted.tgem"
    path.write_bytes(_rebuild(data, header=lambda h: h["params"].update({param: value})))
    with pytest.raises(ModelFileError, match=rf"crafted\.tgem.*{match}") as info:
        load(path)
    assert "parameter" in str(info.value)


def test_a_valid_class_weight_mapping_still_loads():
    clf, X = _fit(class_weight={0: 1.0, 1: 2.0, 2: 0.5})
    buffer = io.BytesIO()
    clf.save(buffer)
    assert load(io.BytesIO(buffer.getvalue())).class_weight == {0: 1.0, 1: 2.0, 2: 0.5}


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_iter_", "5"),
        ("n_iter_", -1),
        ("best_epoch_", 10**9),
        ("attention_backend_", ["native"]),
        ("device_", 3),
        ("stopped", {"x": 1}),
        ("best_loss", "lots"),
        ("feature_names_in_", ["a", "a", "b", "c", "d", "e"]),
    ],
)
def test_loaded_fitted_attributes_are_checked(model_bytes, field, value):
    data, _, _ = model_bytes
    crafted = _rebuild(data, header=lambda h: h["fitted"].update({field: value}))
    with pytest.raises(ModelFileError, match=field):
        load(io.BytesIO(crafted))


def test_duplicate_class_labels_are_refused(model_bytes):
    data, _, _ = model_bytes
    crafted = _rebuild(data, header=lambda h: h["fitted"]["classes_"].update(values=[0, 0, 2]))
    with pytest.raises(ModelFileError, match="classes_.*repeat"):
        load(io.BytesIO(crafted))


# ------------------------------------------------------------------ item 9: writing files
def test_save_never_follows_a_planted_symlink_at_the_temporary_name(tmp_path):
    clf, _ = _fit()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "model.tgem"
    for pid in {os.getpid(), *range(os.getpid() - 2, os.getpid() + 3)}:  # old predictable names
        (tmp_path / f".model.tgem.{pid}.tmp").symlink_to(victim)
    clf.save(target)
    assert victim.read_text() == "precious"
    assert load(target).n_features_in_ == 6
    leftovers = {p.name for p in tmp_path.iterdir()} - {"victim.txt", "model.tgem"}
    assert all(name.endswith(".tmp") and (tmp_path / name).is_symlink() for name in leftovers)


def test_threads_saving_one_path_all_succeed(tmp_path):
    """The reproduction: 180 saves from threads of one process to one path."""
    clf, X = _fit()
    folder = tmp_path
    target = folder / "shared.tgem"
    errors = []

    def work():
        for _ in range(30):
            try:
                clf.save(target)
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], f"{len(errors)} of 180 saves failed, e.g. {errors[:2]}"
    np.testing.assert_array_equal(load(target).predict_proba(X), clf.predict_proba(X))
    assert [p.name for p in folder.iterdir()] == ["shared.tgem"]  # no temporary file left


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    clf, _ = _fit()
    target = tmp_path / "model.tgem"
    target.mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        clf.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["model.tgem"]

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        clf.save(tmp_path / "other.tgem")
    assert [p.name for p in tmp_path.iterdir()] == ["model.tgem"]


def test_a_saved_file_gets_the_usual_permissions(tmp_path):
    clf, _ = _fit()
    umask = os.umask(0o022)
    try:
        clf.save(tmp_path / "model.tgem")
    finally:
        os.umask(umask)
    assert (tmp_path / "model.tgem").stat().st_mode & 0o777 == 0o644


def test_concurrent_fits_sharing_a_checkpoint_path_fail_clearly(tmp_path, monkeypatch):
    """While one fit holds checkpoint=path, another fit given that path is refused at once."""
    X, y = _data()
    path = tmp_path / "best.tgem"
    first_write, release = threading.Event(), threading.Event()
    real_save = tgem._io.save

    def slow_save(model, target):
        if not first_write.is_set():
            first_write.set()
            release.wait(60)
        real_save(model, target)

    monkeypatch.setattr(tgem._io, "save", slow_save)
    params = dict(n_layers=1, n_heads=2, max_epochs=2, batch_size=8, random_state=0)
    results = []
    holder = threading.Thread(
        target=lambda: results.append(TGEMClassifier(**params).fit(X, y, checkpoint=path))
    )
    holder.start()
    try:
        assert first_write.wait(60)
        with pytest.raises(RuntimeError, match=r"best\.tgem.*in use by another fit"):
            TGEMClassifier(**params).fit(X, y, checkpoint=path)
    finally:
        release.set()
        holder.join()
    assert len(results) == 1 and load(path).n_features_in_ == 6
    # the lock goes with the fit: a later fit may use the path, and no lock file is left behind
    TGEMClassifier(**params).fit(X, y, checkpoint=path)
    assert [p.name for p in tmp_path.iterdir()] == ["best.tgem"]


def test_a_checkpoint_in_a_missing_folder_fails_before_training(tmp_path):
    X, y = _data()
    clf = TGEMClassifier(n_layers=1, n_heads=2, max_epochs=2, random_state=0)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        clf.fit(X, y, checkpoint=tmp_path / "no" / "best.tgem")
    assert not hasattr(clf, "module_")


def test_only_rank_0_of_a_ddp_fit_holds_the_checkpoint(monkeypatch):
    from tgem._checkpoints import writes_checkpoints

    for var, value in {"MASTER_ADDR": "x", "MASTER_PORT": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(var, value)
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.setenv(var, "1")
    assert not writes_checkpoints("auto")
    assert writes_checkpoints(False)  # an independent fit on each rank writes its own
    monkeypatch.setenv("RANK", "0")
    assert writes_checkpoints("auto")


# ------------------------------------------------------------------ item 10: half precision
def test_a_float16_model_file_is_upcast_to_float32_with_a_warning_and_predicts():
    clf, X = _fit()
    clf.module_.half()
    buffer = io.BytesIO()
    clf.save(buffer)
    header = json.loads(zipfile.ZipFile(io.BytesIO(buffer.getvalue())).read("tgem.json"))
    assert {a["dtype"] for a in header["arrays"]} == {"<f2"}
    with pytest.warns(UserWarning, match="float16.*float32"):
        loaded = load(io.BytesIO(buffer.getvalue()))
    assert {p.dtype for p in loaded.module_.state_dict().values()} == {torch.float32}
    clf.module_.float()  # the same weights, rounded to float16, computed in float32
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))


def test_a_bfloat16_model_is_saved_as_float32():
    clf, X = _fit()
    clf.module_.to(torch.bfloat16)
    buffer = io.BytesIO()
    clf.save(buffer)
    loaded = load(io.BytesIO(buffer.getvalue()))
    assert {p.dtype for p in loaded.module_.state_dict().values()} == {torch.float32}
    clf.module_.float()
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))
