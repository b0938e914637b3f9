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
import time
import zipfile
from collections import Counter
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


# ---------------------------------------------------------------- mutations in a forked worker
#: Seed, cap on mutations and on seconds of the forked-worker fuzzer (CI's slow stage).
FORK_FUZZ_SEED, FORK_FUZZ_MAX, FORK_FUZZ_SECONDS = 24, 12000, 150
#: What loading a mutated file and predicting with it may raise: the loader's documented
#: refusal, and predict's documented refusal of a network whose output is not finite (a
#: header edit with a valid checksum can make a working but different model).
DOCUMENTED = {"ok", "exception:ModelFileError", "exception:FloatingPointError"}
NASTY_VALUES = [
    None,
    True,
    -1,
    0,
    2**31,
    2**63,
    10**30,
    -(10**30),
    1e308,
    "NaN",
    "Infinity",
    "",
    "<U200000000",
    "|S99999999",
    "<f2",
    "<f8",
    "|O",
    "V8",
    "cuda:99",
    "meta",
    "native",
    [],
    [0, 0],
    [10**12, 10**12],
    [-1],
    {},
    {"mapping": [[0, -1.0]]},
    {"dtype": "<U200000000", "values": ["a"]},
    "A" * 10_000,
]


def _header_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _header_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _header_paths(value, (*prefix, i))


def _zip_with(items: dict, checksum: bool = True, stored: bytes = b"") -> bytes:
    items = dict(items)
    items.pop("SHA256", None)
    digest = _digest(list(items.items())).encode() if checksum else stored
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, blob in [*items.items(), ("SHA256", digest)]:
            archive.writestr(name, blob)
    return out.getvalue()


def _mutate(data: bytes, items: dict, header: dict, rng) -> tuple[str, bytes]:
    """One random mutation of a valid model file: (what was done, the mutated bytes)."""
    kind = rng.choice(["flip", "truncate", "splice", "header", "npy-header", "entry-swap"])
    n = len(data)
    if kind == "flip":
        out = bytearray(data)
        where = rng.integers(0, n, size=int(rng.integers(1, 9))).tolist()
        for i in where:
            out[i] = int(rng.integers(0, 256))
        return f"flip {where}", bytes(out)
    if kind == "truncate":
        cut = int(rng.integers(0, n))
        return f"truncate at {cut}", data[:cut]
    if kind == "splice":
        i, j = sorted(rng.integers(0, n, size=2).tolist())
        k = int(rng.integers(0, n))
        how = rng.choice(["delete", "duplicate", "junk"])
        if how == "delete":
            return f"delete {i}:{j}", data[:i] + data[j:]
        if how == "duplicate":
            return f"copy {i}:{j} to {k}", data[:k] + data[i:j] + data[k:]
        junk = rng.integers(0, 256, size=int(rng.integers(1, 256)), dtype=np.uint8).tobytes()
        return f"insert {len(junk)} junk bytes at {k}", data[:k] + junk + data[k:]
    if kind == "header":  # the attacker's edit: any field, a nasty value, checksum recomputed
        edited = json.loads(json.dumps(header))
        paths = [p for p in _header_paths(edited) if p]
        path = paths[int(rng.integers(len(paths)))]
        value = NASTY_VALUES[int(rng.integers(len(NASTY_VALUES)))]
        node = edited
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        mutated = dict(items, **{"tgem.json": json.dumps(edited).encode()})
        return f"header {list(path)} = {value!r:.40}", _zip_with(mutated)
    if kind == "npy-header":  # an array entry whose own .npy header lies, checksum recomputed
        names = [k for k in items if k.endswith(".npy")]
        name = names[int(rng.integers(len(names)))]
        blob = items[name]
        end = blob.index(b"\n") + 1
        lie = rng.choice(
            [
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }",
                "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",
                "{'descr': '<U99999999', 'fortran_order': False, 'shape': (1,), }",
                "{'descr': '<f4', 'fortran_order': True, 'shape': (-1, 5), }",
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,), }",
                "__import__('os').system('echo pwned')",
            ]
        )
        head = blob[:10] + (lie + " " * max(0, end - 11 - len(lie)) + "\n").encode("latin-1")
        mutated = dict(items, **{name: head[:10] + head[10:] + blob[end:]})
        return f"npy header of {name} = {lie}", _zip_with(mutated)
    names = [k for k in items if k.endswith(".npy")]  # entry-swap: two arrays' bytes swapped
    a, b = (names[int(i)] for i in rng.choice(len(names), size=2, replace=False))
    mutated = dict(items, **{a: items[b], b: items[a]})
    return f"swap {a} and {b}", _zip_with(mutated)


@pytest.mark.slow
def test_random_mutations_never_crash_or_hang_the_loader_in_a_forked_worker(original):
    """Byte flips, truncations, splices, header and .npy-header edits (valid checksums), each
    loaded (and, when it loads, used to predict) in a forked worker restarted only after a
    crash: a crash or hang fails the test with the mutation that caused it."""
    from tests._fuzz import ForkWorker, is_failure, limit_memory

    data, X, _ = original
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        items = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    header = json.loads(items["tgem.json"])

    def load_and_predict(blob: bytes):
        model = load(io.BytesIO(blob))
        proba = model.predict_proba(X)
        if not (np.isfinite(proba).all() and np.allclose(proba.sum(1), 1)):
            raise AssertionError("a loaded model predicted invalid probabilities")

    rng = np.random.default_rng(FORK_FUZZ_SEED)
    outcomes: Counter = Counter()
    deadline = time.monotonic() + FORK_FUZZ_SECONDS
    with ForkWorker(load_and_predict, timeout=30, setup=limit_memory) as worker:
        for i in range(FORK_FUZZ_MAX):
            if time.monotonic() > deadline:
                break
            what, mutated = _mutate(data, items, header, rng)
            outcome = worker(mutated)
            outcomes[outcome] += 1
            assert not is_failure(outcome), (
                f"mutation #{i} (seed {FORK_FUZZ_SEED}: {what}) gave {outcome}"
            )
            assert outcome in DOCUMENTED, f"mutation #{i} ({what}) raised {outcome}"
        print(f"{sum(outcomes.values())} mutations: {dict(outcomes)}")
        assert worker.starts == 1
    assert sum(outcomes.values()) >= 200, outcomes  # the cap left room for real fuzzing
    assert outcomes["exception:ModelFileError"] > 0, outcomes
