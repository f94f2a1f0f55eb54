"""``python -m shoal``: the command line, as the ``shoal`` script runs it."""

from shoal.cli import main

raise SystemExit(main())
