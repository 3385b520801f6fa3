"""`python -m fastmlp` runs the `fastmlp` command."""

from fastmlp.cli import main

raise SystemExit(main())
