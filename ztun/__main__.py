"""`python -m ztun` runs the command line."""

from ztun.cli import main

main()
