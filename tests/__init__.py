"""tgem's test suite, a package so that its shared helpers (``tests._oracle``) import the same
way however pytest is started (``pytest`` or ``python -m pytest``, from the repository root or
from ``tests/``, in any ``--import-mode``; ``pyproject.toml`` also puts the root on the path)."""
