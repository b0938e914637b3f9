"""Figures for fitted tgem models (needs the optional ``plot`` extra: ``pip install tgem[plot]``).

Each function takes the result of a tgem analysis (or a fitted classifier) and returns the
matplotlib ``Axes`` (or ``Figure``) it drew on. matplotlib is imported only when a function is
called, so ``import tgem`` never needs it.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "plot_history": "tgem.plotting._training",
    "plot_ablation": "tgem.plotting._interpret",
    "plot_gene_ranking": "tgem.plotting._interpret",
    "plot_entropy": "tgem.plotting._attention",
    "plot_attention_map": "tgem.plotting._attention",
    "plot_network": "tgem.plotting._attention",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'tgem.plotting' has no attribute {name!r}")


def __dir__():
    return __all__
