"""`python -m cli ...` runs what the `calibflow` console script runs."""

from cli.main import entry_point

entry_point()
