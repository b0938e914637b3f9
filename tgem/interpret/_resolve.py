"""Argument resolution of the attribution functions: method names, targets, baselines, batches.

One table of method names for the library and the ``tgem`` command (:data:`METHODS`), and the
checks that turn a user's ``target``, ``baseline`` and ``internal_batch_size`` into arrays
and row counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.utils.validation import check_is_fitted

from tgem._finite import check_finite_input
from tgem._naming import encode_labels
from tgem.interpret._ig import rows_budget

#: Attribution methods and the original's short names for them (the ``tgem`` command's
#: ``--attr_method`` accepts both).
METHODS = {
    "integrated_gradients": "ig",
    "ig_smoothgrad_sq": "sg_ig",
    "ig_vargrad": "vg_ig",
    "guided_backprop": "gb",
    "guided_backprop_smoothgrad_sq": "sg_gb",
    "guided_backprop_vargrad": "vg_gb",
}
#: The original's short names -> tgem's names.
ALIASES = {short: name for name, short in METHODS.items()}

#: Activation memory (bytes) one forward+backward pass may use when ``internal_batch_size``
#: is None.
MEMORY_BUDGET = 256 << 20


def _fitted_module(clf):
    check_is_fitted(clf, "module_")
    module = clf.module_
    module.eval()
    return module


def _resolve_method(method: str) -> tuple[str, str | None]:
    """``(base, noise_tunnel)`` with base in {"ig", "gb"} and the tunnel type or None."""
    name = ALIASES.get(method, method)
    if name not in METHODS:
        raise ValueError(
            f"method={method!r} is not an attribution method; choose one of "
            f"{sorted(METHODS)} (or the original's short names {sorted(ALIASES)})."
        )
    base = "ig" if name.startswith(("integrated", "ig")) else "gb"
    tunnel = (
        "smoothgrad_sq"
        if name.endswith("smoothgrad_sq")
        else "vargrad"
        if name.endswith("vargrad")
        else None
    )
    return base, tunnel


def _resolve_target(clf, X, target, y, n: int) -> np.ndarray:
    """Class indices (n,) for ``target`` ("true", "predicted", a label or per-sample labels)."""
    if isinstance(target, str) and target == "true":
        if y is None:
            raise ValueError(
                "target='true' needs the true labels: pass y=... (one label per row of X), "
                "or use target='predicted' or a class label."
            )
        y = np.asarray(y).ravel()
        if y.shape[0] != n:
            raise ValueError(
                f"y has {y.shape[0]} labels but X has {n} rows; pass one label per row."
            )
        return encode_labels(clf.classes_, y, "y")
    if isinstance(target, str) and target == "predicted":
        return np.argmax(clf._log_proba(X), axis=1).astype(np.int64)
    arr = np.asarray(target)
    if arr.ndim == 0:
        return np.full(n, encode_labels(clf.classes_, arr[None], "target")[0], dtype=np.int64)
    if arr.shape != (n,):
        raise ValueError(
            f"target has shape {arr.shape}; pass 'true', 'predicted', one class "
            f"label, or one label per row of X ({n},)."
        )
    return encode_labels(clf.classes_, arr, "target")


def _training_mean(clf) -> np.ndarray:
    sample = clf.__dict__.get("_training_sample")
    if sample is None:
        raise ValueError(
            "baseline='mean' uses the mean of the training data, which a loaded or unpickled "
            "model does not keep (it is patient data). Pass the mean as an array instead: "
            "baseline=X_train.mean(axis=0)."
        )
    return sample.mean


def _resolve_baseline(clf, baseline, n: int, n_genes: int) -> np.ndarray:
    """Baselines as a float32 array of shape (1, genes) or (n, genes)."""
    if isinstance(baseline, str):
        if baseline == "zeros":
            return np.zeros((1, n_genes), dtype=np.float32)
        if baseline == "mean":
            return _training_mean(clf).astype(np.float32)[None, :]
        raise ValueError(
            f"baseline={baseline!r}; pass 'zeros', 'mean' or an array of shape "
            f"({n_genes},) or ({n}, {n_genes})."
        )
    arr = np.asarray(baseline, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != n_genes or arr.shape[0] not in (1, n):
        raise ValueError(
            f"baseline has shape {np.shape(baseline)}; pass 'zeros', 'mean' or an "
            f"array of shape ({n_genes},) or ({n}, {n_genes})."
        )
    check_finite_input(
        arr, "baseline", "Pass 'zeros', 'mean' or an array of finite values in X's range."
    )
    return arr


def _batch_rows(clf, module, internal_batch_size: int | None) -> int:
    if internal_batch_size is not None:
        if int(internal_batch_size) < 1:
            raise ValueError(
                f"internal_batch_size={internal_batch_size}; pass a positive "
                "number of rows or None."
            )
        return int(internal_batch_size)
    layer = module.layers[0]
    return rows_budget(module.n_genes, layer.WQ.shape[0], len(module.layers), MEMORY_BUDGET)


def _as_output(clf, X_in, values: np.ndarray):
    names = getattr(clf, "feature_names_in_", None)
    if names is None:
        return values
    index = X_in.index if isinstance(X_in, pd.DataFrame) else None
    return pd.DataFrame(values, index=index, columns=pd.Index(names, name="gene"))
