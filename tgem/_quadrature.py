"""The fixed quadrature rules of tgem's path integrals: one definition for the whole package.

Integrated Gradients (:func:`tgem.interpret.attribute`) and attention attribution
(:func:`tgem.attention.attention_attribution`) both integrate a gradient along a straight
path ``alpha`` in ``[0, 1]``; both take their nodes and weights from :func:`fixed_rule`. The
adaptive rule of Integrated Gradients (Gauss-Legendre panels, bisected) builds on the same
Gauss-Legendre nodes in :mod:`tgem.interpret._ig`.

The bottom layer of the package: it imports nothing from tgem (see docs/architecture.rst).
"""

from __future__ import annotations

import numpy as np

#: captum's Riemann sums.
RIEMANN = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
#: The fixed rules, named as captum's ``method`` argument (``"gausslegendre"`` is its default).
FIXED_RULES = ("gausslegendre",) + RIEMANN


def fixed_rule(
    name: str, n_steps: int, *, argument: str = "method"
) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas, weights)`` of captum's fixed quadrature rule ``name`` with ``n_steps`` nodes.

    The nodes and weights of ``captum.attr._utils.approximation_methods`` (in float64):
    Gauss-Legendre nodes mapped to ``[0, 1]``; the Riemann sums' weights ``1 / n_steps``
    (the trapezoid's end points halved, so they sum to ``(n - 1) / n`` as in captum).

    Parameters
    ----------
    name : {"gausslegendre", "riemann_left", "riemann_right", "riemann_middle", \
"riemann_trapezoid"}
        The rule.
    n_steps : int
        Number of nodes (at least 1; at least 2 for the trapezoid).
    argument : str, default="method"
        The caller's name for ``name``, for the error message.

    Returns
    -------
    alphas, weights : ndarray of float64, shape (n_steps,)

    Examples
    --------
    >>> alphas, weights = fixed_rule("riemann_trapezoid", 3)
    >>> alphas.tolist(), weights.tolist()
    ([0.0, 0.5, 1.0], [0.16666666666666666, 0.3333333333333333, 0.16666666666666666])
    >>> alphas, weights = fixed_rule("gausslegendre", 5)
    >>> round(float(weights.sum()), 12), bool((alphas > 0).all() and (alphas < 1).all())
    (1.0, True)
    """
    if name not in FIXED_RULES:
        raise ValueError(f"{argument}={name!r} is not one of {FIXED_RULES}.")
    n = int(n_steps)
    if n < 1 or (name == "riemann_trapezoid" and n < 2):
        raise ValueError(
            f"n_steps={n_steps} is too small for {argument}={name!r}; use n_steps >= 2."
        )
    if name == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return 0.5 * (1.0 + x), 0.5 * w
    w = np.full(n, 1.0 / n)
    if name == "riemann_trapezoid":
        w[0] /= 2
        w[-1] /= 2
        return np.linspace(0.0, 1.0, n), w
    if name == "riemann_left":
        return np.linspace(0.0, 1.0 - 1.0 / n, n), w
    if name == "riemann_right":
        return np.linspace(1.0 / n, 1.0, n), w
    return np.linspace(1.0 / (2 * n), 1.0 - 1.0 / (2 * n), n), w
