"""The `skipbench` command line (see skipbench.cli.core): the one Typer app with every command registered.

Importing a command module registers its commands on the app, and `skipbench --help` lists them in the
order they were registered: hence the fixed import order below.
"""

# isort: off
from skipbench.cli.core import app, main
from skipbench.cli import runs  # noqa: F401 - run, sweep
from skipbench.cli import probe  # noqa: F401 - datasets, roofline, benchmark
from skipbench.cli import training  # noqa: F401 - train
from skipbench.cli import results  # noqa: F401 - report, compare
from skipbench.cli import exports  # noqa: F401 - export, schema
# isort: on

__all__ = ["app", "main"]
