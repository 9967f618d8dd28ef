"""``python -m tasks.cli``: the ``bgremoval`` command line."""

import sys

from tasks.cli.main import main

sys.exit(main())
