"""``python -m lightning_nograd audit ...``: see ``lightning_nograd.cli``."""

import sys

from lightning_nograd.cli import main

sys.exit(main())
