"""`python -m fastmlp` runs the `fastmlp` command."""

from fastmlp.workflow.cli import main

raise SystemExit(main())
