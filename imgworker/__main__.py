"""``python -m imgworker`` is the ``imgworker`` command."""

import sys

from .cli import main

sys.exit(main())
