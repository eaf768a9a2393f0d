"""`python -m coordinator ...` is the `tvm` command."""

from coordinator.cli import main

main()
