"""What every ``tgem`` command shares: exit codes, the user error and its report, small helpers."""

from __future__ import annotations

import logging
import sys
import traceback

import numpy as np
import pandas as pd

from tgem._runtime import draw_seed
from tgem._sampling import stratified_subsample

logger = logging.getLogger("tgem.cli")

EXIT_OK, EXIT_FAILURE, EXIT_INPUT, EXIT_GENES, EXIT_MODEL = 0, 1, 2, 3, 4
BUNDLED = "pbmc68k"
MODEL_FILE = "model.tgem"


class CLIError(Exception):
    """An error the user can act on: printed without a traceback, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_INPUT):
        super().__init__(message)
        self.code = code


def _fail(args, exc: BaseException, code: int) -> int:
    if args.debug:
        traceback.print_exception(exc)
    message = str(exc) if not isinstance(exc, KeyError) else str(exc.args[0])
    print(f"tgem {args.command}: error: {message}", file=sys.stderr)
    if code == EXIT_FAILURE and not args.debug:
        print("(rerun with --debug for the traceback)", file=sys.stderr)
    return code


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
