"""The `skipbench` command line: parse options, call the library, print. Nothing else lives here.

This module holds the one Typer app, the consoles, the exit codes and the handling of errors and Ctrl-C;
the command modules (runs, probe, training, results) register their commands on the app, and
skipbench.cli imports them all, so `main` runs the full command line once skipbench.cli is imported.

Exit codes: 0 done; 1 a regression (compare); 2 a user error (one line, no traceback); 3 the sweep
finished but some cells failed (listed with their errors); 130 interrupted by Ctrl-C, 143 terminated by
SIGTERM (what Slurm sends at preemption and at the time limit): in both, finished work is kept.
User text (model names, prompts, errors) is never read as rich markup.
"""
# ruff: noqa: E402 - Ctrl-C is taken over before the slow imports (torch), so it never shows a traceback

from __future__ import annotations

import errno
import os
import signal
import sys


def _interrupted_at_start(signum, frame) -> None:
    """Ctrl-C (or SIGTERM) while skipbench starts (imports, parsing) or after its work is stored: nothing to
    keep, so leave at once, without the traceback a KeyboardInterrupt inside an import would print."""
    try:
        sys.stdout.flush()
        sys.stderr.write("terminated\n" if signum == signal.SIGTERM else "interrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(143 if signum == signal.SIGTERM else 130)


# The `skipbench` script, or `python -m skipbench.cli`: its package is imported while argv[0] is still "-m".
if sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) in ("skipbench", "skipbench.exe"):
    signal.signal(signal.SIGINT, _interrupted_at_start)
    signal.signal(signal.SIGTERM, _interrupted_at_start)

import warnings

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from skipbench.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Benchmark autoregressive, two-model speculative and LayerSkip self-speculative decoding.")


class PlainUsage(typer.core.TyperCommand):
    """A command whose usage line names a required argument as RUN_DIR, not as Typer's {RUN_DIR} (which reads
    like a placeholder left unfilled)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [piece[1:-1] if piece.startswith("{") and piece.endswith("}") else piece
                for piece in super().collect_usage_pieces(ctx)]


console = Console(stderr=True, highlight=False)
out = Console(highlight=False)

EXIT_REGRESSION, EXIT_USER_ERROR, EXIT_CELLS_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 3, 130, 143


# Libraries whose warnings and progress bars would bury skipbench's tables (its own warnings are printed lines).
QUIET_LIBRARIES = r"(torch|transformers|huggingface_hub|accelerate|datasets|tokenizers|safetensors|gguf)(\.|$)"


def quiet_libraries() -> None:
    """Silence the libraries' advice, deprecation notes and progress bars; skipbench's own lines stay."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", module=QUIET_LIBRARIES)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if "transformers" in sys.modules:  # imported before the environment could tell it
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


@app.callback()
def _commands() -> None:
    """Benchmark autoregressive, two-model speculative and LayerSkip self-speculative decoding."""
    quiet_libraries()


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # one line, however long
    raise typer.Exit(code)


def _on_sigint(handler, signum: int = signal.SIGINT):
    """Install a SIGINT (or `signum`) handler (only the main thread can); return the one it replaces."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signum, handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as Ctrl-C does (work kept, lock released)."""


class handled:
    """The user's errors as one red line and exit code 2; Ctrl-C as exit code 130 with how to resume, and
    SIGTERM the same way with exit code 143.

    A Ctrl-C that lands inside an import may surface as another error (a library turns it into an
    ImportError): a SIGINT seen during the block counts as the interruption, whatever was raised."""

    def __init__(self, force: bool = False):
        self.force = force
        self.interrupted = self.terminated = False
        self.previous = self.previous_term = None

    def _interrupt(self, signum, frame):
        self.interrupted = True
        self.terminated = signum == signal.SIGTERM
        raise Terminated if self.terminated else KeyboardInterrupt

    def __enter__(self):
        self.previous = _on_sigint(self._interrupt)
        self.previous_term = _on_sigint(self._interrupt, signal.SIGTERM)
        return self

    def __exit__(self, kind, error, traceback):
        if self.previous is not None:
            _on_sigint(self.previous)
        if self.previous_term is not None:
            _on_sigint(self.previous_term, signal.SIGTERM)
        if kind is None:
            return False
        if issubclass(kind, KeyboardInterrupt) or self.interrupted:
            again = "the same command without --force" if self.force else "the same command"
            what = "terminated (SIGTERM)" if self.terminated or issubclass(kind, Terminated) else "interrupted"
            console.print(f"[yellow]{what}[/]: finished work is kept; rerun {again} to resume", soft_wrap=True)
            raise typer.Exit(EXIT_TERMINATED if what != "interrupted" else EXIT_INTERRUPTED)
        if issubclass(kind, UserError):
            text = str(error).strip()
            fail(text.splitlines()[0] if text else kind.__name__)
        if issubclass(kind, OSError):
            if error.filename:  # read-only directory, full disk, a missing file, ...
                fail(f"cannot use {error.filename}: {error.strerror or error}")
            if isinstance(error, FileNotFoundError) or error.errno in USER_ERRNOS:
                text = str(error).strip()
                fail(text.splitlines()[0] if text else kind.__name__)
        return False


USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT}


def main() -> None:
    # Before transformers is imported (lazily, by the commands): its warnings would bury the tables.
    quiet_libraries()
    _on_sigint(_interrupted_at_start)  # until a command's own handling is in place
    _on_sigint(_interrupted_at_start, signal.SIGTERM)
    try:
        app()
    except KeyboardInterrupt as error:  # before a command's own handler is in place (imports, parsing)
        console.print("[yellow]terminated[/]" if isinstance(error, Terminated) else "[yellow]interrupted[/]")
        sys.exit(EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.exit(1)
