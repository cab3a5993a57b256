"""``python -m natgrad`` = the ``natgrad`` command."""

import sys

from .cli import main

sys.exit(main())
