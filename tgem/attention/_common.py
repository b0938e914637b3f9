"""Helpers shared by the attention analyses: the fitted network, layer, gene and class lookups."""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import check_is_fitted

#: names of the axes of each result, for the position of a non-finite value in an error
ENTROPY_AXES = ("sample", "layer", "head", "gene")
MAP_AXES = ("sample", "query gene", "key gene")
OUTPUT_AXES = ("layer", "sample", "gene")
PAIR_AXES = ("layer", "query gene", "key gene")


def _prepare(clf, X):
    check_is_fitted(clf, "module_")
    X = clf._validate_X(X, reset=False)
    module = clf.module_
    return X, module, clf._device_for_predict()


def _n_heads(module) -> int:
    return int(module.layers[0].WQ.shape[0])


def _layer_index(layer: int, n_layers: int) -> int:
    if not isinstance(layer, (int, np.integer)) or not -n_layers <= layer < n_layers:
        raise ValueError(
            f"layer={layer!r}, but the model has {n_layers} layers; pass an int in [0, {n_layers})."
        )
    return int(layer) % n_layers


def _gene_indices(genes, names: np.ndarray) -> np.ndarray:
    """Column indices for ``genes`` given as names or integer positions."""
    arr = np.asarray(genes)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("genes must be a non-empty 1-d list of gene names or positions.")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < -len(names) or arr.max() >= len(names):
            raise ValueError(f"gene positions must lie in [0, {len(names)}), got {arr.tolist()}.")
        return arr % len(names)
    lookup = {name: i for i, name in enumerate(names)}
    missing = [g for g in arr.tolist() if g not in lookup]
    if missing:
        raise ValueError(
            f"genes not in the model: {missing[:10]}; pass names from "
            "feature_names_in_ (or the genes argument) or integer positions."
        )
    return np.array([lookup[g] for g in arr.tolist()])


def _class_index(clf, target) -> int:
    matches = np.flatnonzero(np.asarray(clf.classes_) == target)
    if matches.size != 1:
        raise ValueError(
            f"target={target!r} is not one of the classes "
            f"{np.asarray(clf.classes_).tolist()}; pass a label from classes_."
        )
    return int(matches[0])
