"""The ``tgem`` command (moved to the package ``tgem.cli``; split into modules next)."""

from tgem.cli._parser import EXIT_FAILURE as EXIT_FAILURE
from tgem.cli._parser import EXIT_GENES as EXIT_GENES
from tgem.cli._parser import EXIT_INPUT as EXIT_INPUT
from tgem.cli._parser import EXIT_MODEL as EXIT_MODEL
from tgem.cli._parser import EXIT_OK as EXIT_OK
from tgem.cli._parser import _classifier as _classifier
from tgem.cli._parser import _load_model as _load_model
from tgem.cli._parser import _subsample as _subsample
from tgem.cli._parser import build_parser, main

__all__ = ["main", "build_parser"]
