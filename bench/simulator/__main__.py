"""``python -m bench.simulator [options]``: as ``shoal bench simulate``."""

import sys

from bench.simulator.cli import main

sys.exit(main())
