"""Argument types and the argument groups that several commands share."""

from __future__ import annotations

import argparse

# The original scripts' attribution method names -> tgem's (the library's one table).
from tgem.interpret import ALIASES as ATTR_METHODS


def _activation(value: str):
    value = value.strip().lower()
    if value in ("nan", "none", "null", ""):
        return None
    if value not in ("relu", "leakyrelu", "gelu"):
        raise argparse.ArgumentTypeError(
            f"unknown activation {value!r}; choose relu, leakyrelu, gelu, or nan for none"
        )
    return value


def _attr_method(value: str) -> str:
    method = ATTR_METHODS.get(value, value)
    if method not in ATTR_METHODS.values():
        names = ", ".join(f"{k} ({v})" for k, v in ATTR_METHODS.items())
        raise argparse.ArgumentTypeError(f"unknown attribution method {value!r}; choose {names}")
    return method


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return number


def _open_fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0.0 < number < 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"must be a share strictly between 0 and 1, got {value!r}; pass e.g. 0.1"
        )
    return number


def _calibration(value: str):
    value = value.strip().lower()
    if value in ("none", "nan", "null", ""):
        return None
    if value != "temperature":
        raise argparse.ArgumentTypeError(
            f"unknown calibration {value!r}; choose temperature, or none for no calibration"
        )
    return value


def _add_data_arguments(p: argparse.ArgumentParser, *, label_required: bool) -> None:
    p.add_argument(
        "data",
        metavar="DATA",
        help="expression data: .csv/.tsv/.txt(.gz) table, .h5ad, .npz or 'pbmc68k'",
    )
    p.add_argument(
        "--label",
        "--label-column",
        dest="label",
        required=label_required,
        metavar="COLUMN",
        help="the label column (table column, row with --genes-as rows, AnnData "
        "obs column, or .npz array; 'cell_type' for pbmc68k)",
    )
    p.add_argument(
        "--genes-as",
        choices=("columns", "rows"),
        default="columns",
        help="table layout: one column per gene (default) or one row per gene",
    )
    p.add_argument(
        "--sep", default=None, help="table separator (default: ',' for .csv, tab otherwise)"
    )
    p.add_argument("--layer", default=None, help="AnnData layer to read instead of X")


def _add_model_arguments(p: argparse.ArgumentParser, defaults: dict) -> None:
    g = p.add_argument_group(
        "model (TGEMClassifier parameters; original flag names in parentheses are accepted)"
    )
    g.add_argument(
        "--n-layers",
        type=int,
        default=defaults["n_layers"],
        help="attention layers (default: %(default)s)",
    )
    g.add_argument(
        "--n-heads",
        "--head_num",
        type=int,
        default=defaults["n_heads"],
        help="attention heads per layer (--head_num; default: %(default)s)",
    )
    g.add_argument(
        "--activation",
        "--act_fun",
        type=_activation,
        default=defaults["activation"],
        help="activation after the last layer: relu, leakyrelu, gelu, or nan for "
        "none (--act_fun; default: %(default)s)",
    )
    g.add_argument(
        "--dropout",
        "--dropout_rate",
        type=_fraction,
        default=defaults["dropout"],
        help="dropout rate (--dropout_rate; default: %(default)s)",
    )
    g.add_argument(
        "--learning-rate",
        "--learning_rate",
        type=float,
        default=defaults["learning_rate"],
        help="Adam learning rate (--learning_rate; default: %(default)s)",
    )
    g.add_argument(
        "--batch-size",
        "--batch_size",
        type=int,
        default=defaults["batch_size"],
        help="mini-batch size (--batch_size; default: %(default)s)",
    )
    g.add_argument(
        "--max-epochs",
        "--epoch",
        type=int,
        default=defaults["max_epochs"],
        help="training epochs (--epoch; default: %(default)s)",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=defaults["weight_decay"],
        help="Adam weight decay (default: %(default)s)",
    )
    g.add_argument(
        "--standardize",
        action=argparse.BooleanOptionalAction,
        default=defaults["standardize"],
        help="standardise each gene inside the network (default: %(default)s; "
        "the original: --no-standardize --learning_rate 1e-4)",
    )
    g.add_argument(
        "--early-stopping",
        "--do_val",
        dest="early_stopping",
        action="store_const",
        const=True,
        default=defaults["early_stopping"],
        help="hold out --validation-fraction of the training data, track the "
        "validation loss each epoch, stop after --n-iter-no-change epochs "
        "without improvement and keep the best epoch's weights (--do_val; default: "
        "%(default)s, on from 5,000 training cells)",
    )
    g.add_argument(
        "--no-early-stopping",
        dest="early_stopping",
        action="store_const",
        const=False,
        help="train all --max-epochs whatever the number of cells",
    )
    g.add_argument(
        "--validation-fraction",
        type=_fraction,
        default=defaults["validation_fraction"],
        help="validation share with --early-stopping (default: %(default)s)",
    )
    g.add_argument(
        "--n-iter-no-change",
        type=int,
        default=defaults["n_iter_no_change"],
        help="patience of --early-stopping in epochs (default: %(default)s)",
    )
    g.add_argument(
        "--calibration",
        type=_calibration,
        default=defaults["calibration"],
        metavar="{none,temperature}",
        help="temperature: hold out --calibration-fraction of the training cells "
        "(stratified), fit a temperature for the probabilities and the rejection thresholds "
        "that `tgem annotate` uses by default; none trains on all cells (default: none)",
    )
    g.add_argument(
        "--calibration-fraction",
        type=_open_fraction,
        default=defaults["calibration_fraction"],
        metavar="F",
        help="share of each class held out with --calibration temperature, in (0, 1) "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--class-weight",
        choices=("balanced",),
        default=defaults["class_weight"],
        help="weigh classes inversely to their frequency (default: none)",
    )
    g.add_argument(
        "--attention-backend",
        default=defaults["attention_backend"],
        help="attention implementation (default: %(default)s, the fastest available)",
    )
    g.add_argument(
        "--tree-tolerance",
        type=float,
        default=defaults["tree_tolerance"],
        metavar="TOL",
        help="error tolerance of the tree-code attention, 1e-13 to 0.1 (default: the "
        "dtype's, 1e-9 for float32)",
    )
    g.add_argument(
        "--device",
        default=defaults["device"],
        help="cpu, cuda, cuda:N or auto (default: %(default)s)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=defaults["n_threads"],
        help="CPU threads (default: torch's setting)",
    )
    g.add_argument(
        "--random-state",
        "--seed",
        type=int,
        default=0,
        help="seed for the split and the model (default: %(default)s)",
    )
