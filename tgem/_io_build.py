"""Building a classifier from a model file's checked header and arrays.

Every value is checked before it is used: the parameters against the constructor's
constraints, the network's arguments against the arrays' shapes (computed on the meta
device, nothing allocated), the labels' declared dtype against their values, the fitted
attributes' types and ranges, the calibration's fields. Anything invalid raises
:class:`~tgem.exceptions.ModelFileError` naming the file and the problem.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from sklearn.utils._param_validation import Interval

from tgem._calibration import COMBINED_RULES, MODEL_RULES, TEMPERATURE_BOUNDS
from tgem._io_format import (
    _ARRAY_DTYPES,
    _CALIBRATION_SCORES,
    _CONFORMAL_SCORES,
    _FEATURE_IMPORTANCES,
    _MAX_COUNT,
    _NEIGHBOR_REFERENCE,
    _REPORT_FIELDS,
    MAX_HEADER_SIZE,
    _estimator_class,
    _json_to_float,
)
from tgem._kernels import TOL_RANGE, backend_names
from tgem._model import TGEMNet
from tgem._novelty import NeighborReference
from tgem._presets import FILE_VERSION_VALUES
from tgem._serialization import build_module
from tgem._training import TrainState
from tgem.exceptions import ModelFileError


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
    dtype = _ARRAY_DTYPES[dtypes.pop().newbyteorder("<").str]
    module = build_module(init, module_arrays, seed=0, dtype=dtype)
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
    fields = ("mean", "scale", "components", "cells")
    neighbor_arrays = {
        f: arrays[_NEIGHBOR_REFERENCE.format(f)]
        for f in fields
        if _NEIGHBOR_REFERENCE.format(f) in arrays
    }
    held_arrays = {
        r: arrays[_CALIBRATION_SCORES.format(r)]
        for r in COMBINED_RULES
        if _CALIBRATION_SCORES.format(r) in arrays
    }
    if spec is None:
        if scores is not None or neighbor_arrays or held_arrays:
            raise ModelFileError(
                f"{name} holds conformal scores or a neighbours' reference but no "
                "calibration; the file was modified or not written by tgem."
            )
        return

    def bad(what: str) -> ModelFileError:
        return ModelFileError(
            f"{name}: the fitted calibration is not valid ({what}); the file was modified or "
            "not written by tgem. Re-save it from the original model."
        )

    expected = {"temperature_", "rejection_thresholds_", "calibration_report_"}
    if header["format_version"] >= 3:
        expected.add("neighbor_reference")
    if not isinstance(spec, dict) or set(spec) != expected:
        raise bad(f"expected a mapping with the keys {sorted(expected)}")
    reference = None
    reference_spec = spec.get("neighbor_reference")
    if reference_spec is not None:
        if set(neighbor_arrays) != set(fields) or not isinstance(reference_spec, dict):
            raise bad(
                "a neighbours' reference needs {'n_neighbors': int} and the arrays "
                + ", ".join(_NEIGHBOR_REFERENCE.format(f) for f in fields)
            )
        if set(reference_spec) != {"n_neighbors"}:
            raise bad("neighbor_reference must hold exactly n_neighbors")
        try:
            reference = NeighborReference.from_arrays(
                neighbor_arrays, reference_spec["n_neighbors"]
            )
        except ValueError as exc:
            raise bad(f"the neighbours' reference: {exc}") from None
        if reference.n_genes != model.n_features_in_:
            raise bad(
                f"the neighbours' reference has {reference.n_genes} genes, the model "
                f"{model.n_features_in_}"
            )
    elif neighbor_arrays or held_arrays:
        raise bad("it holds neighbours' reference arrays but no neighbor_reference entry")
    if reference is not None and set(held_arrays) != set(COMBINED_RULES):
        raise bad(
            "a neighbours' reference needs the held-out scores "
            + ", ".join(_CALIBRATION_SCORES.format(r) for r in COMBINED_RULES)
        )
    rules = (*MODEL_RULES, "neighbors", "combined") if reference is not None else MODEL_RULES
    temperature = spec["temperature_"]
    low, high = TEMPERATURE_BOUNDS
    if type(temperature) not in (int, float) or not low <= temperature <= high:
        raise bad(f"temperature_ {temperature!r} is not a number in [{low}, {high}]")
    thresholds = spec["rejection_thresholds_"]
    if not isinstance(thresholds, dict) or set(thresholds) != set(rules):
        raise bad(f"rejection_thresholds_ must map each of {list(rules)} to a number")
    for rule, value in thresholds.items():
        value = _json_to_float(value)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise bad(f"the {rule} threshold {value!r} is not a finite number")
        if rule in ("max_proba", "combined") and not 0.0 <= value <= 1.0:
            raise bad(f"the {rule} threshold {value!r} is not a probability")
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
    held = {}
    for rule, array in held_arrays.items():
        array = array.astype(np.float64)
        if array.shape != scores.shape or not np.isfinite(array).all():
            raise bad(f"the held-out {rule} scores must be {len(scores)} finite numbers")
        if not np.all(np.diff(array) >= 0):
            raise bad(f"the held-out {rule} scores must be sorted")
        held[rule] = array
    model.temperature_ = float(temperature)
    model.rejection_thresholds_ = {r: float(_json_to_float(thresholds[r])) for r in rules}
    model.calibration_report_ = clean
    model.conformal_scores_ = scores
    if reference is not None:
        model.neighbor_reference_ = reference
        model.calibration_scores_ = held


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
        or not _valid_tolerance(init.get("tree_tolerance"))
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


def _valid_tolerance(value) -> bool:
    """None (files written before the parameter, or the default) or a float in TOL_RANGE."""
    if value is None:
        return True
    return type(value) in (int, float) and TOL_RANGE[0] <= value <= TOL_RANGE[1]


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
