"""Default gene names and class labels to class indices: one rule each for the whole package.

The bottom layer of the package: it imports nothing from tgem (see docs/architecture.rst).
"""

from __future__ import annotations

import numpy as np


def default_gene_names(n_genes: int) -> np.ndarray:
    """The names tgem gives genes that have none: ``"gene_0"``, ``"gene_1"``, ...

    Used wherever a result is labelled by gene and neither ``genes`` nor the model's
    ``feature_names_in_`` gives names (rankings, attention maps, edges, networks).

    Parameters
    ----------
    n_genes : int
        How many names.

    Returns
    -------
    numpy.ndarray of object, shape (n_genes,)

    Examples
    --------
    >>> default_gene_names(3).tolist()
    ['gene_0', 'gene_1', 'gene_2']
    """
    return np.array([f"gene_{j}" for j in range(n_genes)], dtype=object)


def encode_labels(classes: np.ndarray, labels, what: str) -> np.ndarray:
    """Class indices (int64) of ``labels`` in the sorted ``classes`` (a fitted ``classes_``).

    Parameters
    ----------
    classes : numpy.ndarray
        The sorted class labels, as ``np.unique`` returns them.
    labels : array-like
        Labels to encode.
    what : str
        The argument's name, for the error message.

    Raises
    ------
    ValueError
        When a label is not one of ``classes``.

    Examples
    --------
    >>> import numpy as np
    >>> encode_labels(np.array(["B", "T"]), ["T", "B", "T"], "y").tolist()
    [1, 0, 1]
    """
    labels = np.asarray(labels)
    classes = np.asarray(classes)
    idx = np.searchsorted(classes, labels)
    idx = np.clip(idx, 0, len(classes) - 1)
    bad = classes[idx] != labels
    if np.any(bad):
        raise ValueError(
            f"{what} contains labels the model does not know: "
            f"{sorted(set(labels[bad].tolist()))[:5]}; the classes are "
            f"{classes.tolist()}. Pass labels from clf.classes_."
        )
    return idx.astype(np.int64)
