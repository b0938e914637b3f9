"""``main``: parse the command line, run the command, turn errors into exit codes."""

from __future__ import annotations

import logging
import sys
import warnings

from tgem.cli._common import EXIT_FAILURE, EXIT_INPUT, EXIT_MODEL, CLIError, _fail
from tgem.cli._parser import build_parser
from tgem.exceptions import ModelFileError


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

    Examples
    --------
    A model file that does not exist is a bad input (exit code 2, the message on stderr):

    >>> from tgem.cli import EXIT_INPUT, main
    >>> main(["predict", "no_such_model.tgem", "cells.csv"]) == EXIT_INPUT
    True
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
        return _fail(args, exc, EXIT_MODEL if isinstance(exc, ModelFileError) else EXIT_INPUT)
    except KeyboardInterrupt:
        print("tgem: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort of a command-line tool
        return _fail(args, exc, EXIT_FAILURE)
