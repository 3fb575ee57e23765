"""``python -m adainfer``: the same as the ``adainfer`` command."""

import sys

from adainfer.app.cli import main

sys.exit(main())
