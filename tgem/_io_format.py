"""The model file's format: its constants, checksum, JSON number codes and estimator class.

What :mod:`tgem._io` (writing, :func:`tgem._io.save`), :mod:`tgem._io_read` (the container)
and :mod:`tgem._io_build` (the content) share; the format itself is described in
:mod:`tgem._io`.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

#: Value of the header's ``format`` field.
FORMAT = "tgem-model"
#: The format version this tgem writes; it reads this one and the ones listed in _READABLE.
FORMAT_VERSION = 3
_READABLE = (1, 2, 3)
#: Largest header (``tgem.json``) :func:`load` parses, in bytes (16 MiB); it also bounds what the
#: header's declarations may allocate (e.g. ``classes_`` with its declared dtype).
MAX_HEADER_SIZE = 16 << 20
# The largest count parameter (n_threads, batch_size, max_epochs ...) a loaded file may set: a
# C int, as torch.set_num_threads takes.
_MAX_COUNT = 2**31 - 1
_HEADER = "tgem.json"
_CHECKSUM = "SHA256"
_FEATURE_IMPORTANCES = "attributes/feature_importances_.npy"
_CONFORMAL_SCORES = "attributes/conformal_scores_.npy"
# The "neighbors" rule's reference of training cells (format version 3): one array per field.
_NEIGHBOR_REFERENCE = "attributes/neighbor_reference/{}.npy"
# The held-out cells' sorted scores of the rules "combined" joins (format version 3).
_CALIBRATION_SCORES = "attributes/calibration_scores/{}.npy"
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


def _digest(entries) -> str:
    sha = hashlib.sha256()
    for name, data in entries:
        sha.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        sha.update(data)
    return sha.hexdigest()


def _float_to_json(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _json_to_float(value):
    return _FLOAT_CODES.get(value, value) if isinstance(value, str) else value
