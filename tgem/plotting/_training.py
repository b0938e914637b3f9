"""Training curves: loss and accuracy per epoch from a fitted classifier's ``history_``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from tgem.plotting._pyplot import pyplot

__all__ = ["plot_history"]

_LABELS = {"loss": "loss (negative log-likelihood)", "accuracy": "accuracy"}


def _history_rows(history) -> list[dict]:
    rows = getattr(history, "history_", history)
    if hasattr(rows, "to_dict"):  # a DataFrame, one row per epoch
        rows = rows.to_dict("records")
    if not isinstance(rows, Sequence) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(
            "plot_history needs a fitted classifier (with history_), or its history: a "
            f"non-empty list of dicts, one per epoch; got {type(history).__name__}. Fit the "
            "classifier first."
        )
    return list(rows)


def plot_history(history, *, metrics="both", ax=None):
    """Plot the training (and validation) loss and accuracy per epoch.

    Parameters
    ----------
    history : TGEMClassifier, list of dict or DataFrame
        A fitted classifier (its ``history_`` is used) or such a history: one entry per
        epoch with ``train_loss`` and ``train_accuracy``, and ``valid_loss`` /
        ``valid_accuracy`` when a validation split was used (missing, None or NaN values
        are left out of the curves).
    metrics : {"both", "loss", "accuracy"}, default="both"
        Which panel(s) to draw.
    ax : matplotlib Axes or sequence of Axes, optional
        Where to draw: one Axes per panel. By default a new figure is made.

    Returns
    -------
    axes : Axes or list of Axes
        One Axes for a single metric, a list of two for ``"both"``.

    Raises
    ------
    ImportError
        If matplotlib is not installed (``pip install "tgem[plot]"``).
    ValueError
        If ``history`` holds no epoch or ``metrics`` is unknown.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from tgem.plotting import plot_history
    >>> history = [{"epoch": 1, "train_loss": 1.2, "train_accuracy": 0.5},
    ...            {"epoch": 2, "train_loss": 0.8, "train_accuracy": 0.7}]
    >>> loss_ax, acc_ax = plot_history(history)
    >>> loss_ax.get_ylabel()
    'loss (negative log-likelihood)'
    """
    if metrics not in ("both", "loss", "accuracy"):
        raise ValueError(f"metrics must be 'both', 'loss' or 'accuracy', got {metrics!r}.")
    rows = _history_rows(history)
    names = ["loss", "accuracy"] if metrics == "both" else [metrics]
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    if ax is None:
        _, axes = plt.subplots(
            1, len(names), figsize=(5.0 * len(names), 3.6), layout="constrained", squeeze=False
        )
        axes = list(axes.ravel())
    else:
        axes = (
            [ax]
            if not isinstance(ax, Sequence) and not hasattr(ax, "ravel")
            else list(getattr(ax, "ravel", lambda: ax)())
        )
        if len(axes) != len(names):
            raise ValueError(
                f"ax must hold {len(names)} Axes for metrics={metrics!r}, got {len(axes)}."
            )
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
    for axis, name in zip(axes, names, strict=True):
        for split, style in (("train", "-"), ("valid", "--")):
            key = f"{split}_{name}"
            points = [
                (e, float(r[key]))
                for e, r in zip(epochs, rows, strict=True)
                if r.get(key) is not None and math.isfinite(r[key])
            ]
            if points:
                x, y = zip(*points, strict=True)
                axis.plot(
                    x,
                    y,
                    style,
                    marker="o" if len(x) < 20 else None,
                    markersize=3,
                    label="training" if split == "train" else "validation",
                )
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(_LABELS[name])
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    return axes[0] if len(axes) == 1 else axes
