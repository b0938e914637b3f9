"""Checkpoints: ``fit(..., checkpoint=path)`` writes the best model so far as a model file.

:func:`checkpoint_lock` makes one fit the only writer of a checkpoint path (threads and
processes), :func:`writes_checkpoints` says whether this process writes them (rank 0 under
DDP), and :func:`checkpoint_writer` is the callback the training loop calls on each
improvement: it completes the estimator's fitted state and saves it with
:func:`tgem._io.save` (a failed write warns once and training goes on).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from pathlib import Path

import torch.distributed as tdist

from tgem import _io
from tgem._distributed import under_torchrun

try:
    import fcntl
except ImportError:  # no flock (Windows)
    fcntl = None

__all__ = ["checkpoint_lock", "checkpoint_writer", "writes_checkpoints"]

logger = logging.getLogger(__name__)


_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def checkpoint_lock(path):
    """Hold ``path`` as the checkpoint of one fit; a concurrent fit given it fails at once.

    Two fits writing one checkpoint file would interleave their models in it, so ``fit``
    takes this lock before training: within one process (threads, e.g. a threaded grid
    search) through a registry of held paths, across processes through an exclusive
    ``flock`` on a lock file ``.<name>.lock`` beside the checkpoint (removed again when the
    fit ends; the OS releases the lock if the process dies). Sequential fits may share a path.

    Parameters
    ----------
    path : str, path-like or None
        The checkpoint file; ``None`` holds nothing.

    Raises
    ------
    RuntimeError
        If another fit holds ``path``.
    FileNotFoundError
        If the checkpoint's folder does not exist.
    """
    if path is None:
        yield
        return
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"checkpoint must be a file path (str or path-like), got {type(path).__name__}; "
            'pass e.g. checkpoint="best.tgem".'
        )
    path = Path(path)
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"checkpoint={str(path)!r}: the folder {str(path.parent)!r} does not exist; create "
            "it or pass a checkpoint path in an existing folder."
        )
    key = str(folder / path.name)
    with _HELD_LOCK:
        if key in _HELD:
            raise _in_use(path, "in this process")
        _HELD.add(key)
    try:
        with _file_lock(folder / f".{path.name}.lock", path):
            yield
    finally:
        with _HELD_LOCK:
            _HELD.discard(key)


def writes_checkpoints(distributed) -> bool:
    """Whether this process writes ``fit``'s checkpoints (which only rank 0 of DDP does)."""
    if distributed is False:
        return True
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank() == 0
    if under_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0")) == 0
    return True


def _in_use(path: Path, where: str) -> RuntimeError:
    return RuntimeError(
        f"checkpoint={str(path)!r} is in use by another fit ({where}). Fits that run at the "
        "same time (threads, processes, or GridSearchCV with n_jobs != 1 given checkpoint= "
        "through fit) cannot share one checkpoint file: give each fit its own path, or run "
        "them one at a time."
    )


@contextlib.contextmanager
def _file_lock(lock_path: Path, path: Path):
    if fcntl is None:  # no flock (Windows): the in-process registry is the only guard
        yield
        return
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        fd = os.open(lock_path, flags, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(path, "in another process") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have unlinked the file we locked: lock the new one
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def checkpoint_writer(estimator, path, finish):
    """The training loop's ``on_improvement`` callback: ``finish(state)``, then save.

    ``finish`` sets the estimator's fitted attributes from the training state; the network
    is put back in training mode after each write. The first failed write (e.g. a full
    disk) warns, later ones are logged; training goes on.
    """
    failures = []

    def write(state):
        finish(state)
        try:
            _io.save(estimator, path)
        except OSError as exc:  # e.g. a full disk: the fit itself is not at fault
            message = (
                f"Could not write the checkpoint {str(path)!r} at epoch {state.best_epoch} "
                f"({exc}); training goes on and the fitted model is returned as usual. "
                "Free space or pass another checkpoint path."
            )
            if not failures:  # one warning per fit; later failures are logged
                warnings.warn(message, UserWarning, stacklevel=2)
            else:
                logger.warning("%s", message)
            failures.append(exc)
        finally:
            estimator.module_.train()

    return write
