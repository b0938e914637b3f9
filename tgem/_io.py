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
``attributes/neighbor_reference/{mean,scale,components,cells}.npy``
    Format version 3, with the calibration: the ``"neighbors"`` rule's reference of training
    cells (``neighbor_reference_``; ``fitted["calibration"]["neighbor_reference"]`` holds its
    ``n_neighbors``) and that rule's threshold. Files of versions 1 and 2 load without it.
``attributes/calibration_scores/{energy,neighbors}.npy``
    Format version 3, with the reference: the held-out cells' sorted scores that the
    ``"combined"`` rule compares with (``calibration_scores_``).
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
import io
import json
import logging
import math
import os
import platform
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import IO

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from tgem._io_build import _build
from tgem._io_format import (  # noqa: F401 - FORMAT, MAX_HEADER_SIZE, _digest: old import paths
    _CALIBRATION_SCORES,
    _CHECKSUM,
    _CONFORMAL_SCORES,
    _DATE_TIME,
    _FEATURE_IMPORTANCES,
    _HEADER,
    _NEIGHBOR_REFERENCE,
    FORMAT,
    FORMAT_VERSION,
    MAX_HEADER_SIZE,
    _digest,
    _estimator_class,
    _float_to_json,
    register_estimator,
)
from tgem._io_read import (  # noqa: F401 - MAX_FILE_SIZE: an old import path
    _PARSE_ERRORS,
    MAX_FILE_SIZE,
    _parse,
    _read_file,
    _read_stream,
)
from tgem._model import module_init
from tgem._runtime import resolve_device
from tgem._serialization import loadable_device, state_arrays
from tgem._version import __version__
from tgem.exceptions import ModelFileError

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_FILE_SIZE", "MAX_HEADER_SIZE", "load", "save"]

logger = logging.getLogger(__name__)


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
    arrays: dict[str, np.ndarray] = {
        f"module/{key}.npy": value for key, value in state_arrays(model.module_).items()
    }
    importances = model.__dict__.get("_feature_importances")
    if importances is not None:
        arrays[_FEATURE_IMPORTANCES] = np.asarray(importances, dtype=np.float64)
    scores = model.__dict__.get("conformal_scores_")
    if scores is not None:
        arrays[_CONFORMAL_SCORES] = np.asarray(scores, dtype=np.float64)
    reference = model.__dict__.get("neighbor_reference_")
    if scores is not None and reference is not None:
        for field, array in reference.arrays().items():
            arrays[_NEIGHBOR_REFERENCE.format(field)] = np.asarray(array, dtype=np.float64)
        for rule, array in model.calibration_scores_.items():
            arrays[_CALIBRATION_SCORES.format(rule)] = np.asarray(array, dtype=np.float64)
    blobs = {name: _npy_bytes(array) for name, array in arrays.items()}
    header = _header(model, module_init(model.module_), arrays)
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


def _npy_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    out = io.BytesIO()
    np.lib.format.write_array(out, array, allow_pickle=False)
    return out.getvalue()


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
    reference = model.__dict__.get("neighbor_reference_")
    return {
        "temperature_": float(model.temperature_),
        "rejection_thresholds_": {str(k): float(v) for k, v in model.rejection_thresholds_.items()},
        "calibration_report_": {
            k: (bool(v) if isinstance(v, bool | np.bool_) else _float_to_json(v))
            for k, v in report.items()
        },
        "neighbor_reference": None
        if reference is None
        else {"n_neighbors": int(reference.n_neighbors)},
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


def _place(model, target: torch.device | None, name: str) -> None:
    """Move the network to ``target`` or, for ``device="auto"``, to where it can run here."""
    if target is None:
        target = loadable_device(model.device_, name, stacklevel=3)
    model.module_.to(target)
    model.device_ = target
