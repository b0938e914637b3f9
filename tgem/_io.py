"""The safe model file: ``TGEMClassifier.save`` and ``tgem.load``, with no pickle anywhere.

A tgem model file is a ZIP archive whose entries are stored uncompressed, in this order:

``tgem.json``
    UTF-8 JSON header: ``format`` (``"tgem-model"``), ``format_version``, the tgem, torch,
    NumPy and Python versions that wrote it, the estimator's ``get_params()``, its fitted
    attributes (``classes_`` with their exact dtype, ``n_features_in_``,
    ``feature_names_in_``, ``history_``, ``best_epoch_``, ``attention_backend_``, the device
    it was fitted on ...), the network's constructor arguments and a manifest of the arrays.
``module/<name>.npy``
    One NumPy ``.npy`` array per entry of the network's ``state_dict`` (little-endian).
``attributes/feature_importances_.npy``
    Only when the importances had been computed before saving.
``attributes/conformal_scores_.npy``
    Format version 2, only for a model fitted with ``calibration="temperature"``; the
    header's ``fitted["calibration"]`` then holds the temperature, the rejection thresholds
    and the calibration report (None otherwise). Version-1 files load without calibration
    (temperature 1).
``SHA256``
    The hex SHA-256 of the payload: for every other entry, in archive order, its name
    (UTF-8), a zero byte, its length (8 bytes, little-endian) and its bytes.

Why ``.npy`` and not ``torch.save``: ``torch.load(weights_only=True)`` still runs a
(restricted) unpickler, whose safety depends on the torch version installed (it has had
bypasses), while an ``.npy`` array without objects is a short literal header and raw bytes.
tgem parses that header with NumPy's literal reader, refuses object dtypes and checks the
byte count before touching the data, so nothing in a file is ever executed, and the arrays can
be read from any language. The checksum catches corruption and accidental edits; it is not a
signature (whoever can edit the file can recompute it): the guarantee against hostile files
comes from the format holding only JSON and numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import logging
import math
import numbers
import os
import platform
import stat
import struct
import tempfile
import threading
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np
import torch
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from tgem._calibration import RULES, TEMPERATURE_BOUNDS
from tgem._distributed import under_torchrun
from tgem._kernels import backend_names
from tgem._model import TGEMNet
from tgem._model import module_init as _module_init
from tgem._presets import FILE_VERSION_VALUES
from tgem._runtime import resolve_device
from tgem._training import TrainState
from tgem._version import __version__
from tgem.exceptions import DeviceWarning, ModelFileError

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_FILE_SIZE", "MAX_HEADER_SIZE", "load", "save"]

logger = logging.getLogger(__name__)

#: Value of the header's ``format`` field.
FORMAT = "tgem-model"
#: The format version this tgem writes; it reads this one and the ones listed in _READABLE.
FORMAT_VERSION = 2
_READABLE = (1, 2)
#: Largest model file :func:`load` reads, in bytes (1 GiB); larger files and streams are refused
#: before they are read. A model of 20,000 genes, 8 layers and 8 heads in float64 takes ~40 MB.
MAX_FILE_SIZE = 1 << 30
#: Largest header (``tgem.json``) :func:`load` parses, in bytes (16 MiB); it also bounds what the
#: header's declarations may allocate (e.g. ``classes_`` with its declared dtype).
MAX_HEADER_SIZE = 16 << 20
_READ_CHUNK = 16 << 20
# The largest count parameter (n_threads, batch_size, max_epochs ...) a loaded file may set: a
# C int, as torch.set_num_threads takes.
_MAX_COUNT = 2**31 - 1

_HEADER = "tgem.json"
_CHECKSUM = "SHA256"
_FEATURE_IMPORTANCES = "attributes/feature_importances_.npy"
_CONFORMAL_SCORES = "attributes/conformal_scores_.npy"
# The calibration report's fields (format version 2) and the type each must have.
_REPORT_FIELDS = {
    "n_train": int,
    "n_calibration": int,
    "temperature": float,
    "temperature_at_bound": bool,
    "accuracy": float,
    "nll_before": float,
    "nll_after": float,
    "ece_before": float,
    "ece_after": float,
    "target_rejection": float,
}
_ARRAY_DTYPES = {"<f2": torch.float16, "<f4": torch.float32, "<f8": torch.float64}
_FLOAT_CODES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# Fixed entry timestamps make two saves of one model byte-identical.
_DATE_TIME = (1980, 1, 1, 0, 0, 0)
# Anything a malformed archive, header or array can raise while being parsed.
_PARSE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
    UnicodeDecodeError,
    RuntimeError,
    struct.error,
    zlib.error,
    NotImplementedError,
    SyntaxError,
    MemoryError,
)


# ------------------------------------------------------------------------------- save
#: The estimator class that model files hold. ``tgem._classifier`` registers TGEMClassifier
#: when it is imported (it imports this module, never the other way round).
_estimator: type | None = None


def register_estimator(cls: type) -> None:
    """Make ``cls`` the class :func:`save` accepts and :func:`load` builds."""
    global _estimator
    _estimator = cls


def _estimator_class() -> type:
    if _estimator is None:  # only when tgem._io is loaded outside the tgem package
        raise RuntimeError("No estimator is registered with tgem._io; import tgem first.")
    return _estimator


def save(model, path: str | os.PathLike | IO[bytes]) -> None:
    """Write a fitted :class:`~tgem.TGEMClassifier` to ``path`` in tgem's safe format.

    The file holds JSON and plain numeric arrays only (see the module docstring and the
    "Model files" page of the user guide), never a pickle, so :func:`tgem.load` cannot run
    code from it. Writing goes to a temporary file in the same folder that then replaces
    ``path``, so an interrupted save never leaves a truncated file behind. The training rows
    are not saved. Two saves of the same model give identical bytes.

    Parameters
    ----------
    model : TGEMClassifier
        A fitted classifier.
    path : str, path-like or binary file object
        Where to write (conventionally ``*.tgem``); an existing file is replaced.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If ``model`` is not fitted.
    TypeError
        If ``model`` is not a TGEMClassifier.

    See Also
    --------
    load : Read a model file.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> from tgem import TGEMClassifier
    >>> from tgem._io import load, save
    >>> X = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    >>> y = np.where(X[:, 0] > 0, "up", "down")
    >>> clf = TGEMClassifier(n_layers=1, n_heads=2, max_epochs=2, random_state=0).fit(X, y)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.tgem"
    >>> save(clf, path)
    >>> same = load(path)
    >>> bool(np.array_equal(same.predict_proba(X), clf.predict_proba(X)))
    True
    """
    TGEMClassifier = _estimator_class()

    if not isinstance(model, TGEMClassifier):
        raise TypeError(
            f"save expects a fitted TGEMClassifier, got {type(model).__name__}. Save other "
            "estimators with joblib or skops."
        )
    check_is_fitted(model, "module_")
    module_state = model.module_.state_dict()
    arrays: dict[str, np.ndarray] = {
        f"module/{key}.npy": _to_numpy(value) for key, value in module_state.items()
    }
    importances = model.__dict__.get("_feature_importances")
    if importances is not None:
        arrays[_FEATURE_IMPORTANCES] = np.asarray(importances, dtype=np.float64)
    scores = model.__dict__.get("conformal_scores_")
    if scores is not None:
        arrays[_CONFORMAL_SCORES] = np.asarray(scores, dtype=np.float64)
    blobs = {name: _npy_bytes(array) for name, array in arrays.items()}
    header = _header(model, _module_init(model.module_), arrays)
    header_bytes = json.dumps(header, indent=1, allow_nan=False).encode("utf-8")
    entries = [(_HEADER, header_bytes), *blobs.items()]
    digest = _digest(entries)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in [*entries, (_CHECKSUM, digest.encode("ascii"))]:
            archive.writestr(zipfile.ZipInfo(name, date_time=_DATE_TIME), data)
    _write_atomically(path, buffer.getvalue())
    logger.info(
        "saved %s (%d arrays, %d bytes) to %s",
        type(model).__name__,
        len(arrays),
        buffer.tell(),
        path,
    )


def _write_atomically(path, data: bytes) -> None:
    """Write ``data`` to a fresh temporary file beside ``path``, then rename it onto ``path``.

    The temporary file comes from :func:`tempfile.mkstemp` (an unpredictable name created with
    ``O_EXCL``, so a planted symlink is never followed and concurrent saves of one path never
    share a temporary file); it is removed if anything fails. The file gets the permissions an
    ordinary ``open(path, "wb")`` would give it (``0o666`` less the umask).
    """
    if hasattr(path, "write"):
        path.write(data)
        return
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_folder(path.parent)


def _new_file_mode() -> int:
    """``0o666`` less the process's umask, read without changing it (``os.umask`` would)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def _sync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows it (best effort)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------- checkpoints
_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def checkpoint_lock(path):
    """Hold ``path`` as the checkpoint of one fit; a concurrent fit given it fails at once.

    Two fits writing one checkpoint file would interleave their models in it, so ``fit``
    takes this lock before training: within one process (threads, e.g. a threaded grid
    search) through a registry of held paths, across processes through an exclusive
    ``flock`` on a lock file ``.<name>.lock`` beside the checkpoint (removed again when the
    fit ends; the OS releases the lock if the process dies). Sequential fits may share a path.

    Parameters
    ----------
    path : str, path-like or None
        The checkpoint file; ``None`` holds nothing.

    Raises
    ------
    RuntimeError
        If another fit holds ``path``.
    FileNotFoundError
        If the checkpoint's folder does not exist.
    """
    if path is None:
        yield
        return
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"checkpoint must be a file path (str or path-like), got {type(path).__name__}; "
            'pass e.g. checkpoint="best.tgem".'
        )
    path = Path(path)
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"checkpoint={str(path)!r}: the folder {str(path.parent)!r} does not exist; create "
            "it or pass a checkpoint path in an existing folder."
        )
    key = str(folder / path.name)
    with _HELD_LOCK:
        if key in _HELD:
            raise _in_use(path, "in this process")
        _HELD.add(key)
    try:
        with _file_lock(folder / f".{path.name}.lock", path):
            yield
    finally:
        with _HELD_LOCK:
            _HELD.discard(key)


def writes_checkpoints(distributed) -> bool:
    """Whether this process writes ``fit``'s checkpoints (which only rank 0 of DDP does)."""
    if distributed is False:
        return True
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank() == 0
    if under_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0")) == 0
    return True


def _in_use(path: Path, where: str) -> RuntimeError:
    return RuntimeError(
        f"checkpoint={str(path)!r} is in use by another fit ({where}). Fits that run at the "
        "same time (threads, processes, or GridSearchCV with n_jobs != 1 given checkpoint= "
        "through fit) cannot share one checkpoint file: give each fit its own path, or run "
        "them one at a time."
    )


@contextlib.contextmanager
def _file_lock(lock_path: Path, path: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the in-process registry is the only guard
        yield
        return
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        fd = os.open(lock_path, flags, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(path, "in another process") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have unlinked the file we locked: lock the new one
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A weight as a NumPy array; bfloat16, which ``.npy`` cannot hold, becomes float32 (exact)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def _npy_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    out = io.BytesIO()
    np.lib.format.write_array(out, array, allow_pickle=False)
    return out.getvalue()


def _digest(entries) -> str:
    sha = hashlib.sha256()
    for name, data in entries:
        sha.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        sha.update(data)
    return sha.hexdigest()


def _header(model, module_init: dict, arrays: dict) -> dict:
    import sklearn

    state = getattr(model, "_train_state_", None)
    names = getattr(model, "feature_names_in_", None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "estimator": "TGEMClassifier",
        "versions": {
            "tgem": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "python": platform.python_version(),
        },
        "params": {k: _param_to_json(k, v) for k, v in model.get_params(deep=False).items()},
        "fitted": {
            "classes_": _classes_to_json(model.classes_),
            "n_features_in_": int(model.n_features_in_),
            "feature_names_in_": None if names is None else [str(n) for n in names],
            "history_": [{k: _float_to_json(v) for k, v in rec.items()} for rec in model.history_],
            "best_epoch_": None if model.best_epoch_ is None else int(model.best_epoch_),
            "n_iter_": int(model.n_iter_),
            "attention_backend_": str(model.attention_backend_),
            "device_": str(model.device_),
            "best_loss": _float_to_json(state.best_loss if state is not None else math.inf),
            "stopped": state.stopped if state is not None else "max_epochs",
            "calibration": _calibration_to_json(model),
        },
        "module": module_init,
        "arrays": [
            {"name": name, "dtype": a.dtype.newbyteorder("<").str, "shape": list(a.shape)}
            for name, a in arrays.items()
        ],
    }


def _calibration_to_json(model) -> dict | None:
    """The fitted temperature, rejection thresholds and report; None when not calibrated."""
    report = model.__dict__.get("calibration_report_")
    if report is None or "conformal_scores_" not in model.__dict__:
        return None
    return {
        "temperature_": float(model.temperature_),
        "rejection_thresholds_": {str(k): float(v) for k, v in model.rejection_thresholds_.items()},
        "calibration_report_": {
            k: (bool(v) if isinstance(v, bool | np.bool_) else _float_to_json(v))
            for k, v in report.items()
        },
    }


def _param_to_json(name: str, value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError(f"parameter {name}={value!r} is not finite; it cannot be saved.")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):  # e.g. class_weight={label: weight}; keys keep their type
        pairs = [[_label_to_json(k), _param_to_json(name, v)] for k, v in value.items()]
        return {"mapping": pairs}
    if name == "random_state":
        warnings.warn(
            f"random_state is a {type(value).__name__}, which a model file cannot hold; it is "
            "saved as None. Use an int random_state to keep refits repeatable.",
            UserWarning,
            stacklevel=4,
        )
        return None
    raise TypeError(
        f"parameter {name}={value!r} ({type(value).__name__}) cannot be written to a model "
        "file; set it to a number, string, bool or None before saving."
    )


def _label_to_json(value):
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, bool | int | float | str):
        raise TypeError(
            f"key {value!r} ({type(value).__name__}) cannot be saved; use a str, "
            "int, float or bool."
        )
    return value


def _param_from_json(value):
    if isinstance(value, dict):
        pairs = value["mapping"]
        if set(value) != {"mapping"} or not all(
            isinstance(p, list) and len(p) == 2 and type(p[0]) in (bool, int, float, str)
            for p in pairs
        ):
            raise ModelFileError(f"malformed mapping parameter {value!r}.")
        return {k: _param_from_json(v) for k, v in pairs}
    if isinstance(value, list):
        raise ModelFileError(f"parameter value {value!r} is a list, which no parameter takes.")
    return value


def _float_to_json(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _classes_to_json(classes: np.ndarray) -> dict:
    dtype = classes.dtype
    if dtype.kind in "biuf":
        return {"dtype": dtype.newbyteorder("<").str, "values": classes.tolist()}
    if dtype.kind == "U":
        return {"dtype": dtype.newbyteorder("<").str, "values": [str(c) for c in classes]}
    if dtype.kind == "S":
        return {"dtype": dtype.str, "values": [c.decode("latin-1") for c in classes.tolist()]}
    if dtype.kind == "O":
        values, types = [], []
        for c in classes.tolist():
            if isinstance(c, np.generic):
                c = c.item()
            kind = next((t for t in (bool, int, float, str) if type(c) is t), None)
            if kind is None:
                raise TypeError(
                    f"class label {c!r} of type {type(c).__name__} cannot be written to a model "
                    "file; use str, int, float or bool labels."
                )
            values.append(c)
            types.append(kind.__name__)
        return {"dtype": "object", "values": values, "types": types}
    raise TypeError(
        f"classes_ of dtype {dtype} cannot be written to a model file; use str, int, float or "
        "bool labels."
    )


# ------------------------------------------------------------------------------- load
def load(path: str | os.PathLike | IO[bytes], device: str = "auto"):
    """Read a model written by :meth:`TGEMClassifier.save <tgem.TGEMClassifier.save>`.

    Nothing in the file is executed: it is parsed as JSON and raw numeric arrays, and the
    checksum, the format version and every array's dtype and shape are verified before the
    model is built. No network access is needed. Only a regular file is read (a directory,
    FIFO, device or a symlink to one is refused before reading), at most
    :data:`MAX_FILE_SIZE` bytes (1 GiB) of it or of a stream, with a header of at most
    :data:`MAX_HEADER_SIZE` bytes (16 MiB); what the header declares (array dtypes and
    shapes, the labels' dtype) is checked against the bytes present before anything is
    allocated, and every parameter against the constructor's constraints.

    Parameters
    ----------
    path : str, path-like or binary file object
        The model file.
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where to put the network. ``"auto"`` keeps the device it was fitted on when that
        exists here and otherwise uses the CPU, with one :class:`~tgem.exceptions.DeviceWarning`.

    Returns
    -------
    TGEMClassifier
        The fitted classifier; on the CPU it predicts bit for bit as the saved one did.
        ``warm_start=True`` continues its training.

    Raises
    ------
    ModelFileError
        If the file is not a tgem model file, is truncated or corrupted (wrong checksum),
        comes from an unknown format version, is not a regular file, is above a size cap or
        declares something invalid. A subclass of ``ValueError``.
    FileNotFoundError
        If ``path`` does not exist.

    See Also
    --------
    save : Write a model file.

    Examples
    --------
    >>> import io, numpy as np
    >>> from tgem import TGEMClassifier
    >>> from tgem._io import load
    >>> X = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    >>> clf = TGEMClassifier(n_layers=1, n_heads=2, max_epochs=2, random_state=0)
    >>> clf = clf.fit(X, X[:, 0] > 0)
    >>> buffer = io.BytesIO()
    >>> clf.save(buffer)
    >>> load(io.BytesIO(buffer.getvalue())).classes_
    array([False,  True])
    >>> load(io.BytesIO(b"not a model"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tgem.exceptions.ModelFileError: <file object> is not a tgem model file ...
    """
    name = "<file object>" if hasattr(path, "read") else repr(str(path))
    target = None if device == "auto" else resolve_device(device)
    data = _read_stream(path, name) if hasattr(path, "read") else _read_file(path, name)
    try:
        header, arrays = _parse(data, name)
        model = _build(header, arrays, name)
    except ModelFileError:
        raise
    except _PARSE_ERRORS as exc:
        raise ModelFileError(
            f"{name} is damaged or is not a valid tgem model file ({type(exc).__name__}: "
            f"{exc}). Re-save it from the original model."
        ) from exc
    _place(model, target, name)
    return model


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular(mode: int, size: int, name: str) -> None:
    """Refuse what is not a regular file, or a file above :data:`MAX_FILE_SIZE`."""
    if not stat.S_ISREG(mode):
        kind = next((what for test, what in _FILE_KINDS if test(mode)), "not a plain file")
        raise ModelFileError(
            f"{name} is not a regular file (it is {kind}); pass the path of a .tgem model file "
            "written by TGEMClassifier.save."
        )
    if size > MAX_FILE_SIZE:
        raise _too_large(name, f"{size} bytes")


def _too_large(name: str, size: str) -> ModelFileError:
    return ModelFileError(
        f"{name} is larger than the model file size cap: {size}, the cap is {MAX_FILE_SIZE} "
        "bytes (tgem._io.MAX_FILE_SIZE). tgem model files are far smaller; this is not one."
    )


def _read_file(path, name: str) -> bytes:
    """Read a model file from disk: a regular file below the size cap, never a device or FIFO.

    The path is checked with ``os.stat`` before it is opened (so no device is even opened),
    opened with ``O_NONBLOCK`` (a FIFO swapped in meanwhile cannot block the open) and checked
    again on the open descriptor, and the read is bounded by :data:`MAX_FILE_SIZE`.
    """
    _check_regular(*_mode_and_size(os.stat(path)), name)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        _check_regular(*_mode_and_size(os.fstat(fd)), name)
        return _read_stream(fh, name)


def _mode_and_size(info: os.stat_result) -> tuple[int, int]:
    return info.st_mode, info.st_size


def _read_stream(fh, name: str) -> bytes:
    """Read a binary stream to its end in chunks, refusing more than :data:`MAX_FILE_SIZE`."""
    chunks, total = [], 0
    while True:
        chunk = fh.read(min(_READ_CHUNK, MAX_FILE_SIZE + 1 - total))
        if chunk is None:
            raise ModelFileError(
                f"{name} has no data ready (a non-blocking stream); pass a file or a stream "
                "that blocks."
            )
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise ModelFileError(
                f"{name} returned {type(chunk).__name__} from read(); open the model file in "
                "binary mode ('rb')."
            )
        if not chunk:
            return b"".join(chunks)
        chunks.append(bytes(chunk))
        total += len(chunk)
        if total > MAX_FILE_SIZE:
            raise _too_large(name, f"more than {MAX_FILE_SIZE} bytes")


def _parse(data: bytes, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Check the container, version and checksum; return the header and the arrays."""
    if not data.startswith(b"PK\x03\x04"):
        hint = ""
        if data[:1] == b"\x80" or data[:2] == b"\x1f\x8b":
            hint = (
                " It looks like a pickle/joblib file: load such files with joblib only "
                "when you trust their source."
            )
        raise ModelFileError(
            f"{name} is not a tgem model file (it does not start like one; tgem model files "
            f"are ZIP archives written by TGEMClassifier.save).{hint}"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ModelFileError(
            f"{name} is truncated or corrupted: its ZIP directory is unreadable ({exc}). "
            "Copy the file again or re-save it from the original model."
        ) from exc
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if _HEADER not in names or _CHECKSUM not in names:
        raise ModelFileError(
            f"{name} is a ZIP archive but not a tgem model file (it lacks {_HEADER} or "
            f"{_CHECKSUM}; it holds {names[:5]})."
        )
    if len(set(names)) != len(names):
        raise ModelFileError(f"{name} repeats an entry name; it is not a valid tgem model file.")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > len(data):
            raise ModelFileError(
                f"{name}: entry {info.filename!r} is compressed or larger than the file; tgem "
                "model files store their entries uncompressed. The file was not written by "
                "tgem or was modified."
            )
    header_info = infos[names.index(_HEADER)]
    if header_info.file_size > MAX_HEADER_SIZE:
        raise ModelFileError(
            f"{name}: its header ({_HEADER}) declares {header_info.file_size} bytes, above the "
            f"header size cap of {MAX_HEADER_SIZE} bytes (tgem._io.MAX_HEADER_SIZE). tgem "
            "writes headers of a few kB per 1,000 genes; the file was not written by tgem."
        )
    header_bytes = archive.read(_HEADER)
    header = json.loads(header_bytes.decode("utf-8"))
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(
            f"{name} is not a tgem model file: its header's format is "
            f"{header.get('format') if isinstance(header, dict) else None!r}, "
            f"expected {FORMAT!r}."
        )
    version = header.get("format_version")
    if type(version) is not int or version not in _READABLE:
        written_by = header.get("versions", {})
        written_by = written_by.get("tgem") if isinstance(written_by, dict) else None
        raise ModelFileError(
            f"{name} has model format version {version!r} (written by tgem {written_by}); "
            f"this tgem {__version__} reads format version(s) {list(_READABLE)}. "
            "Install the tgem version that wrote the file, or a newer one."
        )
    manifest = header["arrays"]
    if not isinstance(manifest, list) or not all(_is_manifest_entry(e) for e in manifest):
        raise ModelFileError(
            f"{name}: the header's array manifest is not a list of {{name, dtype, shape}} "
            "entries (a str, a dtype string and a list of non-negative ints)."
        )
    expected = [_HEADER] + [entry["name"] for entry in manifest] + [_CHECKSUM]
    if names != expected:
        raise ModelFileError(
            f"{name}: the archive's entries do not match its header's manifest "
            f"({len(names)} entries, {len(expected)} expected). The file was modified."
        )
    entries = [(n, archive.read(n)) for n in expected[:-1]]
    stored = archive.read(_CHECKSUM).decode("ascii").strip()
    if not hmac.compare_digest(stored, _digest(entries)):
        raise ModelFileError(
            f"{name} fails its SHA-256 checksum: it is corrupted or was modified after it was "
            "written. Copy the file again or re-save it from the original model."
        )
    arrays = {
        entry["name"]: _read_npy(blob, entry, name)
        for entry, (_, blob) in zip(manifest, entries[1:], strict=True)
    }
    return header, arrays


def _is_manifest_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and set(entry) == {"name", "dtype", "shape"}
        and isinstance(entry["name"], str)
        and entry["dtype"] in _ARRAY_DTYPES
        and isinstance(entry["shape"], list)
        and all(type(n) is int and n >= 0 for n in entry["shape"])
    )


def _read_npy(blob: bytes, entry: dict, name: str) -> np.ndarray:
    """Parse one ``.npy`` entry without NumPy's pickle path, checking dtype, shape and size."""
    fh = io.BytesIO(blob)
    major, _ = np.lib.format.read_magic(fh)
    if major == 1:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    declared = (entry.get("dtype"), entry.get("shape"))
    if dtype.str not in _ARRAY_DTYPES or declared != (dtype.str, list(shape)):
        raise ModelFileError(
            f"{name}: array {entry.get('name')!r} has dtype {dtype.str} and shape {shape}, the "
            f"header says {declared}; float arrays of the declared shape are expected."
        )
    count = math.prod(shape)
    payload = blob[fh.tell() :]
    if len(payload) != count * dtype.itemsize:
        raise ModelFileError(
            f"{name}: array {entry.get('name')!r} holds {len(payload)} bytes, "
            f"{count * dtype.itemsize} expected for shape {shape}."
        )
    array = np.frombuffer(payload, dtype=dtype, count=count)
    return array.reshape(shape, order="F" if fortran else "C").astype(dtype.newbyteorder("="))


def _build(header: dict, arrays: dict[str, np.ndarray], name: str):
    """Make the classifier from a verified header and its arrays."""
    TGEMClassifier = _estimator_class()

    # parameters added since a format version was introduced take that version's values
    params = {**FILE_VERSION_VALUES[header["format_version"]], **header["params"]}
    unknown = sorted(set(params) - set(TGEMClassifier().get_params()))
    if unknown:
        raise ModelFileError(
            f"{name} sets parameters {unknown} that this tgem does not know (written by tgem "
            f"{header['versions'].get('tgem')}). Upgrade tgem to load it."
        )
    model = TGEMClassifier(**{k: _param_from_json(v) for k, v in params.items()})
    _check_params(model, name)
    fitted = header["fitted"]
    if not isinstance(fitted, dict):
        raise ModelFileError(f"{name}: the header's fitted attributes are not a mapping.")
    init = dict(header["module"])
    module_arrays = {
        k[len("module/") : -len(".npy")]: v
        for k, v in arrays.items()
        if k.startswith("module/") and k.endswith(".npy")
    }
    _check_module_init(init, module_arrays, name)
    dtypes = {a.dtype for a in module_arrays.values()}
    if len(dtypes) != 1:
        raise ModelFileError(f"{name}: the network's arrays mix dtypes {sorted(map(str, dtypes))}.")
    if dtypes == {np.dtype(np.float16)}:
        warnings.warn(
            f"{name} holds float16 weights, which the attention kernels do not compute in; "
            "they are upcast to float32 (exactly) and the model predicts in float32.",
            UserWarning,
            stacklevel=3,
        )
        module_arrays = {k: v.astype(np.float32) for k, v in module_arrays.items()}
        dtypes = {np.dtype(np.float32)}
    module = TGEMNet(**init, generator=torch.Generator().manual_seed(0))
    module.to(_ARRAY_DTYPES[dtypes.pop().newbyteorder("<").str])
    module.load_state_dict({k: torch.from_numpy(v) for k, v in module_arrays.items()}, strict=True)
    module.eval()
    _check_input_statistics(module, name)

    classes = _classes_from_json(fitted["classes_"])
    n_features = fitted["n_features_in_"]
    if classes.ndim != 1 or len(classes) != module.n_classes or n_features != module.n_genes:
        raise ModelFileError(
            f"{name}: the header's {len(classes)} classes and {n_features} features do not "
            f"match the network's {module.n_classes} classes and {module.n_genes} genes."
        )
    if len(set(classes.tolist())) != len(classes):
        raise ModelFileError(f"{name}: classes_ repeats a label ({classes.tolist()[:10]}).")
    _check_class_weight(model.class_weight, classes, name)
    model.classes_ = classes
    model.n_features_in_ = n_features
    names = fitted["feature_names_in_"]
    if names is not None:
        if (
            not isinstance(names, list)
            or len(names) != n_features
            or not all(isinstance(n, str) for n in names)
            or len(set(names)) != len(names)
        ):
            raise ModelFileError(
                f"{name}: feature_names_in_ is not {n_features} distinct strings; the file "
                "was modified."
            )
        model.feature_names_in_ = np.asarray(names, dtype=object)
    if not isinstance(fitted["history_"], list):
        raise ModelFileError(f"{name}: history_ is not a list of epoch records.")
    history = [_history_record(rec) for rec in fitted["history_"]]
    best_epoch = fitted["best_epoch_"]
    _check_fitted(fitted, len(history), name)
    model.module_ = module
    model.history_ = history
    # whether the fit held out validation cells: the parameter, or for "auto" the record of
    # a validation loss (files do not store the number of training samples)
    model.early_stopping_ = (
        any(math.isfinite(rec.get("valid_loss", math.nan)) for rec in history)
        if isinstance(model.early_stopping, str)
        else bool(model.early_stopping)
    )
    model.n_iter_ = fitted["n_iter_"]
    model.best_epoch_ = best_epoch
    model.attention_backend_ = fitted["attention_backend_"]
    model.device_ = _device_from_json(fitted["device_"], name)
    model._train_state_ = TrainState(
        history=history,
        best_state=None,
        best_epoch=best_epoch,
        best_loss=float(_json_to_float(fitted["best_loss"])),
        stopped=fitted["stopped"],
    )
    if _FEATURE_IMPORTANCES in arrays:
        importances = arrays[_FEATURE_IMPORTANCES].astype(np.float64)
        if importances.shape != (n_features,):
            raise ModelFileError(
                f"{name}: feature importances have shape {importances.shape}, expected "
                f"({n_features},)."
            )
        model._feature_importances = importances
    _set_calibration(model, header, fitted, arrays, name)
    return model


def _set_calibration(model, header: dict, fitted: dict, arrays: dict, name: str) -> None:
    """Check and set the calibration of a version-2 file (version 1: temperature 1)."""

    model.temperature_ = 1.0
    if header["format_version"] >= 2 and "calibration" not in fitted:
        raise ModelFileError(
            f"{name}: a format-2 header must hold fitted['calibration'] (null when the model "
            "is not calibrated); the file was modified or not written by tgem."
        )
    spec = fitted["calibration"] if header["format_version"] >= 2 else None
    scores = arrays.get(_CONFORMAL_SCORES)
    if spec is None:
        if scores is not None:
            raise ModelFileError(
                f"{name} holds conformal scores but no calibration; the file was modified or "
                "not written by tgem."
            )
        return

    def bad(what: str) -> ModelFileError:
        return ModelFileError(
            f"{name}: the fitted calibration is not valid ({what}); the file was modified or "
            "not written by tgem. Re-save it from the original model."
        )

    expected = {"temperature_", "rejection_thresholds_", "calibration_report_"}
    if not isinstance(spec, dict) or set(spec) != expected:
        raise bad(f"expected a mapping with the keys {sorted(expected)}")
    temperature = spec["temperature_"]
    low, high = TEMPERATURE_BOUNDS
    if type(temperature) not in (int, float) or not low <= temperature <= high:
        raise bad(f"temperature_ {temperature!r} is not a number in [{low}, {high}]")
    thresholds = spec["rejection_thresholds_"]
    if not isinstance(thresholds, dict) or set(thresholds) != set(RULES):
        raise bad(f"rejection_thresholds_ must map each of {list(RULES)} to a number")
    for rule, value in thresholds.items():
        value = _json_to_float(value)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise bad(f"the {rule} threshold {value!r} is not a finite number")
        if rule == "max_proba" and not 0.0 <= value <= 1.0:
            raise bad(f"the max_proba threshold {value!r} is not a probability")
    report = spec["calibration_report_"]
    if not isinstance(report, dict) or set(report) != set(_REPORT_FIELDS):
        raise bad(f"calibration_report_ must hold exactly {sorted(_REPORT_FIELDS)}")
    clean = {}
    for key, kind in _REPORT_FIELDS.items():
        value = _json_to_float(report[key])
        if kind is float and type(value) is int:
            value = float(value)
        if (
            type(value) is not kind
            or (kind is int and value < 0)
            or (kind is float and not math.isfinite(value))
        ):
            raise bad(f"calibration_report_[{key!r}] is {report[key]!r}, not a {kind.__name__}")
        clean[key] = value
    if scores is None or scores.ndim != 1 or len(scores) != clean["n_calibration"]:
        raise bad(
            f"the conformal scores must be an array of calibration_report_['n_calibration'] = "
            f"{clean['n_calibration']} numbers"
        )
    scores = scores.astype(np.float64)
    if not (np.all((scores >= 0) & (scores <= 1)) and np.all(np.diff(scores) >= 0)):
        raise bad("the conformal scores must be sorted numbers in [0, 1]")
    if len(scores) < 1 or clean["temperature"] != temperature:
        raise bad("the report does not match the temperature, or no cell was held out")
    model.temperature_ = float(temperature)
    model.rejection_thresholds_ = {r: float(_json_to_float(thresholds[r])) for r in RULES}
    model.calibration_report_ = clean
    model.conformal_scores_ = scores


def _check_params(model, name: str) -> None:
    """Check the loaded parameters against the constructor's constraints, as ``fit`` would."""
    try:
        model._validate_params()
        model._check_params_extra()
    except ValueError as exc:  # sklearn's InvalidParameterError is a ValueError
        raise ModelFileError(
            f"{name} sets an invalid parameter: {exc} The file was modified or not written by "
            "tgem; re-save it from the original model."
        ) from exc
    constraints = type(model)._parameter_constraints
    for key, value in model.get_params(deep=False).items():
        if isinstance(value, bool) and not {"boolean", "verbose"} & set(constraints[key]):
            raise ModelFileError(
                f"{name} sets parameter {key}={value!r}, a bool where a number is expected; the "
                "file was modified or not written by tgem."
            )
        counts = any(
            isinstance(c, Interval) and c.type is numbers.Integral for c in constraints[key]
        )
        if counts and type(value) is int and value > _MAX_COUNT:
            raise ModelFileError(
                f"{name} sets parameter {key}={value}, above {_MAX_COUNT}, the largest count "
                "tgem (and torch) can use; the file was modified or not written by tgem."
            )


def _check_input_statistics(module, name: str) -> None:
    """``standardize``'s per-gene statistics must be finite, with positive scales."""
    if not module.standardize:
        return
    mean, scale = module.input_mean, module.input_scale
    if not (torch.isfinite(mean).all() and torch.isfinite(scale).all() and (scale > 0).all()):
        raise ModelFileError(
            f"{name}: the input statistics (input_mean, input_scale) hold non-finite values or "
            "scales <= 0; the file was modified or not written by tgem."
        )


def _check_class_weight(class_weight, classes: np.ndarray, name: str) -> None:
    """A mapping ``class_weight`` must weigh known classes with finite non-negative numbers."""
    if not isinstance(class_weight, dict):
        return
    known = set(classes.tolist())
    for label, weight in class_weight.items():
        if type(weight) not in (int, float) or not math.isfinite(weight) or weight < 0:
            raise ModelFileError(
                f"{name} sets parameter class_weight={class_weight!r}: the weight of class "
                f"{label!r} is {weight!r}, a finite number >= 0 is expected."
            )
        if label not in known:
            raise ModelFileError(
                f"{name} sets parameter class_weight={class_weight!r}: {label!r} is not one of "
                f"its classes {sorted(map(str, known))}."
            )


def _check_fitted(fitted: dict, n_epochs: int, name: str) -> None:
    """Type and range checks of the header's scalar fitted attributes."""
    n_iter, best_epoch = fitted["n_iter_"], fitted["best_epoch_"]
    checks = [
        ("n_iter_", n_iter, type(n_iter) is int and 0 <= n_iter, "an int >= 0"),
        (
            "best_epoch_",
            best_epoch,
            best_epoch is None or (type(best_epoch) is int and 0 <= best_epoch <= n_epochs),
            f"None or an epoch of history_ (0 to {n_epochs})",
        ),
        (
            "attention_backend_",
            fitted["attention_backend_"],
            isinstance(fitted["attention_backend_"], str),
            "a backend name",
        ),
        ("device_", fitted["device_"], isinstance(fitted["device_"], str), "a device string"),
        ("stopped", fitted["stopped"], isinstance(fitted["stopped"], str), "a string"),
        (
            "best_loss",
            fitted["best_loss"],
            type(_json_to_float(fitted["best_loss"])) in (int, float),
            "a number",
        ),
    ]
    for field, value, ok, expected in checks:
        if not ok:
            raise ModelFileError(
                f"{name}: the fitted attribute {field} is {value!r}; {expected} is expected. "
                "The file was modified or not written by tgem."
            )


def _device_from_json(value: str, name: str) -> torch.device:
    try:
        return torch.device(value)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelFileError(
            f"{name}: the fitted attribute device_ is {value!r}, not a device ({exc})."
        ) from exc


def _check_module_init(init: dict, arrays: dict[str, np.ndarray], name: str) -> None:
    """Check the network's arguments against the arrays before building anything."""
    counts = ("n_genes", "n_classes", "n_layers", "n_heads")
    total = sum(a.size for a in arrays.values())
    for key in counts:
        value = init.get(key)
        if type(value) is not int or not 1 <= value <= max(total, 1):
            raise ModelFileError(f"{name}: network argument {key}={value!r} is not valid.")
    if (
        init.get("activation") not in ("relu", "leakyrelu", "gelu", None)
        or type(init.get("shared_norm")) is not bool
        or init.get("attention_backend") not in ("auto", *backend_names())
        or type(init.get("dropout")) not in (int, float)
        or not 0 <= init["dropout"] < 1
        or type(init.get("standardize", False)) is not bool
    ):
        raise ModelFileError(f"{name}: the network's arguments {init} are not valid.")
    if init["n_layers"] * 4 > len(arrays):
        raise ModelFileError(
            f"{name}: the header declares {init['n_layers']} layers but the file holds "
            f"{len(arrays)} arrays."
        )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in TGEMNet(**init).state_dict().items()}
    found = {k: a.shape for k, a in arrays.items()}
    if shapes != found:
        diff = sorted(set(shapes.items()) ^ set(found.items()))[:4]
        raise ModelFileError(
            f"{name}: the network's arrays do not match its declared architecture "
            f"(differences: {diff})."
        )


def _classes_from_json(spec: dict) -> np.ndarray:
    """Rebuild ``classes_``, checking its declared dtype against the labels before allocating."""
    if not isinstance(spec, dict) or not isinstance(spec.get("values"), list):
        raise ModelFileError("classes_ is not a list of labels.")
    dtype, values = spec.get("dtype"), spec["values"]
    if dtype == "object":
        return _object_classes(values, spec.get("types"))
    try:
        dtype = np.dtype(dtype) if isinstance(dtype, str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in "biufUS":
        raise ModelFileError(
            f"classes_ has dtype {spec.get('dtype')!r}; a NumPy dtype string of labels "
            "('<U5', '|S3', '<i8', '<f8', '|b1') or 'object' is expected."
        )
    if dtype.itemsize * len(values) > MAX_HEADER_SIZE:
        raise ModelFileError(
            f"classes_ declares dtype {spec['dtype']!r} for {len(values)} labels: "
            f"{dtype.itemsize * len(values)} bytes, more than the header size cap of "
            f"{MAX_HEADER_SIZE} bytes. The file was not written by tgem."
        )
    if dtype.kind in "US":
        if not all(isinstance(v, str) for v in values):
            raise ModelFileError("classes_ of a string dtype holds non-strings.")
        if dtype.kind == "S":
            try:
                encoded = [v.encode("latin-1") for v in values]
            except UnicodeEncodeError as exc:
                raise ModelFileError(f"classes_ of dtype {dtype} holds non-latin-1 text.") from exc
            width = max(map(len, encoded), default=0)
            out = np.asarray(encoded, dtype=dtype)
        else:
            width = max(map(len, values), default=0) * 4
            out = np.asarray(values, dtype=dtype)
        if width > dtype.itemsize:
            raise ModelFileError(
                f"classes_ of dtype {spec['dtype']!r} is too narrow for its labels; the file "
                "was modified."
            )
        return out
    if not all(type(v) in (bool, int, float) for v in values):
        raise ModelFileError(f"classes_ of dtype {dtype} holds non-numbers.")
    out = np.asarray(values, dtype=dtype)
    if not all(o == v for o, v in zip(out.tolist(), values, strict=True)):
        raise ModelFileError(f"classes_ {values[:5]} do not fit their dtype {dtype}.")
    return out


def _object_classes(values: list, types) -> np.ndarray:
    kinds = {"bool": bool, "int": int, "float": float, "str": str}
    if not isinstance(types, list) or len(types) != len(values):
        raise ModelFileError("classes_ has a type per label missing.")
    out = np.empty(len(values), dtype=object)
    for i, (value, kind) in enumerate(zip(values, types, strict=True)):
        if kind not in kinds:
            raise ModelFileError(f"class label type {kind!r} is not one of {sorted(kinds)}.")
        if type(value) is not kinds[kind] and not (kind == "float" and type(value) is int):
            raise ModelFileError(f"class label {value!r} is not of type {kind}.")
        out[i] = kinds[kind](value)
    return out


def _history_record(record) -> dict:
    if not isinstance(record, dict):
        raise ModelFileError(f"a history_ entry is {type(record).__name__}, not a mapping.")
    out = {}
    for key, value in record.items():
        value = _json_to_float(value)
        if type(value) not in (int, float):
            raise ModelFileError(f"history_ value {key}={value!r} is not a number.")
        out[str(key)] = value
    return out


def _json_to_float(value):
    return _FLOAT_CODES.get(value, value) if isinstance(value, str) else value


def _place(model, target: torch.device | None, name: str) -> None:
    """Move the network to ``target`` or, for ``device="auto"``, to where it can run here."""
    if target is None:
        saved = model.device_
        target = saved
        if saved.type == "cuda" and not torch.cuda.is_available():
            warnings.warn(
                f"{name} was fitted on {saved}, which is not available here; the model is "
                "loaded on the CPU.",
                DeviceWarning,
                stacklevel=3,
            )
            target = torch.device("cpu")
        elif saved.type == "cuda" and (saved.index or 0) >= torch.cuda.device_count():
            target = torch.device("cuda")
        elif saved.type not in ("cpu", "cuda"):
            target = torch.device("cpu")
    model.module_.to(target)
    model.device_ = target
