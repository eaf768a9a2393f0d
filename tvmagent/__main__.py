"""`python -m tvmagent ...` is `tvm agent ...` (used to start local agents)."""

import sys

from coordinator.cli import main

main(["agent", *sys.argv[1:]])
