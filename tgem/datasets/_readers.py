"""Readers for the files gene-expression data usually come in: GMT, CSV/TSV tables, AnnData."""

from __future__ import annotations

import difflib
import itertools
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.utils import Bunch

from tgem._h5ad_checks import check_sparse_groups, check_sparse_matrix, check_string_widths

__all__ = ["read_gmt", "read_expression_table", "read_h5ad"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: Largest GMT file :func:`read_gmt` reads (MSigDB's collections are a few tens of MB).
MAX_GMT_BYTES = 256 << 20
#: Longest line (one gene set) :func:`read_gmt` accepts.
MAX_GMT_LINE_BYTES = 16 << 20


def _existing_file(path: PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist; check the path.")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory; pass the file inside it.")
    if not path.is_file():  # a pipe would block, a device (e.g. /dev/zero) read forever
        raise ValueError(
            f"{what} {str(path)!r} is not a regular file (a pipe, socket or device); pass the "
            "path of a file."
        )
    return path


def _unknown_column_message(label: str, available, where: str) -> str:
    available = [str(c) for c in available]
    close = difflib.get_close_matches(str(label), available, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(map(repr, available[:10])) + (", ..." if len(available) > 10 else "")
    return (
        f"label column {label!r} is not in {where}; available: {shown}.{hint} "
        "Pass one of these as the label column."
    )


def read_gmt(path: PathLike) -> dict[str, list[str]]:
    """Read gene sets from a GMT file.

    Each non-empty line of a GMT file is ``name <TAB> description <TAB> gene <TAB> gene ...``.
    Empty trailing fields (a trailing tab) are ignored; a gene repeated within one set is
    kept once, at its first position.

    Parameters
    ----------
    path : str or path-like
        The ``.gmt`` file (UTF-8 text).

    Returns
    -------
    gene_sets : dict of str to list of str
        Gene-set name to its genes, in file order.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If a line has no gene (fewer than three tab-separated fields) or a set name is
        repeated (the message gives the line number), if the file is not UTF-8 text, is not
        a regular file, is larger than ``MAX_GMT_BYTES`` (256 MiB) or has a line longer than
        ``MAX_GMT_LINE_BYTES`` (16 MiB).

    See Also
    --------
    tgem.GeneSetSelector : Keep the genes of given gene sets in a pipeline.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "sets.gmt"
    >>> _ = path.write_text("T_CELL\\tmarkers\\tCD3E\\tCD3D\\n"
    ...                     "B_CELL\\tmarkers\\tCD79A\\tMS4A1\\tCD79A\\n")
    >>> read_gmt(path)
    {'T_CELL': ['CD3E', 'CD3D'], 'B_CELL': ['CD79A', 'MS4A1']}
    """
    path = _existing_file(path, "GMT file")
    size = path.stat().st_size
    if size > MAX_GMT_BYTES:
        raise ValueError(
            f"{path} is {size} bytes, above the limit of {MAX_GMT_BYTES} bytes for a GMT file "
            "(tgem.datasets._readers.MAX_GMT_BYTES); check the file, or split it."
        )
    gene_sets: dict[str, list[str]] = {}
    for lineno, line in _gmt_lines(path):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        name = fields[0]
        genes = [g for g in fields[2:] if g]
        if not name or not genes:
            raise ValueError(
                f"{path}: line {lineno} is not a GMT gene set: expected 'name<TAB>description"
                f"<TAB>gene<TAB>gene...' with at least one gene, got {line[:80]!r}. "
                "Fix or remove that line (fields must be separated by tabs, not spaces)."
            )
        if name in gene_sets:
            raise ValueError(
                f"{path}: line {lineno} repeats the gene-set name {name!r}; "
                "give each set a unique name."
            )
        gene_sets[name] = list(dict.fromkeys(genes))
    if not gene_sets:
        raise ValueError(f"{path} holds no gene set (the file is empty); check the file.")
    return gene_sets


def _gmt_lines(path: Path):
    """``(line number, text)`` of each line, read one at a time with a bounded length."""
    offset = 0
    with path.open("rb") as fh:
        for lineno in itertools.count(1):
            raw = fh.readline(MAX_GMT_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_GMT_LINE_BYTES:
                raise ValueError(
                    f"{path}: line {lineno} is longer than {MAX_GMT_LINE_BYTES} bytes "
                    "(tgem.datasets._readers.MAX_GMT_LINE_BYTES); a GMT line is one gene set. "
                    "Check that the file is a GMT file with one set per line."
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                    f"{offset + exc.start}); re-save the file as UTF-8."
                ) from exc
            offset += len(raw)
            yield lineno, text.rstrip("\r\n")


def _unreadable(path: Path, exc: Exception) -> ValueError:
    return ValueError(
        f"could not read {str(path)!r} as an AnnData .h5ad file: {exc}. "
        "Check that the file is a complete .h5ad written by anndata."
    )


def _separator(path: Path, sep: str | None) -> str:
    if sep is not None:
        return sep
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in {".gz", ".bz2", ".xz", ".zip", ".zst"}:
        suffixes = suffixes[:-1]
    return "," if suffixes and suffixes[-1] == ".csv" else "\t"


def read_expression_table(
    path: PathLike,
    label_column: str | None = None,
    *,
    genes_as: str = "columns",
    sep: str | None = None,
    index_col: int | str | None = 0,
    return_X_y: bool = False,
):
    """Read an expression table (CSV or TSV, optionally compressed) with an optional label.

    Parameters
    ----------
    path : str or path-like
        The table. The separator is a comma for ``.csv`` files and a tab otherwise (``.tsv``,
        ``.txt``), compressed files (``.gz``, ``.bz2``, ``.xz``, ``.zip``) included.
    label_column : str, optional
        Name of the labels: a column when ``genes_as="columns"``, a row when
        ``genes_as="rows"``. None reads no labels (for prediction).
    genes_as : {"columns", "rows"}, default="columns"
        ``"columns"``: one row per sample, one column per gene (scikit-learn's layout).
        ``"rows"``: one row per gene, one column per sample (the usual layout of bulk
        expression matrices); the table is transposed after reading.
    sep : str, optional
        Field separator, overriding the one guessed from the file name.
    index_col : int, str or None, default=0
        The column holding the row names (sample names, or gene names when
        ``genes_as="rows"``), as for :func:`pandas.read_csv`. None when there is none.
    return_X_y : bool, default=False
        If True, return ``(data, target)`` instead of a Bunch.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        data : DataFrame of shape (n_samples, n_genes), float
            Expression, one row per sample, columns named by gene.
        target : Series of shape (n_samples,) or None
            The labels, or None without ``label_column``.
        feature_names : ndarray of str
            The gene names.
        sample_names : ndarray of str
            The sample names.

    (data, target) : tuple if ``return_X_y`` is True

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If ``label_column`` is not in the table (the message lists the available names),
        if a gene column is not numeric, or if the table is empty.

    See Also
    --------
    tgem.align_genes : Put a table's genes in the order a fitted model expects.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "expr.csv"
    >>> _ = path.write_text("cell,CD3E,MS4A1,type\\nc1,2.5,0.0,T\\nc2,0.0,3.1,B\\n")
    >>> X, y = read_expression_table(path, "type", return_X_y=True)
    >>> list(X.columns), list(X.index), float(X.loc["c2", "MS4A1"])
    (['CD3E', 'MS4A1'], ['c1', 'c2'], 3.1)
    >>> y.tolist()
    ['T', 'B']
    """
    if genes_as not in ("columns", "rows"):
        raise ValueError(f"genes_as must be 'columns' or 'rows', got {genes_as!r}.")
    path = _existing_file(path, "expression table")
    _check_index_col(path, _separator(path, sep), index_col)
    try:
        table = pd.read_csv(path, sep=_separator(path, sep), index_col=index_col)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"could not read {str(path)!r} as a {'CSV' if _separator(path, sep) == ',' else 'TSV'}"
            f" table: {exc}. Check the separator (pass sep=...) and the file's format."
        ) from exc
    if genes_as == "columns":
        header = pd.read_csv(path, sep=_separator(path, sep), header=None, nrows=1).iloc[0]
        _check_unique_genes(header.dropna(), path)
    if genes_as == "rows":
        target = None
        if label_column is not None:
            if label_column not in table.index:
                raise ValueError(_unknown_column_message(label_column, table.index, "the rows"))
            target = table.loc[label_column]
            table = table.drop(index=label_column)
        _check_unique_genes(table.index, path)
        table = table.T
        if target is not None:
            target = target.rename(label_column)
    else:
        target = None
        if label_column is not None:
            if label_column not in table.columns:
                raise ValueError(
                    _unknown_column_message(label_column, table.columns, "the columns")
                )
            target = table[label_column]
            table = table.drop(columns=label_column)
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(
            f"{str(path)!r} has no expression values (shape {table.shape}) after taking out "
            "the row names and labels; check index_col, genes_as and the separator."
        )
    table = _to_numeric(table, path)
    table.columns = table.columns.astype(str)
    if target is not None:
        target = _clean_target(target)
    data = Bunch(
        data=table,
        target=target,
        feature_names=np.asarray(table.columns, dtype=object),
        sample_names=np.asarray(table.index.astype(str), dtype=object),
    )
    if return_X_y:
        return data.data, data.target
    return data


def _check_index_col(path: Path, sep: str, index_col) -> None:
    """Refuse an ``index_col`` that names no column of the table's header."""
    if index_col is None or isinstance(index_col, bool):
        return
    try:
        header = pd.read_csv(path, sep=sep, header=None, nrows=1).iloc[0].tolist()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, IndexError):
        return  # the full read below reports what is wrong with the file
    n = len(header)
    if isinstance(index_col, (int, np.integer)):
        if not -n <= index_col < n:
            raise ValueError(
                f"index_col={index_col} is outside the table: {str(path)!r} has {n} columns; "
                f"pass the position (0 to {n - 1}) or the name of the column holding the row "
                "names, or index_col=None if there is none."
            )
    elif isinstance(index_col, str) and index_col not in map(str, header):
        raise ValueError(
            f"index_col={index_col!r} is not a column of {str(path)!r}; its header is "
            f"{_shown_names(header)}. Pass one of these, or index_col=None."
        )


def _shown_names(names) -> str:
    names = [str(n) for n in names]
    return ", ".join(map(repr, names[:10])) + (", ..." if len(names) > 10 else "")


def _clean_target(target: pd.Series) -> pd.Series:
    # Rows read from a transposed table come as object; keep numbers numeric.
    converted = pd.to_numeric(target, errors="coerce")
    if converted.notna().all() and target.notna().all():
        return converted
    return target


def _to_numeric(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    converted = {}
    bad = []
    for column in table.columns:
        values = table[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            continue
        # Transposed tables come as object columns: convert what is really numeric.
        numbers = pd.to_numeric(values, errors="coerce")
        if (numbers.isna() & values.notna()).any():
            bad.append(str(column))
        else:
            converted[column] = numbers
    if bad:
        shown = ", ".join(map(repr, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"{str(path)!r}: {len(bad)} gene column(s) are not numeric ({shown}); expression "
            "values must be numbers. If one of them holds the labels, pass it as the label "
            "column; if the table has genes as rows, pass genes_as='rows'."
        )
    if converted:
        table = table.copy()
        for column, numbers in converted.items():
            table[column] = numbers
    return table.astype(np.float64)


def _check_unique_genes(names, path: Path) -> None:
    names = pd.Index([str(n) for n in names])
    duplicated = names[names.duplicated()].unique()
    if len(duplicated):
        shown = ", ".join(map(repr, duplicated[:5])) + (", ..." if len(duplicated) > 5 else "")
        raise ValueError(
            f"{str(path)!r} names {len(duplicated)} gene(s) more than once ({shown}); "
            "gene names must be unique: aggregate the duplicates (e.g. average them) first."
        )


def read_h5ad(
    path: PathLike,
    label_column: str | None = None,
    *,
    layer: str | None = None,
    return_X_y: bool = False,
):
    """Read an AnnData ``.h5ad`` file (needs the optional ``anndata`` extra).

    Parameters
    ----------
    path : str or path-like
        The ``.h5ad`` file.
    label_column : str, optional
        The ``obs`` column holding the labels (e.g. ``"cell_type"``). None reads none.
    layer : str, optional
        Read this entry of ``adata.layers`` instead of ``adata.X``.
    return_X_y : bool, default=False
        If True, return ``(data, target)`` instead of a Bunch.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        data : ndarray or scipy.sparse.csr_matrix of shape (n_cells, n_genes)
            The expression as stored: a sparse matrix stays sparse (converted to CSR),
            which :class:`tgem.TGEMClassifier` densifies batch by batch.
        target : ndarray of shape (n_cells,) or None
            The labels (categories become their string values).
        feature_names : ndarray of str
            ``adata.var_names``.
        sample_names : ndarray of str
            ``adata.obs_names``.

    (data, target) : tuple if ``return_X_y`` is True

    Raises
    ------
    ImportError
        If anndata is not installed; install it with ``pip install "tgem[anndata]"``.
    FileNotFoundError
        If the file does not exist.
    ValueError
        If ``label_column`` is not a column of ``obs`` or ``layer`` is not a layer, or if the
        file is not a valid AnnData file: not a regular file, unreadable, strings wider than
        ``tgem._h5ad_checks.MAX_STRING_BYTES``, or a sparse matrix whose ``indptr``/``indices`` are
        inconsistent or out of bounds (checked before the matrix is used).

    Notes
    -----
    Most single-cell files hold log-normalised values in ``X`` and raw counts in a layer
    or in ``raw``; T-GEM expects log-scale values (see the preprocessing guide).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import anndata, numpy as np, pandas as pd
    >>> adata = anndata.AnnData(
    ...     X=np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32),
    ...     obs=pd.DataFrame({"cell_type": ["T", "B"]}, index=["c1", "c2"]),
    ...     var=pd.DataFrame(index=["CD3E", "MS4A1"]))
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "cells.h5ad"
    >>> adata.write_h5ad(path)
    >>> bunch = read_h5ad(path, "cell_type")
    >>> bunch.data.shape, list(bunch.feature_names), list(bunch.target)
    ((2, 2), ['CD3E', 'MS4A1'], ['T', 'B'])
    """
    try:
        import anndata
    except ImportError as exc:
        raise ImportError(
            "reading .h5ad files needs the optional anndata package; install it with "
            '`pip install "tgem[anndata]"`.'
        ) from exc
    import scipy.sparse as sp

    path = _existing_file(path, "AnnData file")
    try:
        import h5py

        with h5py.File(path, "r") as f:  # before anndata reads the whole file
            check_string_widths(f, repr(str(path)))
            check_sparse_groups(f, repr(str(path)))
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    try:
        adata = anndata.read_h5ad(path)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    if layer is None:
        X = adata.X
    else:
        if layer not in adata.layers:
            raise ValueError(
                f"layer {layer!r} is not in {str(path)!r}; available layers: "
                f"{sorted(adata.layers.keys())}. Pass one of them, or layer=None for X."
            )
        X = adata.layers[layer]
    if X is None:
        raise ValueError(f"{str(path)!r} holds no expression matrix X; pass layer=...")
    if sp.issparse(X):
        check_sparse_matrix(X, f"{str(path)!r} ({'X' if layer is None else 'layers/' + layer})")
        X = sp.csr_matrix(X)
    else:
        X = np.asarray(X)
    target = None
    if label_column is not None:
        if label_column not in adata.obs.columns:
            raise ValueError(_unknown_column_message(label_column, adata.obs.columns, "obs"))
        column = adata.obs[label_column]
        if isinstance(column.dtype, pd.CategoricalDtype):
            column = column.astype(column.cat.categories.dtype)
        target = column.to_numpy()
    data = Bunch(
        data=X,
        target=target,
        feature_names=np.asarray(adata.var_names.astype(str), dtype=object),
        sample_names=np.asarray(adata.obs_names.astype(str), dtype=object),
    )
    if return_X_y:
        return data.data, data.target
    return data
