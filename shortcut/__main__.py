"""`python -m shortcut ...` is the `shortcut` command (what torchrun starts: torchrun ... -m shortcut train ...)."""

import sys

from shortcut.cli import main

sys.exit(main())
