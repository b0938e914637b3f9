"""Sphinx configuration for the tgem documentation (builds offline: no intersphinx)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import tgem  # noqa: E402

project = "tgem"
author = "the tgem developers"
copyright = "the tgem developers; BSD-3-Clause"  # noqa: A001
release = version = tgem.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
]

autosummary_generate = True
autodoc_typehints = "none"  # numpydoc's Parameters sections already give the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
exclude_patterns = ["_build"]
templates_path = ["_templates"]
html_theme = "alabaster"
html_static_path = []
html_theme_options = {
    "description": "T-GEM as an interpretable scikit-learn estimator",
    "fixed_sidebar": True,
}
# MathJax is loaded by the reader's browser; the build itself needs no network.
nitpicky = False

# --- the API reference lists what the package exports -------------------------------------
# Each public module's __all__ becomes an autosummary table, so a name exported in code is
# documented without editing this folder. Modules that do not exist yet (written by other
# issues) are left out; a name listed in __all__ that fails to import is a build error.
API_MODULES = [
    ("tgem", "Estimator, model files, gene selection and alignment"),
    ("tgem.datasets", "Bundled data and readers"),
    ("tgem.interpret", "Gene attributions and the ablation study"),
    ("tgem.attention", "Attention entropy, maps and gene networks"),
    ("tgem.plotting", 'Figures (optional extra: pip install "tgem[plot]")'),
    ("tgem.dask", 'Inference and attributions on Dask (extra: pip install "tgem[dask]")'),
]


def _available(module_name: str, name: str, module) -> bool:
    where = getattr(module, "_WHERE", {}).get(name)  # tgem.plotting's lazy names
    return where is None or importlib.util.find_spec(where) is not None


def _write_api_page() -> None:
    lines = [
        "API reference",
        "=============",
        "",
        "Generated from the docstrings: each public module's ``__all__``.",
        "",
    ]
    for module_name, title in API_MODULES:
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        names = [n for n in getattr(module, "__all__", []) if not n.startswith("__")]
        names = [n for n in names if _available(module_name, n, module)]
        if not names:
            continue
        lines += [
            f"``{module_name}``: {title}",
            "-" * (len(module_name) + len(title) + 6),
            "",
            f".. currentmodule:: {module_name}",
            "",
            ".. autosummary::",
            "   :toctree: .",
            "",
            *[f"   {n}" for n in sorted(names)],
            "",
        ]
    out = HERE / "generated" / "api.rst"
    out.parent.mkdir(exist_ok=True)
    text = "\n".join(lines)
    if not out.exists() or out.read_text() != text:
        out.write_text(text)


_write_api_page()


# --- pages written by other issues join the table of contents when they exist ------------
# index.rst holds the line "   OTHER_PAGES" in its user-guide toctree; it is replaced by every
# page of this folder (top level or user_guide/) that index.rst does not list itself, e.g.
# scaling.rst or model_files.rst, so that a page added by another issue is never orphaned.
MARKER = "   OTHER_PAGES\n"


def _other_pages(index_source: str) -> list[str]:
    listed = {line.strip() for line in index_source.splitlines()}
    pages = [
        p.relative_to(HERE).with_suffix("").as_posix()
        for pattern in ("*.rst", "user_guide/*.rst")
        for p in sorted(HERE.glob(pattern))
    ]
    return [p for p in pages if p != "index" and p not in listed]


def _add_other_pages(app, docname, source):
    if docname == "index":
        pages = _other_pages(source[0])
        source[0] = source[0].replace(MARKER, "".join(f"   {p}\n" for p in pages))


def setup(app):
    app.connect("source-read", _add_other_pages)
