"""`python -m rlhf.cli`: the headless commands."""

from . import main

raise SystemExit(main())
