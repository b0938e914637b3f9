"""Compatibility shim: the attention moved to the package :mod:`tgem._kernels` (issue 23).

This module used to hold the reference formulation, the exact path, the backend registry and
the row statistics; they now live in ``tgem._kernels._reference``, ``_exact``, ``_registry``
and ``_rows``. Every name it had (private ones included) is bound here to the same object
(``_BACKENDS`` is the registry's own dict), so old imports and pickles keep working. New code
imports :mod:`tgem._kernels`.
"""

from tgem._kernels import _exact, _reference, _registry, _rows

globals().update(
    {
        name: value
        for module in (_registry, _reference, _exact, _rows)
        for name, value in vars(module).items()
        if not name.startswith("__")
    }
)
