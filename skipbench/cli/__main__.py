"""`python -m skipbench.cli`: the same as the `skipbench` script."""

from skipbench.cli import main

main()
