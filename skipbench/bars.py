"""Progress bars on the console: drawn by rich on a terminal, plain lines elsewhere (a CI log, a file).

Shared by the local sweep's progress (cli) and the launchers' board (launch.progress)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichBar


class ConsoleBar:
    """Rich bars drawn on a terminal; where the console is not one, nothing is drawn and the owner prints
    plain lines through `print` (rich bars would only render when the run ends)."""

    def __init__(self, console: Console):
        self.console, self.live = console, console.is_terminal
        self.bar = RichBar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=console)

    def __enter__(self):
        if self.live:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.bar.__exit__(*exc)

    def print(self, text: str) -> None:
        """One line of the user's text (never markup), above the bars when they are drawn."""
        # Wrapped at the terminal's width: a warning must stay readable on an 80-column terminal.
        (self.bar.console if self.live else self.console).print(escape(text))
