"""Run a test module's worker under Triton's interpreter (``TRITON_INTERPRET=1``) on the CPU.

The interpreter must be chosen before triton is first imported, so the kernels run in a fresh
subprocess: ``python FILE FLAG``, whose last line of output is the JSON the test checks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def triton_missing() -> str | None:
    """Why triton cannot be imported here, or None when it can."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def require_triton() -> None:
    """Skip without triton, or fail instead under ``TGEM_REQUIRE_TRITON=1`` (set by CI)."""
    reason = triton_missing()
    if reason is not None:
        if os.environ.get("TGEM_REQUIRE_TRITON") == "1":
            pytest.fail(f"TGEM_REQUIRE_TRITON=1 but triton is not importable: {reason}")
        pytest.skip(f"triton is not importable: {reason}")


def run_interpreted(script: str, flag: str, timeout: int = 600):
    """The JSON printed last by ``python script flag`` under the interpreter; fails the test
    with the worker's stderr when it exits non-zero."""
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, script, flag],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
