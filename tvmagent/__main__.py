"""`python -m tvmagent ...` is `tvm agent ...` (used to start local agents)."""

from .cli import main

main()
