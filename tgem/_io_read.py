"""Reading a model file's container: nothing in it is trusted before it is checked.

Only a regular file is read (never a device or a FIFO), at most :data:`MAX_FILE_SIZE`
bytes; the ZIP archive must hold exactly the entries its header's manifest lists, stored
uncompressed, with a valid SHA-256 checksum; each ``.npy`` array is parsed without NumPy's
pickle path and checked against its declared dtype, shape and byte count. What the arrays
and header mean is checked by :mod:`tgem._io_build`.
"""

from __future__ import annotations

import hmac
import io
import json
import math
import os
import stat
import struct
import zipfile
import zlib

import numpy as np

from tgem._io_format import (
    _ARRAY_DTYPES,
    _CHECKSUM,
    _HEADER,
    _READABLE,
    FORMAT,
    MAX_HEADER_SIZE,
    _digest,
)
from tgem._version import __version__
from tgem.exceptions import ModelFileError

#: Largest model file :func:`load` reads, in bytes (1 GiB); larger files and streams are refused
#: before they are read. A model of 20,000 genes, 8 layers and 8 heads in float64 takes ~40 MB.
MAX_FILE_SIZE = 1 << 30
_READ_CHUNK = 16 << 20
# Anything a malformed archive, header or array can raise while being parsed.
_PARSE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
    UnicodeDecodeError,
    RuntimeError,
    struct.error,
    zlib.error,
    NotImplementedError,
    SyntaxError,
    MemoryError,
)
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular(mode: int, size: int, name: str) -> None:
    """Refuse what is not a regular file, or a file above :data:`MAX_FILE_SIZE`."""
    if not stat.S_ISREG(mode):
        kind = next((what for test, what in _FILE_KINDS if test(mode)), "not a plain file")
        raise ModelFileError(
            f"{name} is not a regular file (it is {kind}); pass the path of a .tgem model file "
            "written by TGEMClassifier.save."
        )
    if size > MAX_FILE_SIZE:
        raise _too_large(name, f"{size} bytes")


def _too_large(name: str, size: str) -> ModelFileError:
    return ModelFileError(
        f"{name} is larger than the model file size cap: {size}, the cap is {MAX_FILE_SIZE} "
        "bytes (tgem._io_read.MAX_FILE_SIZE). tgem model files are far smaller; this is not one."
    )


def _read_file(path, name: str) -> bytes:
    """Read a model file from disk: a regular file below the size cap, never a device or FIFO.

    The path is checked with ``os.stat`` before it is opened (so no device is even opened),
    opened with ``O_NONBLOCK`` (a FIFO swapped in meanwhile cannot block the open) and checked
    again on the open descriptor, and the read is bounded by :data:`MAX_FILE_SIZE`.
    """
    _check_regular(*_mode_and_size(os.stat(path)), name)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        _check_regular(*_mode_and_size(os.fstat(fd)), name)
        return _read_stream(fh, name)


def _mode_and_size(info: os.stat_result) -> tuple[int, int]:
    return info.st_mode, info.st_size


def _read_stream(fh, name: str) -> bytes:
    """Read a binary stream to its end in chunks, refusing more than :data:`MAX_FILE_SIZE`."""
    chunks, total = [], 0
    while True:
        chunk = fh.read(min(_READ_CHUNK, MAX_FILE_SIZE + 1 - total))
        if chunk is None:
            raise ModelFileError(
                f"{name} has no data ready (a non-blocking stream); pass a file or a stream "
                "that blocks."
            )
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise ModelFileError(
                f"{name} returned {type(chunk).__name__} from read(); open the model file in "
                "binary mode ('rb')."
            )
        if not chunk:
            return b"".join(chunks)
        chunks.append(bytes(chunk))
        total += len(chunk)
        if total > MAX_FILE_SIZE:
            raise _too_large(name, f"more than {MAX_FILE_SIZE} bytes")


def _parse(data: bytes, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Check the container, version and checksum; return the header and the arrays."""
    if not data.startswith(b"PK\x03\x04"):
        hint = ""
        if data[:1] == b"\x80" or data[:2] == b"\x1f\x8b":
            hint = (
                " It looks like a pickle/joblib file: load such files with joblib only "
                "when you trust their source."
            )
        raise ModelFileError(
            f"{name} is not a tgem model file (it does not start like one; tgem model files "
            f"are ZIP archives written by TGEMClassifier.save).{hint}"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ModelFileError(
            f"{name} is truncated or corrupted: its ZIP directory is unreadable ({exc}). "
            "Copy the file again or re-save it from the original model."
        ) from exc
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if _HEADER not in names or _CHECKSUM not in names:
        raise ModelFileError(
            f"{name} is a ZIP archive but not a tgem model file (it lacks {_HEADER} or "
            f"{_CHECKSUM}; it holds {names[:5]})."
        )
    if len(set(names)) != len(names):
        raise ModelFileError(f"{name} repeats an entry name; it is not a valid tgem model file.")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > len(data):
            raise ModelFileError(
                f"{name}: entry {info.filename!r} is compressed or larger than the file; tgem "
                "model files store their entries uncompressed. The file was not written by "
                "tgem or was modified."
            )
    header_info = infos[names.index(_HEADER)]
    if header_info.file_size > MAX_HEADER_SIZE:
        raise ModelFileError(
            f"{name}: its header ({_HEADER}) declares {header_info.file_size} bytes, above the "
            f"header size cap of {MAX_HEADER_SIZE} bytes (tgem._io_format.MAX_HEADER_SIZE). tgem "
            "writes headers of a few kB per 1,000 genes; the file was not written by tgem."
        )
    header_bytes = archive.read(_HEADER)
    header = json.loads(header_bytes.decode("utf-8"))
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(
            f"{name} is not a tgem model file: its header's format is "
            f"{header.get('format') if isinstance(header, dict) else None!r}, "
            f"expected {FORMAT!r}."
        )
    version = header.get("format_version")
    if type(version) is not int or version not in _READABLE:
        written_by = header.get("versions", {})
        written_by = written_by.get("tgem") if isinstance(written_by, dict) else None
        raise ModelFileError(
            f"{name} has model format version {version!r} (written by tgem {written_by}); "
            f"this tgem {__version__} reads format version(s) {list(_READABLE)}. "
            "Install the tgem version that wrote the file, or a newer one."
        )
    manifest = header["arrays"]
    if not isinstance(manifest, list) or not all(_is_manifest_entry(e) for e in manifest):
        raise ModelFileError(
            f"{name}: the header's array manifest is not a list of {{name, dtype, shape}} "
            "entries (a str, a dtype string and a list of non-negative ints)."
        )
    expected = [_HEADER] + [entry["name"] for entry in manifest] + [_CHECKSUM]
    if names != expected:
        raise ModelFileError(
            f"{name}: the archive's entries do not match its header's manifest "
            f"({len(names)} entries, {len(expected)} expected). The file was modified."
        )
    entries = [(n, archive.read(n)) for n in expected[:-1]]
    stored = archive.read(_CHECKSUM).decode("ascii").strip()
    if not hmac.compare_digest(stored, _digest(entries)):
        raise ModelFileError(
            f"{name} fails its SHA-256 checksum: it is corrupted or was modified after it was "
            "written. Copy the file again or re-save it from the original model."
        )
    arrays = {
        entry["name"]: _read_npy(blob, entry, name)
        for entry, (_, blob) in zip(manifest, entries[1:], strict=True)
    }
    return header, arrays


def _is_manifest_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and set(entry) == {"name", "dtype", "shape"}
        and isinstance(entry["name"], str)
        and entry["dtype"] in _ARRAY_DTYPES
        and isinstance(entry["shape"], list)
        and all(type(n) is int and n >= 0 for n in entry["shape"])
    )


def _read_npy(blob: bytes, entry: dict, name: str) -> np.ndarray:
    """Parse one ``.npy`` entry without NumPy's pickle path, checking dtype, shape and size."""
    fh = io.BytesIO(blob)
    major, _ = np.lib.format.read_magic(fh)
    if major == 1:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    declared = (entry.get("dtype"), entry.get("shape"))
    if dtype.str not in _ARRAY_DTYPES or declared != (dtype.str, list(shape)):
        raise ModelFileError(
            f"{name}: array {entry.get('name')!r} has dtype {dtype.str} and shape {shape}, the "
            f"header says {declared}; float arrays of the declared shape are expected."
        )
    count = math.prod(shape)
    payload = blob[fh.tell() :]
    if len(payload) != count * dtype.itemsize:
        raise ModelFileError(
            f"{name}: array {entry.get('name')!r} holds {len(payload)} bytes, "
            f"{count * dtype.itemsize} expected for shape {shape}."
        )
    array = np.frombuffer(payload, dtype=dtype, count=count)
    return array.reshape(shape, order="F" if fortran else "C").astype(dtype.newbyteorder("="))
