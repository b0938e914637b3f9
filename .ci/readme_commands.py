"""Print one of the README's two opening commands exactly as written.

``.ci/run`` runs them verbatim, each in a fresh clone, so the README and CI cannot drift apart;
``tests/test_readme.py`` checks that the README still has the shape this reads.

The README must open with two fenced ``console`` blocks of one line each: the first runs the
main job (its last step is ``tgem demo``), the second runs the tests (its last step starts with
``pytest`` or ``python -m pytest``). Both set up their own virtual environment.

Usage: ``python3 .ci/readme_commands.py N [README]`` with N 1 (main job) or 2 (tests).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

BLOCK = re.compile(r"^```console[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
VENV = "python3 -m venv .venv && . .venv/bin/activate && "
LAST_STEP = (re.compile(r"(^|&& )tgem demo$"), re.compile(r"(^|&& )(python -m )?pytest( .*)?$"))


def readme_commands(text: str) -> list[str]:
    """The README's first two ``console`` blocks, checked to be the two opening commands.

    Raises ``ValueError`` naming what is missing when the README no longer has that shape.
    """
    blocks = BLOCK.findall(text)
    if len(blocks) < 2:
        raise ValueError(
            f"README.md has {len(blocks)} ```console block(s); CI needs two at its "
            "top: the main job, then the tests."
        )
    commands = []
    for n, (block, last) in enumerate(zip(blocks[:2], LAST_STEP, strict=True), start=1):
        lines = [line for line in block.splitlines() if line.strip()]
        if len(lines) != 1:
            raise ValueError(
                f"README command {n} spans {len(lines)} lines; CI runs it as one "
                "line. Keep it on one line joined with '&&'."
            )
        command = lines[0].strip()
        if not command.startswith(VENV):
            raise ValueError(
                f"README command {n} does not start with {VENV!r} (a fresh virtual "
                f"environment); got {command!r}."
            )
        if not last.search(command):
            what = "'tgem demo'" if n == 1 else "a pytest run"
            raise ValueError(f"README command {n} does not end with {what}; got {command!r}.")
        commands.append(command)
    return commands


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[1] not in ("1", "2"):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    readme = Path(argv[2]) if len(argv) == 3 else Path(__file__).resolve().parents[1] / "README.md"
    try:
        print(readme_commands(readme.read_text(encoding="utf-8"))[int(argv[1]) - 1])
    except ValueError as exc:
        print(f"readme_commands: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
