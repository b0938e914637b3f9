"""The README's two opening commands keep the shape ``.ci/run`` reads them in."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def extract():
    spec = importlib.util.spec_from_file_location(
        "readme_commands", ROOT / ".ci" / "readme_commands.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_commands


def test_readme_opening_commands_are_found(extract):
    main_job, tests = extract((ROOT / "README.md").read_text(encoding="utf-8"))
    assert main_job.endswith("tgem demo")
    assert tests.split("&&")[-1].strip().split()[0] in ("pytest", "python")
    for command in (main_job, tests):
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
        assert "pip install" in command and "\n" not in command


def test_ci_runs_the_extracted_commands():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert '.ci/readme_commands.py" "$1"' in ci
    assert ci.count("readme_command 1\n") == 1 and ci.count("readme_command 2\n") == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no blocks at all\n", "0 ```console block"),
        ("```console\nA\n```\n", "1 ```console block"),
        (
            "```console\npython3 -m venv .venv && . .venv/bin/activate && tgem demo\nsecond line\n"
            "```\n```console\nx\n```\n",
            "spans 2 lines",
        ),
        (
            "```console\npip install -e . && tgem demo\n```\n```console\nx\n```\n",
            "does not start with",
        ),
        (
            "```console\npython3 -m venv .venv && . .venv/bin/activate && tgem train\n```\n"
            "```console\nx\n```\n",
            "does not end with 'tgem demo'",
        ),
        (
            "```console\npython3 -m venv .venv && . .venv/bin/activate && tgem demo\n```\n"
            "```console\npython3 -m venv .venv && . .venv/bin/activate && make test\n```\n",
            "does not end with a pytest run",
        ),
    ],
)
def test_a_readme_of_another_shape_is_refused(extract, text, message):
    with pytest.raises(ValueError, match=message):
        extract(text)
