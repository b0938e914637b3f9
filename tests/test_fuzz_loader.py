"""Fuzzing the model-file loader, and files crafted to run code when opened.

Every damaged or mutated file must either be refused with ``ModelFileError`` or load as the
very same model (a mutation can hit bytes that carry no data, e.g. a ZIP comment field);
nothing may crash, hang, or load as a different model without a header edit.
"""

import contextlib
import io
import json
import pickle
import signal
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tgem import TGEMClassifier
from tgem._io import _digest, load
from tgem.exceptions import ModelFileError

FUZZ = settings(
    max_examples=120,
    deadline=2000,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def original():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 5)).astype(np.float32)
    y = np.array(["a", "b", "c"])[np.arange(30) % 3]
    clf = TGEMClassifier(
        n_layers=2, n_heads=2, max_epochs=2, random_state=0, early_stopping=True
    ).fit(X, y)
    buffer = io.BytesIO()
    clf.save(buffer)
    return buffer.getvalue(), X, clf.predict_proba(X)


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Fail instead of hanging (Unix: SIGALRM)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise TimeoutError(f"load took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _refused_or_identical(data: bytes, X, proba) -> str:
    with _time_limit(10):
        try:
            model = load(io.BytesIO(data))
        except ModelFileError:
            return "refused"
    assert np.array_equal(model.predict_proba(X), proba)
    return "identical"


# ---------------------------------------------------------------- random byte mutations
@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6
    )
)
def test_byte_mutations_are_refused_or_harmless(original, edits):
    data, X, proba = original
    mutated = bytearray(data)
    for where, value in edits:
        mutated[int(where * len(data))] = value
    _refused_or_identical(bytes(mutated), X, proba)


@FUZZ
@given(
    where=st.floats(0, 1, exclude_max=True),
    length=st.integers(1, 64),
    insert=st.booleans(),
    junk=st.binary(min_size=1, max_size=64),
)
def test_insertions_deletions_and_truncations_are_refused(original, where, length, insert, junk):
    data, X, proba = original
    i = int(where * len(data))
    for mutated in (
        data[:i] + junk + data[i:] if insert else data[:i] + data[i + length :],
        data[:i],
    ):
        _refused_or_identical(mutated, X, proba)  # e.g. junk after the ZIP end is harmless


def test_every_single_bit_flip_in_the_arrays_and_header_is_refused(original):
    data, X, proba = original
    archive = zipfile.ZipFile(io.BytesIO(data))
    rng = np.random.default_rng(0)
    for info in archive.infolist():
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        for offset in rng.choice(info.file_size, size=min(info.file_size, 12), replace=False):
            mutated = bytearray(data)
            mutated[start + int(offset)] ^= 1 << int(rng.integers(8))
            assert _refused_or_identical(bytes(mutated), X, proba) == "refused", info.filename


# ---------------------------------------------------------------- header edits, valid checksum
def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _rebuild_with(data: bytes, header: dict) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        items = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    items.pop("SHA256")
    items["tgem.json"] = json.dumps(header).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, blob in [*items.items(), ("SHA256", _digest(list(items.items())).encode())]:
            archive.writestr(name, blob)
    return out.getvalue()


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["NaN", "cuda:7", "meta", "<f4", "|O", "auto"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@FUZZ
@given(choice=st.integers(0, 10**6), value=JSON_VALUES)
def test_header_edits_with_a_valid_checksum_are_refused_or_give_a_working_model(
    original, choice, value
):
    """What an attacker who recomputes the checksum can do: at worst a different model."""
    data, X, _ = original
    header = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("tgem.json"))
    paths = [p for p in _paths(header) if p]
    path = paths[choice % len(paths)]
    node = header
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with _time_limit(10):
        try:
            model = load(io.BytesIO(_rebuild_with(data, header)))
        except ModelFileError:
            return
    proba = model.predict_proba(X)
    assert proba.shape == (len(X), len(model.classes_))
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(1), 1)


# ---------------------------------------------------------------- code execution attempts
class _WritesFile:
    """Unpickling this object writes a file: the proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "code ran"))


def _object_npy(payload) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([payload, 1], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(_WritesFile(marker)))
    assert marker.read_text() == "code ran"
    marker.unlink()
    np.load(io.BytesIO(_object_npy(_WritesFile(marker))), allow_pickle=True)
    assert marker.exists()


def _crafted_files(data: bytes, marker: Path, tmp_path: Path):
    payload = _WritesFile(marker)
    yield "whole file is a pickle", pickle.dumps(payload)
    joblib.dump(payload, tmp_path / "p.joblib")
    yield "whole file is a joblib dump", (tmp_path / "p.joblib").read_bytes()
    torch.save({"weights": payload}, tmp_path / "p.pt")
    yield "whole file is a torch.save archive", (tmp_path / "p.pt").read_bytes()
    header = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("tgem.json"))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
    target = names[1]
    for what, blob, dtype in [
        (
            "object .npy entry (np.load with allow_pickle=True would run it)",
            _object_npy(payload),
            "|O",
        ),
        ("pickle as an array entry", pickle.dumps(payload), "<f4"),
        ("torch.save file as an array entry", (tmp_path / "p.pt").read_bytes(), "<f4"),
    ]:
        h = json.loads(json.dumps(header))
        h["arrays"][0]["dtype"] = dtype
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            items = {n: archive.read(n) for n in names}
        items.pop("SHA256")
        items[target] = blob
        items["tgem.json"] = json.dumps(h).encode()
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            for name, b in [*items.items(), ("SHA256", _digest(list(items.items())).encode())]:
                archive.writestr(name, b)
        yield what + " (checksum recomputed)", out.getvalue()
    h = json.loads(json.dumps(header))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("tgem.json", pickle.dumps(payload))
        archive.writestr("SHA256", "0" * 64)
    yield "pickle as the header", out.getvalue()


def test_crafted_files_never_run_code(original, tmp_path):
    data, _, _ = original
    marker = tmp_path / "pwned"
    cases = list(_crafted_files(data, marker, tmp_path))
    assert not marker.exists()
    for what, blob in cases:
        path = tmp_path / "crafted.tgem"
        path.write_bytes(blob)
        with pytest.raises(ModelFileError):
            load(path)
        assert not marker.exists(), f"loading a file with a {what} ran code"


# ---------------------------------------------------------------- the forked-worker helper
def _behave(data: bytes):
    import os
    import time

    if data == b"segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if data == b"abort":
        os.abort()
    if data == b"exit":
        os._exit(3)
    if data == b"hang":
        time.sleep(60)
    if data == b"raise":
        raise ModelFileError("refused")


def test_fork_worker_reports_each_outcome_and_restarts_only_after_a_crash():
    from tests._fuzz import ForkWorker, is_failure, run_in_fork

    with ForkWorker(_behave, timeout=3) as worker:
        outcomes = [worker(d) for d in (b"ok", b"raise", b"ok", b"segv", b"ok", b"abort")]
        assert outcomes == [
            "ok",
            "exception:ModelFileError",
            "ok",
            "crash:SIGSEGV",
            "ok",
            "crash:SIGABRT",
        ]
        assert worker.starts == 2  # one start, one restart after the SIGSEGV
        assert worker(b"exit") == "crash:exit3"
        assert worker(b"hang") == "timeout"
        assert worker(b"ok") == "ok"
    assert [is_failure(o) for o in ("ok", "exception:X", "crash:SIGSEGV", "timeout")] == [
        False,
        False,
        True,
        True,
    ]
    assert run_in_fork(_behave, b"segv", timeout=3) == "crash:SIGSEGV"
