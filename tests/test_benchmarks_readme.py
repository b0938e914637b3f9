"""``benchmarks/README.md`` names only scripts and results files that exist.

The page cites a results file for every figure; a file removed or renamed in
``benchmarks/results/`` (or a script renamed) must not leave a dangling name behind. The
documentation also cites the page's sections by title ("The defaults study"), and
``docs/`` cites results files by path: those must resolve too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
README = BENCHMARKS / "README.md"

#: ``results/...`` or ``benchmarks/results/...``, possibly with a ``*`` glob.
RESULTS_NAME = re.compile(r"(?<![\w/.-])((?:benchmarks/)?results/[\w.*/-]*)")
#: A script or source file: ``bench_x.py``, ``gpu_run.sh``, ``../examples/y.py``, ``fma_probe.c``.
SCRIPT_NAME = re.compile(r"(?<![\w/.-])((?:\.\./)?[\w/-]*[\w-]\.(?:py|sh|c))\b")
#: A relative Markdown link target.
LINK_TARGET = re.compile(r"\]\((?!https?://|#)([^)\s]+)\)")
#: ``benchmarks/README.md``, "Section title" (backticks of Markdown or reST allowed).
SECTION_CITATION = re.compile(r"benchmarks/README\.md`{0,2},\s*\"([^\"]+)\"")


def _exists(name: str, bases: tuple[Path, ...]) -> bool:
    """Whether ``name`` (a path, or a glob when it holds ``*``) matches something in a base."""
    name = name.rstrip(".,;:")
    for base in bases:
        if "*" in name:
            if any(base.glob(name)):
                return True
        elif (base / name).exists():
            return True
    return False


def _base_of(name: str, here: Path) -> tuple[Path, ...]:
    return (ROOT,) if name.startswith("benchmarks/") else (here,)


def missing_results(text: str, here: Path = BENCHMARKS) -> list[str]:
    """The ``results/`` names in ``text`` that match no file or folder."""
    names = sorted(set(RESULTS_NAME.findall(text)))
    return [n for n in names if not _exists(n, _base_of(n, here))]


def missing_scripts(text: str) -> list[str]:
    """The script names in ``text`` found neither in ``benchmarks/`` nor from the root."""
    names = sorted(set(SCRIPT_NAME.findall(text)))
    return [n for n in names if not _exists(n, (BENCHMARKS, ROOT))]


def missing_links(text: str, here: Path = BENCHMARKS) -> list[str]:
    """The relative link targets in ``text`` that do not exist."""
    targets = sorted(set(LINK_TARGET.findall(text)))
    return [t for t in targets if not (here / t.split("#")[0]).exists()]


def headings(text: str) -> set[str]:
    return {line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")}


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


def test_every_results_file_the_page_names_exists(readme):
    assert RESULTS_NAME.findall(readme), "the page names no results file: the pattern is stale"
    assert missing_results(readme) == []


def test_every_script_the_page_names_exists(readme):
    assert missing_scripts(readme) == []


def test_every_relative_link_of_the_page_resolves(readme):
    assert missing_links(readme) == []


def test_every_benchmark_script_has_a_place_on_the_page(readme):
    scripts = sorted(
        p.name for p in BENCHMARKS.iterdir() if p.suffix in (".py", ".sh") and p.is_file()
    )
    assert scripts
    assert [s for s in scripts if f"`{s}`" not in readme] == []


def _cited_sections() -> list[tuple[str, str]]:
    cited = []
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    files += sorted((ROOT / "docs").rglob("*.rst")) + sorted((ROOT / "tgem").rglob("*.py"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        # A citation may wrap onto the next line of a docstring or paragraph.
        for title in SECTION_CITATION.findall(re.sub(r"\s+", " ", text)):
            cited.append((str(path.relative_to(ROOT)), title))
    return cited


def test_sections_cited_by_the_docs_and_the_code_exist(readme):
    cited = _cited_sections()
    assert cited, "nothing cites a section of benchmarks/README.md: the pattern is stale"
    titles = headings(readme)
    assert [(where, t) for where, t in cited if t not in titles] == []


def test_results_files_cited_by_the_docs_exist():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.rst"))]
    missing = {}
    for path in files:
        text = path.read_text(encoding="utf-8")
        names = [n for n in RESULTS_NAME.findall(text) if n.startswith("benchmarks/")]
        gone = [n for n in names if not _exists(n, (ROOT,))]
        if gone:
            missing[str(path.relative_to(ROOT))] = gone
    assert missing == {}


def test_the_checks_report_a_missing_file_and_script():
    text = (
        "[`results/accuracy.md`](results/accuracy.md), `results/no_such_run.json`, "
        "`results/accuracy.*`, `results/nothing_*.md`, `benchmarks/results/gone.json`; "
        "run `bench_accuracy.py` or `bench_gone.py`, see [x](no_such_page.md)."
    )
    assert missing_results(text) == [
        "benchmarks/results/gone.json",
        "results/no_such_run.json",
        "results/nothing_*.md",
    ]
    assert missing_scripts(text) == ["bench_gone.py"]
    assert missing_links(text) == ["no_such_page.md"]
