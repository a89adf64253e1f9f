"""`python -m pendra` runs the CLI."""

from pendra.cli import main

main()
