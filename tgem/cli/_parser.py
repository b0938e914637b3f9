"""The ``tgem`` argument parser: one sub-command per task, each with its handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from tgem._classifier import TGEMClassifier
from tgem._version import __version__
from tgem.cli._arguments import (
    ATTR_METHODS,
    _add_data_arguments,
    _add_model_arguments,
    _attr_method,
    _fraction,
)
from tgem.cli._demo import DEMO_EPOCHS, _cmd_demo
from tgem.cli._explain import _cmd_attention, _cmd_explain
from tgem.cli._predict import _cmd_annotate, _cmd_predict
from tgem.cli._train import _cmd_train

EPILOG = """\
exit codes: 0 success; 1 unexpected failure (rerun with --debug for the traceback);
2 bad command line or input (missing file, unreadable table, unknown label column);
3 the data's genes do not match the model's; 4 the model file was refused.
DATA is a .csv/.tsv/.txt table (optionally .gz), an AnnData .h5ad file, a .npz file with
arrays X, features and the label array, or 'pbmc68k' for the data bundled with tgem."""


def _estimator_defaults() -> dict:
    return TGEMClassifier().get_params()


def build_parser() -> argparse.ArgumentParser:
    """The ``tgem`` argument parser (one sub-command per task).

    Returns
    -------
    parser : argparse.ArgumentParser
        The parser; each sub-command sets ``handler``, the function :func:`main` runs.

    Examples
    --------
    The original T-GEM flag names are aliases of tgem's own:

    >>> from tgem.cli import build_parser
    >>> args = build_parser().parse_args(
    ...     ["train", "cells.csv", "--label", "cell_type", "--head_num", "2", "--epoch", "5"]
    ... )
    >>> args.command, args.label, args.n_heads, args.max_epochs
    ('train', 'cell_type', 2, 5)
    """
    defaults = _estimator_defaults()
    parser = argparse.ArgumentParser(
        prog="tgem",
        description="T-GEM: an interpretable transformer for gene-expression "
        "classification, as a command.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tgem {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more messages (-vv: training progress bars)",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, help_text):
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add(
        "demo",
        "train the default model on the bundled PBMC data (700 cells, 765 genes, "
        "10 cell types) with a held-out split, print its scores and write the "
        "model and figures",
    )
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("tgem_demo_output"),
        help="output folder (default: %(default)s)",
    )
    p.add_argument(
        "--test-size",
        type=_fraction,
        default=0.2,
        help="held-out share, stratified (default: %(default)s)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a 2-epoch smoke run (for tests; the scores mean nothing)",
    )
    p.add_argument(
        "--top",
        type=int,
        default=10,
        help="genes per cell type in the top-genes figure (default: %(default)s)",
    )
    _add_model_arguments(p, {**defaults, "max_epochs": DEMO_EPOCHS})
    p.set_defaults(handler=_cmd_demo)

    p = add("train", "train a model on a labelled data file and write it with its metrics")
    _add_data_arguments(p, label_required=True)
    p.add_argument(
        "--gene-sets",
        type=Path,
        metavar="GMT",
        help="keep only the genes of these gene sets (a .gmt file), as the "
        "original did with its 24 pathways",
    )
    p.add_argument(
        "--test-size",
        type=_fraction,
        default=0.2,
        help="held-out share for the reported metrics, stratified; 0 trains on "
        "everything and reports training metrics (default: %(default)s)",
    )
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("tgem_output"),
        help="output folder for model.tgem, metrics.json, history.csv and the "
        "loss curves (default: %(default)s)",
    )
    _add_model_arguments(p, defaults)
    p.set_defaults(handler=_cmd_train)

    p = add("predict", "predict the labels of a data file with a saved model")
    p.add_argument("model", type=Path, metavar="MODEL", help="a model file written by tgem")
    _add_data_arguments(p, label_required=False)
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        default=None,
        help="CSV file for the predictions and class probabilities (default: "
        "print the predictions)",
    )
    p.add_argument(
        "--fill-missing",
        type=float,
        default=None,
        metavar="VALUE",
        help="give the model's genes missing from DATA this value (e.g. 0) "
        "instead of stopping; this changes predictions",
    )
    p.set_defaults(handler=_cmd_predict)

    p = add(
        "annotate",
        "annotate the cells of an .h5ad file with a saved model: labels, confidence, "
        "unassigned cells and class probabilities written to a new .h5ad file",
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="a model file written by tgem")
    p.add_argument("data", type=Path, metavar="DATA", help="an .h5ad file of cells")
    p.add_argument("--output", "-o", type=Path, required=True, help="the .h5ad file to write")
    p.add_argument("--layer", default=None, help="the layer to read (default: X)")
    p.add_argument(
        "--rule",
        choices=("auto", "max_proba", "energy", "neighbors", "combined", "none"),
        default="auto",
        help="rejection rule for unassigned cells (default: %(default)s: for a model trained "
        "with --calibration temperature and no --threshold, combined from 100 held-out cells "
        "and neighbors below; else max_proba)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="cells scoring below it are unassigned (max_proba: in [0, 1]); default: the "
        "threshold the model fitted on its held-out cells (calibration='temperature'), else "
        "0.5 for max_proba, while energy then requires one",
    )
    p.add_argument(
        "--majority-voting",
        default=None,
        metavar="COLUMN",
        help="an obs clustering column: add each cluster's majority label",
    )
    p.add_argument(
        "--fill-missing",
        type=float,
        default=None,
        metavar="VALUE",
        help="give the model's genes missing from DATA this value (default: the training "
        "mean for standardize=True models, else stop)",
    )
    p.set_defaults(handler=_cmd_annotate)

    p = add("explain", "rank genes per class by attribution and run the ablation study")
    p.add_argument("model", type=Path, metavar="MODEL", help="a model file written by tgem")
    _add_data_arguments(p, label_required=True)
    p.add_argument(
        "--method",
        "--attr_method",
        type=_attr_method,
        default="integrated_gradients",
        help="attribution method: "
        + ", ".join(f"{v} ({k})" for k, v in ATTR_METHODS.items())
        + " (--attr_method; default: %(default)s)",
    )
    p.add_argument(
        "--abs",
        dest="absolute",
        action="store_true",
        help="rank by absolute attributions instead of signed ones (--abs)",
    )
    p.add_argument(
        "--n-steps", type=int, default=50, help="integration steps (default: %(default)s)"
    )
    p.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="attribute at most this many samples, stratified (default: all)",
    )
    p.add_argument(
        "--no-ablation", dest="ablation", action="store_false", help="skip the ablation study"
    )
    p.add_argument(
        "--top",
        type=int,
        default=20,
        help="genes per class shown and plotted (default: %(default)s)",
    )
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("tgem_explain_output"),
        help="output folder (default: %(default)s)",
    )
    p.add_argument(
        "--fill-missing",
        type=float,
        default=None,
        metavar="VALUE",
        help="fill the model's genes missing from DATA with this value",
    )
    p.add_argument(
        "--random-state",
        "--seed",
        type=int,
        default=0,
        help="seed for subsampling and the random-gene control (default: 0)",
    )
    p.set_defaults(handler=_cmd_explain)

    p = add("attention", "attention entropy per layer and head, and the gene network of a class")
    p.add_argument("model", type=Path, metavar="MODEL", help="a model file written by tgem")
    _add_data_arguments(p, label_required=False)
    p.add_argument(
        "--class",
        dest="target_class",
        default=None,
        metavar="NAME",
        help="class whose attention network to extract (needs --label)",
    )
    p.add_argument(
        "--top-fraction",
        type=float,
        default=0.001,
        help="share of gene pairs kept as network edges (default: %(default)s)",
    )
    p.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="use at most this many samples of the class (default: all)",
    )
    p.add_argument("--top", type=int, default=20, help="hub genes printed (default: %(default)s)")
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("tgem_attention_output"),
        help="output folder (default: %(default)s)",
    )
    p.add_argument(
        "--fill-missing",
        type=float,
        default=None,
        metavar="VALUE",
        help="fill the model's genes missing from DATA with this value",
    )
    p.set_defaults(handler=_cmd_attention)
    return parser
