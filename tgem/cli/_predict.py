"""``tgem predict`` and ``tgem annotate``: apply a saved model to new data."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tgem._annotate import _import_anndata, annotate
from tgem._reporting import classification_metrics, format_metrics
from tgem.cli import _data
from tgem.cli._common import EXIT_OK, CLIError
from tgem.cli._output import _prepare_output


def _cmd_predict(args) -> int:
    if args.output is not None:
        _prepare_output(args.output.parent)
    model = _data._load_model(args.model)
    X, y = _data._load_data(args, need_label=False)
    X_model = _data._align_to_model(model, X, args.fill_missing)
    proba = model.predict_proba(X_model)
    predicted = model.classes_[np.argmax(proba, axis=1)]
    table = pd.DataFrame(proba, index=X.index, columns=[f"proba_{c}" for c in model.classes_])
    table.insert(0, "predicted", predicted)
    if args.output is not None:
        table.to_csv(args.output, index_label="sample")
        print(f"wrote {len(table)} predictions to {args.output}")
    else:
        print(table[["predicted"]].to_csv(index_label="sample"), end="")
    if y is not None:
        print(format_metrics(classification_metrics(y, proba, model.classes_), "labelled data"))
    return EXIT_OK


def _cmd_annotate(args) -> int:
    anndata = _import_anndata()
    if not args.data.is_file():
        raise CLIError(f"data file {str(args.data)!r} does not exist.")
    _prepare_output(args.output.parent)
    model = _data._load_model(args.model)
    try:
        adata = anndata.read_h5ad(args.data)
    except OSError as exc:  # not an HDF5 file, or a damaged one
        raise CLIError(
            f"data file {str(args.data)!r} could not be read as an .h5ad file ({exc}); pass "
            "an AnnData file written by anndata or scanpy."
        ) from exc
    annotate(
        adata,
        model,
        layer=args.layer,
        reject=None if args.rule == "none" else args.rule,
        threshold=args.threshold,
        fill_value=args.fill_missing,
        majority_voting=args.majority_voting,
    )
    adata.write_h5ad(args.output)
    labels = adata.obs["tgem_label"]
    n_unassigned = int((labels == adata.uns["tgem"]["rejection"]["unassigned"]).sum())
    print(f"annotated {adata.n_obs} cells ({n_unassigned} unassigned); wrote {args.output}")
    return EXIT_OK
