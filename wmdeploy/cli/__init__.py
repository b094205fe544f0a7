"""The ``wmdeploy`` command line: a thin layer over the library (every command is a Python call too).

Errors that wmdeploy raises on purpose become one line on stderr and exit code 2; a verification that
fails prints its report and exits 1. ``app`` lives in ``cli.app``; each command group registers itself
on it when imported here.
"""
from __future__ import annotations

import sys

from . import files as _files, run as _run, transform as _transform  # noqa: F401  (register the commands)
from .app import _one_line, app, err_console


def main() -> None:
    """The console script. Usage errors (a missing argument, a bad flag value) become one line and exit 2,
    like every other bad input, instead of Typer's framed box."""
    try:
        code = app(prog_name="wmdeploy", standalone_mode=False)
    except Exception as exc:  # click's UsageError family (vendored by Typer), matched by what it carries
        if type(exc).__name__ == "NoArgsIsHelpError":  # `wmdeploy` alone: the help is already printed
            sys.exit(2)
        if getattr(exc, "exit_code", None) == 2 and hasattr(exc, "format_message"):
            ctx = getattr(exc, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else ""
            err_console.print(f"error: {where}{_one_line(exc.format_message())}", markup=False, highlight=False)
            sys.exit(2)
        if type(exc).__name__ == "Abort":  # Ctrl-C at a prompt
            sys.exit(130)
        raise
    sys.exit(code if isinstance(code, int) else 0)
