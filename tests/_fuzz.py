"""Run untrusted-input parsers in a forked worker, so that a crash is a result, not the end.

Fuzz tests feed many mutated files to a reader. A Python exception is the reader refusing the
input; a crash (the process killed by a signal: SIGSEGV, SIGABRT from glibc, ...) or a hang is
a defect, and it must fail the test that found it without killing the test run. :class:`ForkWorker`
keeps one forked child that runs ``func(data)`` for each input it is sent, and starts a new child
only after the previous one crashed or hung, so a fuzzer pays for one fork per crash rather than
one per input.

Usage::

    from tests._fuzz import ForkWorker

    with ForkWorker(lambda data: tgem.load(io.BytesIO(data)), timeout=20) as worker:
        for mutated in mutations:
            outcome = worker(mutated)  # "ok", "exception:ModelFileError", "crash:SIGSEGV", ...
            assert not outcome.startswith(("crash:", "timeout")), (outcome, mutated)

Unix only (``fork``). The function runs in the child, so what it returns or modifies never
reaches the parent; only the outcome string comes back.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
from collections.abc import Callable

__all__ = ["ForkWorker", "is_failure", "limit_memory", "run_in_fork"]


def _serve(func: Callable[[bytes], object], conn, setup) -> None:
    """The child's loop: run ``func`` on each input received and send back the outcome."""
    faulthandler.disable()  # pytest's tracebacks on SIGSEGV would only clutter the log
    try:
        import torch

        torch.set_num_threads(1)  # a child's OpenMP pool is rebuilt lazily; keep it small
    except ImportError:  # pragma: no cover - the helper does not need torch
        pass
    if setup is not None:
        setup()
    while True:
        try:
            data = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            func(data)
            outcome = "ok"
        except BaseException as exc:  # noqa: BLE001 - every exception is an outcome here
            outcome = f"exception:{type(exc).__name__}"
        conn.send(outcome)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal{number}"


def is_failure(outcome: str) -> bool:
    """Whether ``outcome`` is a crash or a hang (as opposed to ``ok`` or an exception)."""
    return outcome.startswith(("crash:", "timeout"))


class ForkWorker:
    """A forked child process that runs ``func(data)`` per call; restarted only after a crash.

    Parameters
    ----------
    func : callable
        Called in the child with the bytes given to each call. Whatever it raises is reported
        as ``"exception:<type name>"``; its return value is ignored.
    timeout : float, default=30.0
        Seconds one call may take; a child that takes longer is killed and the call reports
        ``"timeout"``.
    setup : callable, optional
        Called once in each new child before its first input, e.g. to bound its memory with
        :func:`limit_memory` so that a huge allocation is a ``MemoryError``, not an OOM kill.

    Notes
    -----
    Each call returns one of ``"ok"``, ``"exception:<type name>"``, ``"crash:<signal name>"``
    (the child died of a signal), ``"crash:exit<code>"`` (the child exited, e.g. through
    ``os._exit`` in a library) or ``"timeout"``.
    """

    def __init__(self, func: Callable[[bytes], object], timeout: float = 30.0, setup=None):
        self.func = func
        self.timeout = timeout
        self.setup = setup
        self._context = multiprocessing.get_context("fork")
        self._process = None
        self._conn = None
        self.starts = 0

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_serve, args=(self.func, child, self.setup), daemon=True
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent
        self.starts += 1

    def _stop(self) -> None:
        if self._process is None:
            return
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._conn.close()
        self._process = self._conn = None

    def __call__(self, data: bytes) -> str:
        if self._process is None:
            self._start()
        try:
            self._conn.send(data)
        except (BrokenPipeError, OSError):  # the child died between calls
            return self._crashed()
        if not self._conn.poll(self.timeout):
            self._stop()
            return "timeout"
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            return self._crashed()

    def _crashed(self) -> str:
        process = self._process
        process.join(self.timeout)
        code = process.exitcode
        self._stop()
        if code is None:
            return "timeout"
        return f"crash:{_signal_name(-code)}" if code < 0 else f"crash:exit{code}"

    def close(self) -> None:
        """Stop the child (if any)."""
        self._stop()

    def __enter__(self) -> ForkWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_in_fork(
    func: Callable[[bytes], object], data: bytes, timeout: float = 30.0, setup=None
) -> str:
    """Run ``func(data)`` once in a forked child; return its outcome (see :class:`ForkWorker`)."""
    with ForkWorker(func, timeout=timeout, setup=setup) as worker:
        return worker(data)


def limit_memory(extra: int = 1 << 30) -> None:
    """Allow this process at most ``extra`` more bytes of address space (Linux; else no-op).

    Meant as a :class:`ForkWorker` ``setup``: an allocation a crafted file asks for then
    fails with ``MemoryError`` instead of exhausting the machine.
    """
    try:
        import resource

        with open("/proc/self/statm") as fh:
            size = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        return
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))
