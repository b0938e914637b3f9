"""The T-GEM attention kernels: a registry, the plain reference, and the fast backends.

Every backend computes, for tensors ``q, k, v`` of shape ``(batch, heads, genes)``, the T-GEM
attention ``out_i = sum_{j != i} softmax_j(q_i k_j) v_j`` (the gene's own weight zeroed after
the softmax); :mod:`tgem._kernels._reference` is the plain formulation they are tested
against. The modules, from the bottom:

========================  ==============================================================
``_registry``             :class:`Backend`, :func:`register_backend`, :func:`resolve_backend`,
                          :func:`backend_status`: the seam; names no implementation.
``_reference``            the plain formulation (backend ``"reference"``), ``row_max``.
``_exact``                the exact O(genes) algorithm in eager PyTorch (``"exact"``) and the
                          helpers every implementation of it shares.
``_rows``                 blocked row statistics (entropy, map rows) for the analysis.
``_native``               the C kernel through ctypes (``"native"``; extension
                          ``tgem._tgem_kernels``).
``_compiled``             the exact algorithm through ``torch.compile`` (``"compiled"``).
``_triton``               the Triton GPU kernel (``"triton"``).
``_tree``                 the tree code for very many genes, pure PyTorch (``"tree"``).
``_tree_native``          the same tree code with its sums in C (``"tree_native"``; the
                          extension's ``tree.c``).
========================  ==============================================================

Each backend module registers itself when it is imported. This package imports
``_reference`` and ``_exact`` at once (they always work), and the optional backends of
:data:`OPTIONAL_BACKENDS` on the first question to the registry: importing tgem stays cheap
(``torch.compile`` alone takes over a second to import), and a backend module that fails to
import (no compiler, no Triton, a broken build) is reported by :func:`backend_status` instead
of breaking tgem. A new backend is one module here plus its name in that tuple.
"""

from __future__ import annotations

import importlib

from tgem._kernels import _exact, _reference  # noqa: F401 - they register "exact", "reference"
from tgem._kernels._exact import LOG2E, exact_attention
from tgem._kernels._reference import reference_attention, reference_softmax, row_max
from tgem._kernels._registry import (
    TOL_RANGE,
    Backend,
    backend_details,
    backend_names,
    backend_status,
    check_tolerance,
    import_failed,
    register_backend,
    resolve_backend,
    score_reach,
    set_loader,
)
from tgem._kernels._rows import attention_entropy_rows, attention_rows

#: The optional backend modules, imported (and so registered) on the registry's first use.
OPTIONAL_BACKENDS = (
    "tgem._kernels._native",
    "tgem._kernels._compiled",
    "tgem._kernels._triton",
    "tgem._kernels._tree",
    "tgem._kernels._tree_native",
)


def _import_optional_backends() -> None:
    for module in OPTIONAL_BACKENDS:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken optional backend never breaks tgem
            import_failed(module, exc)


set_loader(_import_optional_backends)

__all__ = [
    "Backend",
    "LOG2E",
    "OPTIONAL_BACKENDS",
    "TOL_RANGE",
    "attention_entropy_rows",
    "attention_rows",
    "backend_details",
    "backend_names",
    "backend_status",
    "check_tolerance",
    "exact_attention",
    "reference_attention",
    "reference_softmax",
    "register_backend",
    "resolve_backend",
    "row_max",
    "score_reach",
]
