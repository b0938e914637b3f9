"""Held-out evaluation figures shared by the ``tgem`` command and the examples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    roc_auc_score,
)

__all__ = ["classification_metrics", "format_metrics"]


def classification_metrics(y_true, proba: np.ndarray, classes) -> dict:
    """Accuracy, macro-F1, MCC, ROC-AUC (one-vs-rest, macro) and the confusion matrix.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels.
    proba : ndarray of shape (n_samples, n_classes)
        Predicted probabilities, columns in ``classes`` order.
    classes : array-like of shape (n_classes,)
        The classifier's ``classes_``.

    Returns
    -------
    metrics : dict
        ``accuracy``, ``macro_f1``, ``mcc``, ``roc_auc`` (NaN when a class is absent from
        ``y_true``, where it is undefined), ``n_samples`` and ``confusion_matrix``
        (a DataFrame, true classes as rows, predicted as columns).

    Examples
    --------
    >>> import numpy as np
    >>> m = classification_metrics(["a", "b", "b"], np.array([[.9, .1], [.2, .8], [.6, .4]]),
    ...                            ["a", "b"])
    >>> round(m["accuracy"], 3), round(m["roc_auc"], 3)
    (0.667, 1.0)
    """
    classes = np.asarray(classes)
    y_true = np.asarray(y_true)
    y_pred = classes[np.argmax(proba, axis=1)]
    present = np.isin(classes, y_true)
    if present.all() and len(classes) > 2:
        roc_auc = roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=classes)
    elif present.all():
        roc_auc = roc_auc_score(y_true == classes[1], proba[:, 1])
    else:
        roc_auc = math.nan
    labels = list(classes)
    return {
        "n_samples": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "mcc": float(matthews_corrcoef(y_true, y_pred)),
        "roc_auc": float(roc_auc),
        "confusion_matrix": pd.DataFrame(
            confusion_matrix(y_true, y_pred, labels=labels),
            index=pd.Index(labels, name="true"),
            columns=pd.Index(labels, name="predicted"),
        ),
    }


def format_metrics(metrics: dict, title: str = "held-out") -> str:
    """Render :func:`classification_metrics` as text for a terminal.

    Parameters
    ----------
    metrics : dict
        As returned by :func:`classification_metrics`.
    title : str, default="held-out"
        Which data the figures are about.

    Returns
    -------
    text : str
        The four scores, then the confusion matrix with numbered classes and their key.

    Examples
    --------
    >>> import numpy as np
    >>> m = classification_metrics(["a", "b"], np.array([[.9, .1], [.2, .8]]), ["a", "b"])
    >>> print(format_metrics(m).splitlines()[1])
      accuracy  1.000
    """
    lines = [
        f"{title} ({metrics['n_samples']} samples):",
        f"  accuracy  {metrics['accuracy']:.3f}",
        f"  macro-F1  {metrics['macro_f1']:.3f}",
        f"  MCC       {metrics['mcc']:.3f}",
        f"  ROC-AUC   {metrics['roc_auc']:.3f}"
        + ("  (undefined: a class has no sample)" if math.isnan(metrics["roc_auc"]) else ""),
        "confusion matrix (rows: true class, columns: predicted class):",
    ]
    cm = metrics["confusion_matrix"]
    numbered = cm.copy()
    numbered.index = [f"{i}" for i in range(len(cm))]
    numbered.columns = [f"{i}" for i in range(len(cm))]
    lines += ["  " + line for line in numbered.to_string().splitlines()]
    lines.append("classes: " + "; ".join(f"{i}={name}" for i, name in enumerate(cm.index)))
    return "\n".join(lines)


def metrics_to_json(metrics: dict) -> dict:
    """A JSON-ready copy of :func:`classification_metrics` (NaN becomes None)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, pd.DataFrame):
            out[key] = {
                "labels": [str(c) for c in value.index],
                "matrix": value.to_numpy().tolist(),
            }
        elif isinstance(value, float) and math.isnan(value):
            out[key] = None
        else:
            out[key] = value
    return out
