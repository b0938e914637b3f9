"""Per-class gene rankings of attributions, and their export as GSEA pre-ranked files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from tgem._finite import check_finite_input
from tgem._naming import default_gene_names


def gene_ranking(
    attributions, y, *, genes=None, absolute: bool = False, rank_by: str = "mean"
) -> pd.DataFrame:
    """Per class, the mean and the median attribution of each gene, ranked.

    Parameters
    ----------
    attributions : ndarray or DataFrame of shape (n_samples, n_genes)
        Output of :func:`attribute`.
    y : array-like of shape (n_samples,)
        The class of each sample (usually the true labels, as in the original).
    genes : array-like of shape (n_genes,), optional
        Gene names; default: the DataFrame's columns, else ``"gene_0"``, ``"gene_1"``, ...
    absolute : bool, default=False
        Average ``|attribution|`` instead of the signed values (the original's ``--abs``).
    rank_by : {"mean", "median"}, default="mean"
        The statistic ranked (1 = largest; ties by gene order).

    Returns
    -------
    DataFrame
        Tidy: one row per (class, gene) with columns ``gene, class, mean, median, rank``,
        sorted by class and rank.

    Examples
    --------
    >>> import numpy as np
    >>> from tgem.interpret import gene_ranking
    >>> attr = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, 0.5], [0.0, 1.0, 2.0]])
    >>> gene_ranking(attr, ["a", "a", "b"], genes=["G1", "G2", "G3"])
      gene class  mean  median  rank
    0   G1     a   2.0     2.0     1
    1   G3     a   0.5     0.5     2
    2   G2     a  -1.0    -1.0     3
    3   G3     b   2.0     2.0     1
    4   G2     b   1.0     1.0     2
    5   G1     b   0.0     0.0     3
    """
    if rank_by not in ("mean", "median"):
        raise ValueError(f"rank_by={rank_by!r}; choose 'mean' or 'median'.")
    if genes is None and isinstance(attributions, pd.DataFrame):
        genes = attributions.columns
    values = np.asarray(attributions, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"attributions must be 2-d (samples x genes); got shape {values.shape}.")
    check_finite_input(
        values, "attributions", "Pass the finite output of attribute() to rank.", limit=None
    )
    n, g = values.shape
    genes = np.asarray(default_gene_names(g) if genes is None else genes)
    if genes.shape != (g,):
        raise ValueError(f"genes has {genes.size} names for {g} attribution columns.")
    y = np.asarray(y).ravel()
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} labels for {n} rows of attributions.")
    if absolute:
        values = np.abs(values)
    frames = []
    for cls in np.unique(y):
        rows = values[y == cls]
        stats = pd.DataFrame(
            {"gene": genes, "class": cls, "mean": rows.mean(0), "median": np.median(rows, axis=0)}
        )
        order = np.argsort(-stats[rank_by].to_numpy(), kind="stable")
        stats = stats.iloc[order]
        stats["rank"] = np.arange(1, g + 1)
        frames.append(stats)
    return pd.concat(frames, ignore_index=True)


def write_rnk(ranking: pd.DataFrame, directory, *, score: str = "mean", prefix: str = "") -> dict:
    """Write each class of a :func:`gene_ranking` table as a GSEA pre-ranked ``.rnk`` file.

    Each file has one ``gene<TAB>score`` line per gene, sorted by decreasing score, no
    header, as GSEA's "GSEAPreranked" expects.

    Parameters
    ----------
    ranking : DataFrame
        Output of :func:`gene_ranking`.
    directory : str or path
        Created if missing.
    score : {"mean", "median"}, default="mean"
    prefix : str, default=""
        Prepended to each file name (``<prefix><class>.rnk``; characters other than
        letters, digits, ``.``, ``-`` and ``_`` become ``_``).

    Returns
    -------
    dict
        Class label -> path written.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from tgem.interpret import gene_ranking, write_rnk
    >>> table = gene_ranking(np.array([[1.0, -1.0], [2.0, 0.0]]), ["B cell", "B cell"],
    ...                      genes=["CD79A", "LYZ"])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     paths = write_rnk(table, d)
    ...     print(paths["B cell"].name, paths["B cell"].read_text().split())
    B_cell.rnk ['CD79A', '1.5', 'LYZ', '-0.5']
    """

    if score not in ("mean", "median"):
        raise ValueError(f"score={score!r}; choose 'mean' or 'median'.")
    missing = {"gene", "class", score} - set(ranking.columns)
    if missing:
        raise ValueError(
            f"ranking lacks the columns {sorted(missing)}; pass the output of "
            "tgem.interpret.gene_ranking."
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for cls, part in ranking.groupby("class", sort=True):
        part = part.sort_values(score, ascending=False, kind="stable")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{prefix}{cls}") + ".rnk"
        path = out / name
        lines = [f"{gene}\t{value:.10g}" for gene, value in zip(part["gene"], part[score])]
        path.write_text("\n".join(lines) + "\n")
        paths[cls] = path
    return paths
