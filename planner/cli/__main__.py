"""`python -m planner.cli`: the moesz command line (what the `moesz` script runs)."""

from planner.cli import main

main()
