"""The one lazy import of matplotlib for all of tgem's figures."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot``, imported on first use; an ImportError naming the extra if missing."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            'plotting needs matplotlib; install it with `pip install "tgem[plot]"`.'
        ) from exc
    return plt
