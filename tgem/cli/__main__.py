"""``python -m tgem.cli``: the ``tgem`` command."""

import sys

from tgem.cli import main

sys.exit(main())
