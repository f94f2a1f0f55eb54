"""``python -m bench.soak [options]``: as ``shoal bench soak``."""

import sys

from bench.soak.cli import main

sys.exit(main())
