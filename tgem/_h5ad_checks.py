"""Checks of untrusted ``.h5ad`` files before anything in them is read or trusted.

A few bytes of an HDF5 header may declare strings of any width, sparse groups whose index
arrays point anywhere, shapes that disagree with the data, or values that are not finite.
:class:`tgem.H5ADDataset` (:mod:`tgem._h5ad`) and the readers of :mod:`tgem.datasets` call
these functions before they allocate or use anything a file declares; each raises a
``ValueError`` that names the file part, the problem and the fix.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from tgem._finite import MAX_ABS_VALUE, check_magnitude

_INSTALL = 'install it with `pip install "tgem[anndata]"`'


def _import_h5py():
    try:
        import h5py
    except ImportError as exc:
        raise ImportError(f"streaming .h5ad files needs h5py; {_INSTALL}.") from exc
    return h5py


#: Widest fixed-width string accepted in an ``.h5ad`` element read here (gene names, labels):
#: a few bytes of header may declare strings of any width, which reading would allocate.
MAX_STRING_BYTES = 1 << 16

_REWRITE = (
    "The file is damaged or was not written by anndata; rewrite it from the original data "
    "(e.g. `adata.write_h5ad(path)`)."
)


def _damaged(where: str, problem: str) -> ValueError:
    return ValueError(f"{where}: {problem}. {_REWRITE}")


def check_string_widths(elem, where: str) -> None:
    """Refuse fixed-width strings wider than :data:`MAX_STRING_BYTES` in ``elem`` (a dataset
    or a group, walked), before anything is read from it."""
    h5py = _import_h5py()
    datasets = [elem] if isinstance(elem, h5py.Dataset) else []

    def collect(_, obj):
        if isinstance(obj, h5py.Dataset):
            datasets.append(obj)

    if not datasets:
        elem.visititems(collect)
    for dataset in datasets:
        if dataset.dtype.kind in "SUV" and dataset.dtype.itemsize > MAX_STRING_BYTES:
            raise _damaged(
                where,
                f"{dataset.name} holds strings of {dataset.dtype.itemsize} bytes each, above the "
                f"limit of {MAX_STRING_BYTES} bytes (tgem._h5ad.MAX_STRING_BYTES)",
            )


def _check_codes(elem, where: str, name: str) -> None:
    """Refuse a categorical whose codes are not integers or point outside its categories."""
    h5py = _import_h5py()
    encoding = _attr_str(elem, "encoding-type")
    if encoding != "categorical" or not isinstance(elem, h5py.Group):
        return
    if not isinstance(elem.get("codes"), h5py.Dataset) or not isinstance(
        elem.get("categories"), h5py.Dataset
    ):
        raise _damaged(where, f"the categorical obs column {name!r} lacks codes or categories")
    codes, categories = elem["codes"], elem["categories"]
    if codes.dtype.kind not in "iu" or codes.ndim != 1 or categories.ndim != 1:
        raise _damaged(
            where,
            f"the categorical obs column {name!r} has codes of dtype {codes.dtype} and "
            f"{codes.ndim} dimension(s); they must be one-dimensional integers",
        )
    values = codes[()]
    n = categories.shape[0]
    bad = (values < -1) | (values >= n)
    if bad.any():
        raise _damaged(
            where,
            f"the obs column {name!r} has category code {values[bad][0]}, but only {n} "
            f"categories (codes run from -1, missing, to {n - 1})",
        )


def _attr_str(elem, key: str) -> str:
    value = elem.attrs.get(key, "")
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value if isinstance(value, str) else ""


def _declared_shape(elem, where: str) -> tuple[int, int]:
    """The ``shape`` attribute of a sparse group: two non-negative integers."""
    if "shape" not in elem.attrs:
        raise _damaged(where, "the sparse matrix has no shape attribute")
    shape = np.asarray(elem.attrs["shape"])
    if (
        shape.shape != (2,)
        or shape.dtype.kind not in "iu"
        or (shape < 0).any()
        or (shape >= 2**62).any()
    ):
        raise _damaged(
            where,
            f"the sparse matrix's shape attribute {shape.tolist()!r} is not two non-negative "
            "integers (rows, columns)",
        )
    return int(shape[0]), int(shape[1])


def check_sparse_groups(f, where: str) -> None:
    """Check every CSR/CSC group of an open ``.h5ad`` file (X, layers, raw, obsp, ...) as
    :func:`_check_sparse_group` does, before a reader allocates what their shapes declare."""
    h5py = _import_h5py()
    groups = []

    def collect(_, obj):
        if isinstance(obj, h5py.Group) and _attr_str(obj, "encoding-type") in (
            "csr_matrix",
            "csc_matrix",
        ):
            groups.append(obj)

    f.visititems(collect)
    for group in groups:
        csc = _attr_str(group, "encoding-type") == "csc_matrix"
        shape = _declared_shape(group, f"{where} ({group.name})")
        _check_sparse_group(group, f"{where} ({group.name})", shape[1] if csc else shape[0], csc)


def _check_sparse_group(elem, where: str, n_rows: int, csc: bool = False) -> None:
    """Check a CSR (or CSC) group's arrays against each other before any row is read.

    Reads two entries of ``indptr``; the rest of ``indptr`` and the ``indices`` are checked
    block by block as rows are read (:func:`check_compressed`).
    """
    h5py = _import_h5py()
    for key in ("data", "indices", "indptr"):
        if not isinstance(elem.get(key), h5py.Dataset):
            raise _damaged(where, f"the sparse matrix has no {key!r} array")
        if elem[key].ndim != 1:
            raise _damaged(
                where,
                f"the sparse matrix's {key} has shape {elem[key].shape}; it must be "
                "one-dimensional",
            )
    data, indices, indptr = elem["data"], elem["indices"], elem["indptr"]
    major = "column" if csc else "row"
    for key, dataset in (("indices", indices), ("indptr", indptr)):
        if dataset.dtype.kind not in "iu":
            raise _damaged(
                where, f"the sparse matrix's {key} has dtype {dataset.dtype}; it must be integers"
            )
    _check_numeric(data.dtype, where, "the sparse matrix's data")
    if indptr.shape[0] != n_rows + 1:
        raise _damaged(
            where,
            f"the sparse matrix's shape attribute says {n_rows} {major}s, but its indptr has "
            f"{indptr.shape[0]} entries ({indptr.shape[0] - 1} {major}s); it needs one entry "
            f"per {major} plus one",
        )
    if indices.shape[0] != data.shape[0]:
        raise _damaged(
            where,
            f"the sparse matrix's indices has {indices.shape[0]} entries but its data has "
            f"{data.shape[0]}; they must have one entry per stored value each",
        )
    first, last = int(indptr[0]), int(indptr[n_rows])
    if first != 0:
        raise _damaged(where, f"the sparse matrix's indptr starts at {first}; it must start at 0")
    if last != data.shape[0]:
        raise _damaged(
            where,
            f"the sparse matrix's indptr ends at {last}, but it stores {data.shape[0]} values; "
            "it must end at the number of stored values",
        )


def _check_numeric(dtype, where: str, what: str) -> None:
    if np.dtype(dtype).kind not in "biuf":
        raise _damaged(where, f"{what} has dtype {dtype}; expression values must be numbers")


def check_compressed(
    indptr, indices, n_minor: int, *, nnz: int, where: str, rows=0, csc: bool = False
) -> None:
    """Refuse CSR (or CSC) arrays that would make SciPy read or write out of bounds.

    ``indptr`` holds the offsets of consecutive rows (columns for CSC) into arrays of ``nnz``
    stored values; ``indices`` the stored values of those rows, each of which must lie in
    ``[0, n_minor)``. Vectorised: one pass over ``indptr`` and one over ``indices``.

    Parameters
    ----------
    indptr : ndarray of int
        Row offsets (``n + 1`` entries for ``n`` rows).
    indices : ndarray of int
        The column index of each stored value of those rows.
    n_minor : int
        Number of columns (rows for CSC).
    nnz : int
        Number of stored values of the whole matrix.
    where : str
        What the arrays come from, for the error message.
    rows : int or ndarray of int, default=0
        The matrix row of ``indptr[0]``, or the matrix row of each entry of ``indptr`` but
        the last, for the error message.
    csc : bool, default=False
        Whether the arrays are CSC (``indptr`` over columns, ``indices`` rows).

    Raises
    ------
    ValueError
        If ``indptr`` leaves ``[0, nnz]`` or decreases, ``indices`` does not hold exactly the
        values ``indptr`` spans, or an index lies outside ``[0, n_minor)``.
    """
    major, minor = ("column", "row") if csc else ("row", "column")
    if len(indptr) and (indptr[0] < 0 or indptr[-1] > nnz):
        raise _damaged(
            where,
            f"indptr points outside the {nnz} stored values ({int(indptr[0])} to "
            f"{int(indptr[-1])})",
        )
    if len(indptr) > 1:
        decreasing = indptr[1:] < indptr[:-1]
        if decreasing.any():
            at = _row_name(rows, int(np.flatnonzero(decreasing)[0]))
            raise _damaged(where, f"indptr decreases at {major} {at}; it must be non-decreasing")
    span = int(indptr[-1] - indptr[0]) if len(indptr) else 0
    if len(indices) != span:
        raise _damaged(
            where, f"indptr spans {span} stored values but {len(indices)} indices were read"
        )
    if len(indices):
        # one pass: seen as unsigned, a negative index is larger than any valid one
        unsigned = indices.view(indices.dtype.str.replace("i", "u"))  # same byte order
        if unsigned.max() >= n_minor:
            position = int(np.flatnonzero((indices < 0) | (indices >= n_minor))[0])
            at = int(np.searchsorted(indptr, indptr[0] + position, side="right")) - 1
            raise _damaged(
                where,
                f"{minor} index {int(indices[position])} in {major} {_row_name(rows, at)}, but "
                f"the matrix has {n_minor} {minor}s",
            )


def _row_name(rows, i: int) -> int:
    return int(rows) + i if np.ndim(rows) == 0 else int(rows[i])


def check_sparse_matrix(M, where: str) -> None:
    """Refuse a SciPy CSR/CSC matrix whose structure is out of bounds (see
    :func:`check_compressed`); other sparse formats are left to SciPy."""
    if M.format not in ("csr", "csc"):
        return
    n_major, n_minor = M.shape if M.format == "csr" else M.shape[::-1]
    kind = "(CSR)" if M.format == "csr" else "(CSC)"
    where = f"{where} {kind}"
    if len(M.indptr) != n_major + 1 or len(M.indices) != len(M.data):
        raise _damaged(
            where,
            f"indptr has {len(M.indptr)} entries for {n_major} rows and indices has "
            f"{len(M.indices)} entries for {len(M.data)} values",
        )
    if M.indices.dtype.kind not in "iu" or M.indptr.dtype.kind not in "iu":
        raise _damaged(where, "indptr and indices must be integers")
    check_compressed(
        M.indptr, M.indices, n_minor, nnz=len(M.data), where=where, csc=M.format == "csc"
    )


def check_values(block, where: str, rows=0) -> None:
    """The checks arrays get in ``fit`` and ``predict``, for a block of rows read from a file.

    A block whose smallest and largest values lie within ``MAX_ABS_VALUE`` passes after one
    ``min`` and one ``max`` (NaN propagates through both). Any other block goes through the
    array path's own checks, scikit-learn's finiteness check and
    :func:`tgem._finite.check_magnitude` (so the messages are the same), prefixed with
    ``where`` and the first bad row (``rows``: the file row of the block's first row, or of
    each of its rows).
    """

    data = block.data if sp.issparse(block) else block
    if not data.size:
        return
    low, high = data.min(), data.max()
    if -MAX_ABS_VALUE <= low and high <= MAX_ABS_VALUE:
        return
    from sklearn.utils import assert_all_finite

    try:
        assert_all_finite(data, input_name="X")
        check_magnitude(data)
    except ValueError as exc:
        raise ValueError(
            f"{where}, row {_row_name(rows, _first_bad_row(block))}: {exc} Fix the values and "
            "rewrite the file, or drop those cells."
        ) from None


def _first_bad_row(block) -> int:

    if sp.issparse(block):
        data = np.asarray(block.data, dtype=np.float64)
        bad = ~(np.abs(data) <= MAX_ABS_VALUE)
        position = int(np.flatnonzero(bad)[0]) if bad.any() else 0
        return int(np.searchsorted(block.indptr, position, side="right")) - 1
    data = np.asarray(block, dtype=np.float64)
    bad = ~(np.abs(data) <= MAX_ABS_VALUE).all(axis=1)
    return int(np.flatnonzero(bad)[0]) if bad.any() else 0
