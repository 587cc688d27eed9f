"""``python -m tally.consumers``: the `tally` command line."""

from tally.consumers.cli import main

raise SystemExit(main())
