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


def model_gene_names(model, genes=None) -> np.ndarray:
    """Names of a fitted model's genes: ``genes``, else ``feature_names_in_``, else the default.

    Parameters
    ----------
    model : fitted estimator
        Has ``n_features_in_`` and, when fitted on a DataFrame, ``feature_names_in_``.
    genes : sequence of str, optional
        Names given by the caller; checked to be one per gene.

    Returns
    -------
    numpy.ndarray of object, shape (n_features_in_,)

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> model_gene_names(SimpleNamespace(n_features_in_=2)).tolist()
    ['gene_0', 'gene_1']
    >>> model_gene_names(SimpleNamespace(n_features_in_=2), ["CD3E", "LYZ"]).tolist()
    ['CD3E', 'LYZ']
    """
    n = model.n_features_in_
    if genes is not None:
        names = np.asarray(genes, dtype=object)
        if names.shape != (n,):
            raise ValueError(
                f"genes has {names.size} names, but the model has {n} genes; pass one name per "
                "column of X, in order."
            )
        return names
    if hasattr(model, "feature_names_in_"):
        return np.asarray(model.feature_names_in_, dtype=object)
    return default_gene_names(n)


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
