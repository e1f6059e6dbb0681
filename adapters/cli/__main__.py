"""`python -m flowstore.adapters.cli`: the `flowstore` command."""

from flowstore.adapters.cli import main

raise SystemExit(main())
