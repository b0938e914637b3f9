"""What the commands write: the output folder, JSON files, training histories and figures."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from tgem.cli._common import CLIError, logger
from tgem.plotting import plot_gene_ranking
from tgem.plotting._pyplot import pyplot


def _prepare_output(folder: Path) -> Path:
    """Make ``folder`` and check it can be written to, before any work; returns it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CLIError(
            f"cannot write to the output folder {str(folder)!r} ({reason}); pass --output "
            "with a folder you can write to."
        ) from exc
    return folder


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean_history(history: list[dict]) -> list[dict]:
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in history
    ]


def _save_figure(make, path: Path) -> Path | None:
    """Draw with ``make()`` (returns Axes or a list) and save; None when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(
            'matplotlib is not installed: %s not drawn (pip install "tgem[plot]").', path.name
        )
        return None
    result = make()
    first = result[0] if isinstance(result, list | tuple | np.ndarray) else result
    figure = first.figure if hasattr(first, "figure") else first
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def _top_genes_figure(ranking: pd.DataFrame, top: int):
    """One horizontal bar panel of top genes per class, on one figure."""
    plt = pyplot()
    classes = list(dict.fromkeys(ranking["class"]))
    n_cols = min(5, len(classes))
    n_rows = -(-len(classes) // n_cols)
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(3.2 * n_cols, 0.22 * top * n_rows + 1.2),
        layout="constrained",
        squeeze=False,
    )
    for ax, cls in zip(axes.ravel(), classes, strict=False):
        plot_gene_ranking(ranking, cls, top=top, ax=ax)
    for ax in axes.ravel()[len(classes) :]:
        ax.set_visible(False)
    return fig
