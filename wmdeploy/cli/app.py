"""The ``wmdeploy`` Typer app and what every command shares: the one-line error wrapper, the consoles.

The command modules (``files``, ``transform``, ``run``) register themselves on ``app``; the package
``__init__`` imports them and holds ``main``. Kept apart so that no command module imports its importer.

Errors that wmdeploy raises on purpose become one line on stderr and exit code 2; a verification that
fails prints its report and exits 1.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import typer
from rich.console import Console

from ..errors import InputError, VerificationError, WmdeployError

app = typer.Typer(
    name="wmdeploy",
    help="Deploy sequence models with a working memory: export, inspect, verify, annotate, and more.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: "[/MODEL]" or "[plot]" are words, not Rich markup
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays on one line, however narrow the terminal


#: optional modules -> the extra that installs them (the base install is the torch-free runtime)
_EXTRAS = {"torch": "export", "onnx": "export", "onnxscript": "export", "onnxslim": "export",
           "fastapi": "serve", "uvicorn": "serve", "httpx": "serve", "tritonclient": "triton",
           "google": "triton", "matplotlib": "plot"}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn wmdeploy's errors into one line and an exit code (2 bad input, 1 failed verification)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VerificationError as exc:
            if exc.report is not None and hasattr(exc.report, "table"):
                err_console.print(exc.report.table())
            err_console.print(f"error: {_one_line(exc)}", markup=False, highlight=False)
            raise typer.Exit(1) from None
        except WmdeployError as exc:
            err_console.print(f"error: {_one_line(exc)}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as exc:
            extra = _EXTRAS.get((exc.name or "").partition(".")[0])
            if extra is None:
                raise
            err_console.print(f"error: `wmdeploy {fn.__name__.removesuffix('_cmd')}` needs {exc.name}, which this "
                              f"install lacks: pip install 'wmdeploy[{extra}]'", markup=False, highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def check_output(flag: str, path: Any) -> None:
    """Refuse an output path that cannot be written before any work is done (one line, exit 2)."""
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        why = "it is a directory" if path.is_dir() else f"no directory {path.parent}"
        raise InputError(f"{flag} {path}: cannot write it ({why})")


def write_output(flag: str, path: Any, write: Callable[[Any], Any]) -> None:
    """``write(path)``, with an OS error (a read-only folder, a full disk) as one line."""
    try:
        write(path)
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot write it ({exc.strerror or exc})") from None


def _parse_chunks(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{flag}: expected comma-separated positive integers such as 1,7,32, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise typer.BadParameter(f"{flag}: expected comma-separated positive integers such as 1,7,32, got {text!r}")
    return values
