"""``python -m consumers``: the `tally` command line."""

from consumers.cli import main

raise SystemExit(main())
