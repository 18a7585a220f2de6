"""`python -m ztun` runs the command line."""

from ztun.launch import main

main()
