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

The package's modules, from the entry point down:

- ``_main``: :func:`main` (parse, run the command's handler, errors to exit codes);
- ``_parser``: :func:`build_parser`, the sub-commands and their options;
- ``_arguments``: argument types and the data and model option groups;
- ``_train`` (``train``), ``_predict`` (``predict``, ``annotate``), ``_explain``
  (``explain``, ``attention``), ``_demo`` (``demo``): one handler per command;
- ``_data``: reading DATA and MODEL; ``_output``: the output folder, files and figures;
- ``_common``: exit codes, :class:`CLIError` and its report, small helpers.
"""

from tgem.cli._common import EXIT_FAILURE as EXIT_FAILURE
from tgem.cli._common import EXIT_GENES as EXIT_GENES
from tgem.cli._common import EXIT_INPUT as EXIT_INPUT
from tgem.cli._common import EXIT_MODEL as EXIT_MODEL
from tgem.cli._common import EXIT_OK as EXIT_OK
from tgem.cli._common import CLIError as CLIError
from tgem.cli._common import _subsample as _subsample
from tgem.cli._main import main
from tgem.cli._parser import build_parser

__all__ = ["main", "build_parser"]
