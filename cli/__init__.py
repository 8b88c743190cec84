"""Command-line interface (installed as ``shiftkit.cli``; console script ``shiftkit``)."""
