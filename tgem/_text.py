"""Text helpers for error messages (imports nothing from tgem)."""


def shown(names, limit: int = 10) -> str:
    """The first ``limit`` names joined by commas, and how many more there are.

    Examples
    --------
    >>> shown(["a", "b", "c"], limit=2)
    'a, b, ... (1 more)'
    """
    names = [str(n) for n in names]
    return ", ".join(names[:limit]) + (
        f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    )
