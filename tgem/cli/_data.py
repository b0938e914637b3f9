"""Reading the commands' inputs: DATA (tables, .h5ad, .npz, the bundled data) and MODEL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tgem._alignment import align_genes
from tgem._io import load
from tgem.cli._common import BUNDLED, EXIT_GENES, EXIT_MODEL, CLIError, logger
from tgem.datasets import load_pbmc68k, read_expression_table, read_h5ad
from tgem.exceptions import ModelFileError


def _load_data(args, *, need_label: bool):
    """Read DATA into (X DataFrame of float32, y array or None)."""
    label = args.label
    if args.data == BUNDLED:
        X, y = load_pbmc68k(return_X_y=True, as_frame=True)
        if label not in (None, "cell_type"):
            raise CLIError(
                f"the bundled data's label column is 'cell_type', got {label!r}; "
                "pass --label cell_type."
            )
        return X, (y.to_numpy() if (label or need_label) else None)
    path = Path(args.data)
    if not path.exists():
        raise CLIError(
            f"data file {str(path)!r} does not exist; check the path (or use "
            f"'{BUNDLED}' for the bundled data)."
        )
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        bunch = read_h5ad(path, label, layer=args.layer)
        data = bunch.data.toarray() if hasattr(bunch.data, "toarray") else bunch.data
        X = pd.DataFrame(
            np.asarray(data, dtype=np.float32),
            index=bunch.sample_names,
            columns=bunch.feature_names,
        )
        return X, bunch.target
    if suffix == ".npz":
        return _load_npz(path, label)
    bunch = read_expression_table(path, label, genes_as=args.genes_as, sep=args.sep)
    y = None if bunch.target is None else bunch.target.to_numpy()
    return bunch.data.astype(np.float32), y


def _load_npz(path: Path, label: str | None):
    with np.load(path, allow_pickle=False) as npz:
        keys = list(npz.files)
        if "X" not in keys or "features" not in keys:
            raise CLIError(
                f"{str(path)!r} needs arrays 'X' and 'features' (gene names); it has {keys}."
            )
        X = pd.DataFrame(
            np.asarray(npz["X"], dtype=np.float32),
            columns=npz["features"].astype(str),
            index=npz["samples"].astype(str) if "samples" in keys else None,
        )
        y = None
        if label is not None:
            if label not in keys:
                labels = [k for k in keys if k not in ("X", "features", "samples")]
                raise CLIError(
                    f"label column {label!r} is not in {str(path)!r}; available "
                    f"label arrays: {labels}. Pass one of them with --label."
                )
            y = npz[label]
    return X, y


def _align_to_model(model, X: pd.DataFrame, fill_value):
    genes = getattr(model, "feature_names_in_", None)
    if genes is None:
        if X.shape[1] != model.n_features_in_:
            raise CLIError(
                f"the data has {X.shape[1]} genes but the model was fitted on "
                f"{model.n_features_in_} unnamed columns.",
                EXIT_GENES,
            )
        return X.to_numpy()
    try:
        X_aligned, report = align_genes(X, genes, fill_value=fill_value)
    except ValueError as exc:
        raise CLIError(f"{exc} (with the command: pass --fill-missing VALUE)", EXIT_GENES) from exc
    if report.missing:
        logger.warning("genes aligned to the model: %s.", report)
    elif not report.is_exact:
        logger.info("genes aligned to the model: %s.", report)
    return X_aligned


def _load_model(path: Path):
    if not path.exists():
        raise CLIError(
            f"model file {str(path)!r} does not exist; train one with "
            "`tgem train` (it writes model.tgem)."
        )
    try:
        return load(path)
    except ModelFileError as exc:
        raise CLIError(f"model file {str(path)!r} was refused: {exc}", EXIT_MODEL) from exc


def _check_labels(y, label: str, samples) -> None:
    """Refuse missing (empty, NaN) labels before any split or training, naming them."""
    values = pd.Series(np.asarray(y, dtype=object))
    missing = (values.isna() | values.astype(str).str.strip().eq("")).to_numpy()
    if missing.all():
        raise CLIError(
            f"the label column {label!r} is empty: all {len(values)} labels are missing. "
            "Pass the column that holds the classes with --label."
        )
    if missing.any():
        names = [str(s) for s in np.asarray(samples)[missing][:5]]
        raise CLIError(
            f"{int(missing.sum())} of {len(values)} samples have no label in column {label!r} "
            f"(e.g. {names}); fill their labels or remove those samples from the data."
        )
