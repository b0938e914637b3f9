"""The ``tgem`` command: train, predict, explain and inspect T-GEM models from a shell.

Run ``tgem --help`` or ``tgem <command> --help``. The commands mirror the original T-GEM
scripts; their flag names (``--head_num``, ``--learning_rate``, ``--act_fun``,
``--batch_size``, ``--epoch``, ``--dropout_rate``, ``--do_val``, ``--abs``,
``--attr_method``) are accepted as aliases of tgem's own. Models are written and read only
in tgem's pickle-free model format (``model.save`` / ``tgem.load``).

Exit codes: 0 success; 1 unexpected failure (rerun with ``--debug`` for the traceback);
2 bad command line or input (missing file, unreadable table, unknown label column,
missing labels, an output folder that cannot be written);
3 the data's genes do not match the model's; 4 the model file was refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from tgem._runtime import draw_seed
from tgem._sampling import stratified_subsample

# The original scripts' attribution method names -> tgem's (the library's one table).
from tgem.interpret import ALIASES as ATTR_METHODS

__all__ = ["main", "build_parser"]

logger = logging.getLogger("tgem.cli")

EXIT_OK, EXIT_FAILURE, EXIT_INPUT, EXIT_GENES, EXIT_MODEL = 0, 1, 2, 3, 4
BUNDLED = "pbmc68k"
MODEL_FILE = "model.tgem"

EPILOG = """\
exit codes: 0 success; 1 unexpected failure (rerun with --debug for the traceback);
2 bad command line or input (missing file, unreadable table, unknown label column);
3 the data's genes do not match the model's; 4 the model file was refused.
DATA is a .csv/.tsv/.txt table (optionally .gz), an AnnData .h5ad file, a .npz file with
arrays X, features and the label array, or 'pbmc68k' for the data bundled with tgem."""


class CLIError(Exception):
    """An error the user can act on: printed without a traceback, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_INPUT):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------ arguments
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


def _estimator_defaults() -> dict:
    from tgem import TGEMClassifier

    return TGEMClassifier().get_params()


def build_parser() -> argparse.ArgumentParser:
    """The ``tgem`` argument parser (one sub-command per task)."""
    defaults = _estimator_defaults()
    parser = argparse.ArgumentParser(
        prog="tgem",
        description="T-GEM: an interpretable transformer for gene-expression "
        "classification, as a command.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
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
        choices=("max_proba", "energy", "neighbors", "none"),
        default="max_proba",
        help="rejection rule for unassigned cells (default: %(default)s)",
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


def _version() -> str:
    try:
        import tgem

        return f"tgem {tgem.__version__}"
    except (ImportError, AttributeError):  # pragma: no cover - broken install
        return "tgem (unknown version)"


# ----------------------------------------------------------------------------------- data
def _load_data(args, *, need_label: bool):
    """Read DATA into (X DataFrame of float32, y array or None)."""
    from tgem.datasets import load_pbmc68k, read_expression_table, read_h5ad

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
    from tgem._alignment import align_genes

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
    from tgem._io import load
    from tgem.exceptions import ModelFileError

    if not path.exists():
        raise CLIError(
            f"model file {str(path)!r} does not exist; train one with "
            "`tgem train` (it writes model.tgem)."
        )
    try:
        return load(path)
    except ModelFileError as exc:
        raise CLIError(f"model file {str(path)!r} was refused: {exc}", EXIT_MODEL) from exc


def _classifier(args):
    from tgem import TGEMClassifier

    return TGEMClassifier(
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        activation=args.activation,
        dropout=args.dropout,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        max_epochs=args.max_epochs,
        weight_decay=args.weight_decay,
        standardize=args.standardize,
        early_stopping=args.early_stopping,
        validation_fraction=args.validation_fraction,
        n_iter_no_change=args.n_iter_no_change,
        calibration=args.calibration,
        calibration_fraction=args.calibration_fraction,
        class_weight=args.class_weight,
        attention_backend=args.attention_backend,
        tree_tolerance=args.tree_tolerance,
        device=args.device,
        n_threads=args.threads,
        random_state=args.random_state,
        verbose=1 if args.verbose >= 2 else 0,
    )


def _split(X, y, test_size: float, random_state: int):
    from sklearn.model_selection import train_test_split

    if test_size == 0:
        return X, None, y, None
    try:
        return train_test_split(X, y, test_size=test_size, stratify=y, random_state=random_state)
    except ValueError as exc:
        raise CLIError(
            f"cannot make a stratified {test_size:.0%} held-out split: {exc}. "
            "Pass a larger --test-size, or --test-size 0."
        ) from exc


def _prepare_output(folder: Path) -> Path:
    """Make ``folder`` and check it can be written to, before any work; returns it."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CLIError(
            f"cannot write to the output folder {str(folder)!r} ({reason}); pass --output "
            "with a folder you can write to."
        ) from exc
    return folder


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


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean_history(history: list[dict]) -> list[dict]:
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in history
    ]


def _save_figure(make, path: Path) -> Path | None:
    """Draw with ``make()`` (returns Axes or a list) and save; None when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(
            'matplotlib is not installed: %s not drawn (pip install "tgem[plot]").', path.name
        )
        return None
    result = make()
    first = result[0] if isinstance(result, list | tuple | np.ndarray) else result
    figure = first.figure if hasattr(first, "figure") else first
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------- commands
#: The demo's training settings: the estimator's defaults, for DEMO_EPOCHS epochs instead of
#: 50 (enough on the 560 training cells; under 5 minutes on 2 cores).
DEMO_EPOCHS = 20
QUICK_EPOCHS = 2
#: Held-out cells (stratified) whose Integrated Gradients give the demo's top-genes figure
#: (None: all of them, so that even the rarest cell type gets a ranking).
DEMO_ATTRIBUTION_SAMPLES = None


def _train_and_report(args, X, y, out: Path, title: str) -> tuple:
    from tgem._reporting import classification_metrics, format_metrics, metrics_to_json
    from tgem._scale import check_log_scale
    from tgem.plotting import plot_history

    _check_labels(y, args.label or "cell_type", X.index)
    check_log_scale(X)
    X_train, X_test, y_train, y_test = _split(X, y, args.test_size, args.random_state)
    clf = _classifier(args)
    print(
        f"{title}: {X_train.shape[0]} training samples, "
        f"{0 if X_test is None else X_test.shape[0]} held out, {X.shape[1]} genes, "
        f"{len(np.unique(y))} classes; training {clf.max_epochs} epochs ...",
        flush=True,
    )
    start = time.perf_counter()
    clf.fit(X_train, y_train)
    fit_seconds = time.perf_counter() - start
    print(
        f"trained in {fit_seconds:.1f} s on {clf.device_} "
        f"(attention backend: {clf.attention_backend_})"
    )
    if clf.calibration is not None:
        report = clf.calibration_report_
        thresholds = ", ".join(f"{k} {v:.4g}" for k, v in clf.rejection_thresholds_.items())
        print(
            f"calibration: temperature {report['temperature']:.4g} fitted on "
            f"{report['n_calibration']} held-out cells (network trained on "
            f"{report['n_train']}); rejection thresholds {thresholds}"
        )
    scored_X, scored_y, which = (
        (X_train, y_train, "training data") if X_test is None else (X_test, y_test, "held-out")
    )
    metrics = classification_metrics(scored_y, clf.predict_proba(scored_X), clf.classes_)
    print(format_metrics(metrics, which))
    model_path = out / MODEL_FILE
    clf.save(model_path)
    pd.DataFrame(clf.history_).to_csv(out / "history.csv", index=False)
    _save_figure(lambda: plot_history(clf), out / "loss_curves.png")
    _write_json(
        out / "metrics.json",
        {
            "evaluated_on": which,
            "metrics": metrics_to_json(metrics),
            "fit_seconds": fit_seconds,
            "n_train": int(X_train.shape[0]),
            "n_test": 0 if X_test is None else int(X_test.shape[0]),
            "genes": list(map(str, X.columns)),
            "params": {k: v for k, v in clf.get_params().items() if k != "random_state"}
            | {"random_state": args.random_state},
            "device": str(clf.device_),
            "calibration": None
            if clf.calibration is None
            else {
                **clf.calibration_report_,
                "rejection_thresholds": dict(clf.rejection_thresholds_),
            },
            "history": _clean_history(clf.history_),
        },
    )
    return clf, X_test, y_test, metrics


def _cmd_train(args) -> int:
    _prepare_output(args.output)
    X, y = _load_data(args, need_label=True)
    if args.gene_sets is not None:
        from tgem._gene_sets import GeneSetSelector

        if not args.gene_sets.exists():
            raise CLIError(f"gene-set file {str(args.gene_sets)!r} does not exist; check the path.")
        selector = GeneSetSelector(str(args.gene_sets)).set_output(transform="pandas")
        X = selector.fit_transform(X)
        print(
            f"gene sets: kept {X.shape[1]} genes of {selector.n_features_in_}; "
            f"{len(selector.missing_genes_)} genes of the sets are not in the data"
        )
    _train_and_report(args, X, y, args.output, "train")
    print(
        f"wrote {args.output / MODEL_FILE}, metrics.json, history.csv and loss_curves.png "
        f"to {args.output}/"
    )
    return EXIT_OK


def _cmd_predict(args) -> int:
    from tgem._reporting import classification_metrics, format_metrics

    if args.output is not None:
        _prepare_output(args.output.parent)
    model = _load_model(args.model)
    X, y = _load_data(args, need_label=False)
    X_model = _align_to_model(model, X, args.fill_missing)
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
    from tgem._annotate import _import_anndata, annotate

    anndata = _import_anndata()
    if not args.data.is_file():
        raise CLIError(f"data file {str(args.data)!r} does not exist.")
    _prepare_output(args.output.parent)
    model = _load_model(args.model)
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


def _cmd_explain(args) -> int:
    from tgem import interpret

    out = _prepare_output(args.output)
    model = _load_model(args.model)
    X, y = _load_data(args, need_label=True)
    X_model = pd.DataFrame(
        _align_to_model(model, X, args.fill_missing), columns=_model_genes(model, X), index=X.index
    )
    X_model, y = _subsample(X_model, y, args.max_samples, args.random_state)
    print(f"explain: {args.method} over {len(y)} samples ...", flush=True)
    attributions = interpret.attribute(
        model,
        X_model,
        target="true",
        y=y,
        method=args.method,
        n_steps=args.n_steps,
        random_state=args.random_state,
        verbose=1 if args.verbose >= 2 else 0,
    )
    ranking = interpret.gene_ranking(attributions, y, absolute=args.absolute)
    ranking.to_csv(out / "gene_rankings.csv", index=False)
    interpret.write_rnk(ranking, out / "rnk")
    top = ranking[ranking["rank"] <= args.top]
    print(top.to_string(index=False))
    written = ["gene_rankings.csv", "rnk/<class>.rnk"]
    if _save_figure(lambda: _top_genes_figure(ranking, args.top), out / "top_genes.png"):
        written.append("top_genes.png")
    if args.ablation:
        from tgem.plotting import plot_ablation

        print("ablation study ...", flush=True)
        ablation = interpret.ablation_study(
            model, X_model, y, ranking=ranking, random_state=args.random_state
        )
        ablation.to_csv(out / "ablation.csv", index=False)
        overall = ablation[ablation["class"] == "all"]
        print(
            overall[
                ["grid", "percent", "n_genes", "accuracy", "accuracy_top", "accuracy_random_mean"]
            ]
            .round(3)
            .to_string(index=False)
        )
        written.append("ablation.csv")
        if _save_figure(lambda: plot_ablation(ablation), out / "ablation.png"):
            written.append("ablation.png")
    print(f"wrote {', '.join(written)} to {out}/")
    return EXIT_OK


def _top_genes_figure(ranking: pd.DataFrame, top: int):
    """One horizontal bar panel of top genes per class, on one figure."""
    import matplotlib.pyplot as plt

    from tgem.plotting import plot_gene_ranking

    classes = list(dict.fromkeys(ranking["class"]))
    n_cols = min(5, len(classes))
    n_rows = -(-len(classes) // n_cols)
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(3.2 * n_cols, 0.22 * top * n_rows + 1.2),
        layout="constrained",
        squeeze=False,
    )
    for ax, cls in zip(axes.ravel(), classes, strict=False):
        plot_gene_ranking(ranking, cls, top=top, ax=ax)
    for ax in axes.ravel()[len(classes) :]:
        ax.set_visible(False)
    return fig


def _cmd_attention(args) -> int:
    from tgem import attention
    from tgem.plotting import plot_entropy

    out = _prepare_output(args.output)
    model = _load_model(args.model)
    X, y = _load_data(args, need_label=args.target_class is not None)
    X_model = pd.DataFrame(
        _align_to_model(model, X, args.fill_missing), columns=_model_genes(model, X), index=X.index
    )
    entropy = attention.attention_entropy(model, X_model, per_sample=True)
    attention.entropy_table(entropy).to_csv(out / "entropy.csv", index=False)
    mean = pd.DataFrame(
        entropy.mean(axis=0),
        index=pd.Index(range(entropy.shape[1]), name="layer"),
        columns=pd.Index(range(entropy.shape[2]), name="head"),
    )
    print(
        f"mean attention entropy per layer and head (nats; uniform attention: "
        f"{math.log(X_model.shape[1]):.3f}):"
    )
    print(mean.round(3).to_string())
    written = ["entropy.csv"]
    if _save_figure(lambda: plot_entropy(entropy, n_genes=X_model.shape[1]), out / "entropy.png"):
        written.append("entropy.png")
    if args.target_class is not None:
        if y is None:
            raise CLIError("--class needs --label, to find the samples of the class.")
        classes = [str(c) for c in model.classes_]
        if str(args.target_class) not in classes:
            raise CLIError(
                f"class {args.target_class!r} is not one of the model's classes: {classes}."
            )
        mask = np.asarray([str(v) == str(args.target_class) for v in y])
        if not mask.any():
            raise CLIError(f"no sample of DATA has the label {args.target_class!r}.")
        X_class, _ = _subsample(X_model[mask], np.asarray(y)[mask], args.max_samples, 0)
        target = model.classes_[classes.index(str(args.target_class))]
        print(
            f"attention attribution of {args.target_class!r} over {len(X_class)} samples ...",
            flush=True,
        )
        edges = attention.attention_network(
            model, X_class, target=target, top_fraction=args.top_fraction
        )
        name = _safe_name(args.target_class)
        attention.write_edges(edges, out / f"network_{name}.tsv")
        hubs = attention.hub_genes(edges, top=None)
        hubs.to_csv(out / f"hub_genes_{name}.csv", index=False)
        print(f"{len(edges)} edges; top hub genes of {args.target_class!r}:")
        print(hubs.head(args.top).to_string(index=False))
        written += [f"network_{name}.tsv", f"hub_genes_{name}.csv"]
    print(f"wrote {', '.join(written)} to {out}/")
    return EXIT_OK


def _model_genes(model, X):
    genes = getattr(model, "feature_names_in_", None)
    return list(X.columns) if genes is None else list(genes)


def _subsample(X, y, max_samples, random_state):
    """At most ``max_samples`` rows, stratified by label, in their original order."""
    y = np.asarray(y)
    if max_samples is None or len(X) <= max_samples:
        return X, y
    rng = np.random.default_rng(draw_seed(random_state))
    idx = stratified_subsample(y, max_samples, rng, min_per_class=0)
    return (X.iloc[idx] if isinstance(X, pd.DataFrame) else X[idx]), y[idx]


def _safe_name(name) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def _cmd_demo(args) -> int:
    _prepare_output(args.output)
    if args.quick:
        args.max_epochs = min(args.max_epochs, QUICK_EPOCHS)
    args.data, args.label = BUNDLED, "cell_type"
    X, y = _load_data(args, need_label=True)
    start = time.perf_counter()
    clf, X_test, y_test, _ = _train_and_report(args, X, y, args.output, "demo")
    written = [MODEL_FILE, "metrics.json", "history.csv", "loss_curves.png"]
    written += _demo_figures(clf, X_test, y_test, args)
    print(
        f"wrote {', '.join(written)} to {args.output}/ (total {time.perf_counter() - start:.1f} s)"
    )
    return EXIT_OK


def _demo_figures(clf, X_test, y_test, args) -> list[str]:
    """The entropy box plot and the top genes per cell type, on the held-out cells."""
    from tgem import attention, interpret
    from tgem.plotting import plot_entropy

    out = args.output
    entropy = attention.attention_entropy(clf, X_test, per_sample=True)
    attention.entropy_table(entropy).to_csv(out / "entropy.csv", index=False)
    mean = entropy.mean(axis=(0, 2))
    print(
        "mean attention entropy per layer (nats; uniform attention: "
        f"{math.log(X_test.shape[1]):.3f}): " + ", ".join(f"{v:.3f}" for v in mean)
    )
    written = ["entropy.csv"]
    if _save_figure(lambda: plot_entropy(entropy, n_genes=X_test.shape[1]), out / "entropy.png"):
        written.append("entropy.png")
    X_attr, y_attr = _subsample(
        X_test, y_test, 30 if args.quick else DEMO_ATTRIBUTION_SAMPLES, args.random_state
    )
    print(f"Integrated Gradients on {len(y_attr)} held-out cells ...", flush=True)
    attributions = interpret.attribute(
        clf,
        X_attr,
        target="true",
        y=y_attr,
        n_steps=8 if args.quick else 50,
        random_state=args.random_state,
    )
    ranking = interpret.gene_ranking(attributions, y_attr)
    ranking.to_csv(out / "gene_rankings.csv", index=False)
    written.append("gene_rankings.csv")
    top3 = ranking[ranking["rank"] <= 3].groupby("class", sort=False)["gene"].agg(", ".join)
    print("top genes per cell type (mean Integrated Gradients, held-out cells):")
    print("\n".join(f"  {cls}: {genes}" for cls, genes in top3.items()))
    if _save_figure(lambda: _top_genes_figure(ranking, args.top), out / "top_genes.png"):
        written.append("top_genes.png")
    return written


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the ``tgem`` command; returns the exit code.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    code : int
        0 on success; 1 unexpected failure; 2 bad command line or input; 3 genes that do
        not match the model; 4 a refused model file.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="tgem: %(message)s",
        stream=sys.stderr,
    )
    warnings.simplefilter("default")  # show each library warning once, on stderr
    try:
        return args.handler(args)
    except CLIError as exc:
        return _fail(args, exc, exc.code)
    except (
        FileNotFoundError,
        IsADirectoryError,
        KeyError,
        ValueError,
        TypeError,
        ImportError,
    ) as exc:
        from tgem.exceptions import ModelFileError

        return _fail(args, exc, EXIT_MODEL if isinstance(exc, ModelFileError) else EXIT_INPUT)
    except KeyboardInterrupt:
        print("tgem: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort of a command-line tool
        return _fail(args, exc, EXIT_FAILURE)


def _fail(args, exc: BaseException, code: int) -> int:
    if args.debug:
        import traceback

        traceback.print_exception(exc)
    message = str(exc) if not isinstance(exc, KeyError) else str(exc.args[0])
    print(f"tgem {args.command}: error: {message}", file=sys.stderr)
    if code == EXIT_FAILURE and not args.debug:
        print("(rerun with --debug for the traceback)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
