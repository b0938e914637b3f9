"""Out-of-core AnnData: stream mini-batches from an ``.h5ad`` file instead of loading it.

:class:`H5ADDataset` reads rows of ``X`` (or of a layer) on demand from a dense HDF5 dataset
or a CSR group, through its own ``h5py`` file handle, opened lazily in each process (a
DataLoader worker, a Dask worker or a torchrun rank re-opens the file; the handle is never
pickled). Training walks the rows in a *chunk-shuffled* order: the rows are cut into chunks
of ``chunk_size`` contiguous rows, the chunks are shuffled, groups of ``chunks_per_read``
chunks form one read (a few contiguous slices of the file), and the rows within a read are
shuffled. One read is held in memory at a time, so memory is bounded by
``chunk_size * chunks_per_read`` rows whatever the file size. ``chunk_size=1`` gives a full
row shuffle, identical to the in-memory order of :class:`tgem.TGEMClassifier`.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from tgem._h5ad_checks import (
    _INSTALL,
    _attr_str,
    _check_codes,
    _check_numeric,
    _check_sparse_group,
    _damaged,
    _declared_shape,
    _import_h5py,
    check_compressed,
    check_sparse_matrix,
    check_string_widths,
    check_values,
)

logger = logging.getLogger(__name__)


def _is_anndata(obj) -> bool:
    return type(obj).__name__ in ("AnnData", "Raw") and type(obj).__module__.startswith("anndata")


def is_h5ad_input(X) -> bool:
    """Whether ``X`` is an ``.h5ad`` path, an AnnData object or an :class:`H5ADDataset`."""
    return isinstance(X, (str, os.PathLike, H5ADDataset)) or _is_anndata(X)


def _read_elem(elem):
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        try:
            from anndata.experimental import read_elem
        except ImportError as exc:
            raise ImportError(f"reading .h5ad metadata needs anndata; {_INSTALL}.") from exc
    return read_elem(elem)


def _labels(column) -> np.ndarray:
    column = pd.Series(column)
    if isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype(column.cat.categories.dtype)
    return column.to_numpy()


class H5ADDataset:
    """Rows of an AnnData ``.h5ad`` file, read from disk on demand.

    Pass it (or simply the path, or a backed AnnData) to :meth:`tgem.TGEMClassifier.fit` and
    ``predict`` instead of an array; ``y`` may then name an ``obs`` column.

    Parameters
    ----------
    data : str, path-like or anndata.AnnData
        An ``.h5ad`` path, an AnnData opened with ``backed="r"`` (its file is re-opened
        read-only), or an in-memory AnnData (read from memory with the same sampler).
    layer : str, optional
        Read ``layers[layer]`` instead of ``X``.
    chunk_size : int, default=64
        Contiguous rows per chunk of the chunk-shuffled training order (1: full shuffle).
    chunks_per_read : int, default=16
        Chunks read together and shuffled among each other; one read is in memory at a time.

    Attributes
    ----------
    shape : tuple of int
        ``(n_cells, n_genes)``.
    var_names : ndarray of str
        Gene names.
    sparse : bool
        Whether the matrix is stored as CSR.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import anndata, numpy as np, pandas as pd, scipy.sparse as sp
    >>> X = sp.random(6, 3, density=0.5, format="csr", dtype=np.float32, random_state=0)
    >>> adata = anndata.AnnData(X=X, obs=pd.DataFrame({"cell_type": list("aabbab")}),
    ...                         var=pd.DataFrame(index=["g1", "g2", "g3"]))
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "cells.h5ad"
    >>> adata.write_h5ad(path)
    >>> ds = H5ADDataset(path)
    >>> ds.shape, ds.sparse, list(ds.var_names)
    ((6, 3), True, ['g1', 'g2', 'g3'])
    >>> bool(np.array_equal(ds[[4, 1]], X[[4, 1]].toarray()))
    True
    >>> list(ds.obs_column("cell_type"))
    ['a', 'a', 'b', 'b', 'a', 'b']
    """

    def __init__(
        self, data, *, layer: str | None = None, chunk_size: int = 64, chunks_per_read: int = 16
    ):
        for name, value in (("chunk_size", chunk_size), ("chunks_per_read", chunks_per_read)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        self.layer = layer
        self.chunk_size = int(chunk_size)
        self.chunks_per_read = int(chunks_per_read)
        self._rows = None  # subset: local index -> file row
        self._h5 = self._pid = None
        self._adata = None
        if _is_anndata(data):
            if data.isbacked:
                self.path = Path(data.filename)
            else:
                self.path = None
                self._adata = data
        elif isinstance(data, (str, os.PathLike)):
            self.path = Path(data)
            if not self.path.exists():
                raise FileNotFoundError(
                    f"No .h5ad file at {str(self.path)!r}. Pass the path of an existing "
                    "AnnData file."
                )
            if not self.path.is_file():
                raise ValueError(
                    f"{str(self.path)!r} is not a regular file (a directory, device or pipe); "
                    "pass the path of an .h5ad file."
                )
        else:
            raise TypeError(
                f"H5ADDataset needs an .h5ad path or an AnnData object; got "
                f"{type(data).__name__}. Pass a path, or use an array with fit directly."
            )
        self._read_metadata()

    # ------------------------------------------------------------------ metadata
    def _matrix_elem(self, f):
        if self.layer is None:
            if "X" not in f:
                raise ValueError(f"{str(self.path)!r} holds no X; pass layer=...")
            return f["X"]
        if "layers" not in f or self.layer not in f["layers"]:
            available = sorted(f["layers"].keys()) if "layers" in f else []
            raise ValueError(
                f"layer {self.layer!r} is not in {str(self.path)!r}; available layers: "
                f"{available}. Pass one of them, or layer=None for X."
            )
        return f["layers"][self.layer]

    def _where(self) -> str:
        """The file (or in-memory AnnData) and the element read, for error messages."""
        source = "the in-memory AnnData" if self.path is None else repr(str(self.path))
        return f"{source} ({'X' if self.layer is None else 'layers/' + self.layer})"

    def _read_metadata(self) -> None:
        if self._adata is not None:
            a = self._adata
            if self.layer is not None and self.layer not in a.layers:
                raise ValueError(
                    f"layer {self.layer!r} is not in the AnnData; available layers: "
                    f"{sorted(a.layers.keys())}. Pass one of them, or layer=None for X."
                )
            M = a.X if self.layer is None else a.layers[self.layer]
            if sp.issparse(M):
                check_sparse_matrix(M, self._where())
            self._memory = M.tocsr() if sp.issparse(M) and not sp.isspmatrix_csr(M) else M
            self.sparse = sp.issparse(M)
            self._n_rows, self.n_genes = M.shape
            self.var_names = np.asarray(a.var_names.astype(str), dtype=object)
            return
        h5py = _import_h5py()
        self._memory = None
        where = self._where()
        elem = self._matrix_elem(self._file())
        if isinstance(elem, h5py.Dataset):
            self.sparse = False
            if elem.ndim != 2:
                raise _damaged(
                    where,
                    f"the matrix has {elem.ndim} dimensions (shape {elem.shape}); it must have "
                    "two (cells x genes)",
                )
            _check_numeric(elem.dtype, where, "the matrix")
            self._n_rows, self.n_genes = (int(s) for s in elem.shape)
        else:
            encoding = _attr_str(elem, "encoding-type")
            if encoding != "csr_matrix":
                raise ValueError(
                    f"the matrix in {str(self.path)!r} is stored as {encoding or 'unknown'!r}; "
                    "streaming rows needs a dense array or CSR. Convert it once, e.g. "
                    "`adata.X = adata.X.tocsr(); adata.write_h5ad(path)`."
                )
            self.sparse = True
            self._n_rows, self.n_genes = _declared_shape(elem, where)
            _check_sparse_group(elem, where, self._n_rows)
        var = self._file().get("var")
        if not isinstance(var, h5py.Group):
            raise _damaged(where, "the file has no var group (the gene names)")
        check_string_widths(var, where)
        try:
            var = _read_elem(var)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise _damaged(where, f"its var (the gene names) cannot be read: {exc}") from exc
        self.var_names = np.asarray(pd.Index(var.index).astype(str), dtype=object)
        if len(self.var_names) != self.n_genes:
            raise _damaged(
                where,
                f"the matrix has {self.n_genes} columns but var lists {len(self.var_names)} "
                "genes; there must be one gene name per column",
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n_rows if self._rows is None else len(self._rows), self.n_genes)

    ndim = 2
    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "in-memory AnnData"
        layer = "" if self.layer is None else f", layer={self.layer!r}"
        return f"H5ADDataset({where!r}{layer}, shape={self.shape})"

    def obs_column(self, name: str) -> np.ndarray:
        """The ``obs`` column ``name`` (categories as their values), in this dataset's rows."""
        if self._adata is not None:
            obs = self._adata.obs
            if name not in obs.columns:
                raise ValueError(_unknown(name, list(obs.columns)))
            values = _labels(obs[name])
        else:
            where = repr(str(self.path))
            group = self._file().get("obs")
            if not isinstance(group, _import_h5py().Group):
                raise _damaged(where, "the file has no obs group (the cell annotations)")
            index_key = _attr_str(group, "_index") or "_index"
            columns = [c for c in group.keys() if c != index_key]
            if name not in columns:
                raise ValueError(_unknown(name, columns))
            check_string_widths(group[name], where)
            _check_codes(group[name], where, name)
            try:
                values = _labels(_read_elem(group[name]))
            except (ValueError, KeyError, TypeError, OSError) as exc:
                raise _damaged(where, f"its obs column {name!r} cannot be read: {exc}") from exc
        if values.ndim != 1 or len(values) != self._n_rows:
            raise _damaged(
                repr(str(self.path)) if self.path is not None else "the in-memory AnnData",
                f"the obs column {name!r} has {len(values)} values but X has {self._n_rows} "
                "rows; there must be one value per cell",
            )
        return values if self._rows is None else values[self._rows]

    def mean(self, axis: int = 0, block_rows: int = 4096) -> np.ndarray:
        """Column means (``axis=0``), streamed ``block_rows`` rows at a time (float64)."""
        if axis != 0:
            raise ValueError(f"only axis=0 (per-gene means) is supported; got axis={axis!r}.")
        total = np.zeros(self.n_genes, dtype=np.float64)
        for start in range(0, self.shape[0], block_rows):
            block = self[start : start + block_rows]
            total += block.sum(axis=0, dtype=np.float64)
        return total / max(1, self.shape[0])

    def subset(self, rows) -> H5ADDataset:
        """A dataset of the given rows (in that order) of this one, sharing nothing open."""
        rows = np.asarray(rows, dtype=np.int64)
        base = np.arange(self._n_rows) if self._rows is None else self._rows
        new = object.__new__(type(self))
        new.__dict__.update(self.__getstate__())
        new._rows = base[rows]
        return new

    # ------------------------------------------------------------------ file handle
    def _file(self):
        """This process's read-only handle (re-opened after a fork or unpickling)."""
        if self._h5 is None or self._pid != os.getpid():
            h5py = _import_h5py()
            try:
                self._h5 = h5py.File(self.path, "r")
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise ValueError(
                    f"could not open {str(self.path)!r} as an .h5ad (HDF5) file: {exc}. Check "
                    "that the file is a complete .h5ad written by anndata."
                ) from exc
            self._pid = os.getpid()
        return self._h5

    def close(self) -> None:
        """Close this process's file handle (it re-opens on the next read)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = self._pid = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h5"] = state["_pid"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    # ------------------------------------------------------------------ reading
    def _read_block(self, start: int, stop: int):
        """File rows ``start:stop`` (contiguous), as stored: dense array or CSR matrix.

        All reads of the file go through here (tests count them). Only what slicing the file
        needs is checked here (``indptr`` within the stored values); the indices and values
        are checked by :meth:`_read_file_rows`, once per read, before anything uses them.
        """
        if self._memory is not None:
            return self._memory[start:stop]
        elem = self._matrix_elem(self._file())
        if not self.sparse:
            return elem[start:stop]
        ptr = np.asarray(elem["indptr"][start : stop + 1], dtype=np.int64)
        nnz = elem["data"].shape[0]
        if len(ptr) != stop - start + 1 or ptr[0] < 0 or ptr[-1] > nnz or ptr[0] > ptr[-1]:
            raise _damaged(
                self._where(),
                f"the sparse matrix's indptr for rows {start}-{stop - 1} runs from "
                f"{int(ptr[0])} to {int(ptr[-1])} over {len(ptr)} entries, outside its "
                f"{nnz} stored values",
            )
        data = elem["data"][ptr[0] : ptr[-1]]
        indices = elem["indices"][ptr[0] : ptr[-1]]
        if indices.dtype.kind == "u" and indices.dtype.itemsize == 8:  # SciPy casts to int64
            check_compressed(ptr, indices, self.n_genes, nnz=nnz, where=self._where(), rows=start)
        if data.dtype.kind == "f" and data.dtype.itemsize < 4:  # SciPy has no float16
            data = data.astype(np.float32)
        return sp.csr_matrix((data, indices, ptr - ptr[0]), shape=(stop - start, self.n_genes))

    def _read_file_rows(self, file_rows: np.ndarray):
        """Sorted unique file rows, read as few contiguous blocks, stacked in that order and
        checked: dense float32 array or CSR matrix."""
        if len(file_rows) == 0:
            return np.zeros((0, self.n_genes), dtype=np.float32)
        breaks = np.flatnonzero(np.diff(file_rows) != 1) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [len(file_rows)]])
        blocks = [
            self._read_block(int(file_rows[a]), int(file_rows[b - 1]) + 1)
            for a, b in zip(starts, stops, strict=True)
        ]
        if len(blocks) == 1:
            block = blocks[0]
        else:  # stacking reads only the arrays' lengths, never an index
            block = sp.vstack(blocks, format="csr") if self.sparse else np.concatenate(blocks)
        return self._checked(block, file_rows)

    def _checked(self, block, rows: np.ndarray):
        """``block`` (the file rows ``rows``) once its indices and values are checked."""
        where = self._where()
        if sp.issparse(block):
            if self._memory is None:  # an in-memory matrix was checked whole at construction
                check_compressed(
                    block.indptr,
                    block.indices,
                    self.n_genes,
                    nnz=len(block.indices),
                    where=where,
                    rows=rows,
                )
            check_values(block, where, rows)
            return block
        check_values(block, where, rows)
        return np.asarray(block, dtype=np.float32)

    def read_rows(self, rows) -> np.ndarray:
        """Rows ``rows`` (local indices, any order) as a dense float32 array."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise IndexError(f"rows must be one-dimensional; got shape {rows.shape}.")
        n = self.shape[0]
        if len(rows) and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for a dataset of {n} rows.")
        rows = np.where(rows < 0, rows + n, rows)
        file_rows = rows if self._rows is None else self._rows[rows]
        uniq, inverse = np.unique(file_rows, return_inverse=True)
        return _dense(self._read_file_rows(uniq))[inverse]

    def __getitem__(self, key) -> np.ndarray:
        """Dense float32 rows: ``ds[rows]`` or ``ds[rows, genes]`` (rows: int, slice, array)."""
        cols = slice(None)
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError(f"H5ADDataset is two-dimensional; got index {key!r}.")
            key, cols = key
        if isinstance(key, slice):
            rows = np.arange(*key.indices(self.shape[0]))
        elif np.isscalar(key):
            return self.read_rows([int(key)])[0, cols]
        else:
            rows = np.asarray(key)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
        return self.read_rows(rows)[:, cols]

    # ------------------------------------------------------------------ training order
    def epoch_order(self, generator: torch.Generator):
        """One epoch's chunk-shuffled order: ``(order, read_bounds, reader)``.

        ``order`` permutes the rows; reads are the consecutive segments between
        ``read_bounds``; ``reader`` serves rows of ``order`` reading each read once.
        """
        n, cs, cpr = self.shape[0], self.chunk_size, self.chunks_per_read
        n_chunks = math.ceil(n / cs)
        perm = torch.randperm(n_chunks, generator=generator).numpy()
        read_of_chunk = np.empty(n_chunks, dtype=np.int64)
        read_of_chunk[perm] = np.arange(n_chunks) // cpr
        n_reads = math.ceil(n_chunks / cpr)
        if cs == 1:
            order = perm
        else:
            starts = perm * cs
            lengths = np.minimum(cs, n - starts)
            offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            rows = np.repeat(starts, lengths) + offsets
            keys = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
            order = rows[np.lexsort((keys, read_of_chunk[rows // cs]))]
        bounds = np.minimum(np.arange(n_reads + 1) * cpr * cs, n)
        if cs * n_chunks != n:  # the short last chunk shifts the bounds of later reads
            sizes = np.bincount(read_of_chunk[np.arange(n) // cs], minlength=n_reads)
            bounds = np.concatenate([[0], np.cumsum(sizes)])
        return order, bounds, _EpochReader(self, read_of_chunk, perm)


def _dense(M) -> np.ndarray:
    M = M.toarray() if sp.issparse(M) else M
    return np.asarray(M, dtype=np.float32)


def _unknown(name, columns) -> str:
    return (
        f"{name!r} is not an obs column; available columns: {columns}. Pass one of them "
        "as y, or pass the labels as an array."
    )


class _EpochReader:
    """Serves rows of one epoch of an :class:`H5ADDataset`, reading each read unit once.

    ``reader[rows]`` loads the read units holding ``rows`` (whole units: a few contiguous
    file slices) and keeps the most recent ones, so consecutive batches of the epoch order
    cost one disk read per unit.
    """

    keep = 3

    def __init__(self, dataset: H5ADDataset, read_of_chunk: np.ndarray, perm: np.ndarray):
        self.dataset = dataset
        self.read_of_chunk = read_of_chunk
        self.perm = perm
        self.shape = dataset.shape
        self._cache: OrderedDict[int, tuple[np.ndarray, object]] = OrderedDict()

    def _load(self, unit: int):
        ds, cs = self.dataset, self.dataset.chunk_size
        chunks = np.sort(self.perm[unit * ds.chunks_per_read : (unit + 1) * ds.chunks_per_read])
        local = np.concatenate(
            [np.arange(c * cs, min((c + 1) * cs, self.shape[0])) for c in chunks]
        )
        file_rows = local if ds._rows is None else ds._rows[local]
        sort = np.argsort(file_rows, kind="stable")
        block = ds._read_file_rows(file_rows[sort])
        position = np.empty(len(local), dtype=np.int64)
        position[sort] = np.arange(len(local))
        return local, block, position

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        units = self.read_of_chunk[rows // self.dataset.chunk_size]
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        needed = list(dict.fromkeys(units.tolist()))
        for unit in needed:
            if unit not in self._cache:
                self._cache[unit] = self._load(unit)
            self._cache.move_to_end(unit)
            local, block, position = self._cache[unit]
            mask = units == unit
            out[mask] = _dense(block[position[np.searchsorted(local, rows[mask])]])
        while len(self._cache) > max(self.keep, len(needed)):
            self._cache.popitem(last=False)
        return out


def h5ad_fit_input(estimator, X, y):
    """The dataset and labels ``fit`` trains on.

    ``y`` is an ``obs`` column name or an array of one label per row. Nothing is written to
    ``estimator``: ``fit`` sets ``n_features_in_`` and ``feature_names_in_`` once all its
    checks passed (a refused warm fit leaves the model unchanged).
    """
    ds = X if isinstance(X, H5ADDataset) else H5ADDataset(X)
    if isinstance(y, str):
        y = ds.obs_column(y)
    elif y is None:
        raise ValueError(
            f"{type(estimator).__name__} needs labels: pass y as an obs column name "
            "(e.g. y='cell_type') or as an array with one label per cell."
        )
    else:
        y = np.asarray(y)
        if y.shape[0] != ds.shape[0]:
            raise ValueError(
                f"y has {y.shape[0]} labels but the dataset has {ds.shape[0]} rows; pass one "
                "label per cell or the name of an obs column."
            )
    if ds.shape[0] < 1 or ds.shape[1] < 1:
        raise ValueError(
            f"the dataset has shape {ds.shape}; it needs at least one cell and one gene."
        )
    return ds, y


def h5ad_predict_input(estimator, X) -> H5ADDataset:
    """The dataset ``predict`` reads, checked against the genes seen in ``fit``."""
    ds = X if isinstance(X, H5ADDataset) else H5ADDataset(X)
    if ds.shape[1] != estimator.n_features_in_:
        raise ValueError(
            f"X has {ds.shape[1]} features, but {type(estimator).__name__} is expecting "
            f"{estimator.n_features_in_} features as input; pass the same genes as in fit."
        )
    fitted = getattr(estimator, "feature_names_in_", None)
    if fitted is not None and not np.array_equal(np.asarray(fitted, dtype=object), ds.var_names):
        raise ValueError(
            "the var_names of the .h5ad differ from the genes seen in fit; reorder them to "
            "the fitted genes (feature_names_in_), e.g. `adata[:, clf.feature_names_in_]`."
        )
    return ds


def take_rows(X, rows):
    """``X[rows]`` for arrays; a lazy subset for datasets (nothing is read)."""
    return X.subset(rows) if isinstance(X, H5ADDataset) else X[rows]
