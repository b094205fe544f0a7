"""MkDocs hook: the CLI reference, rendered from the Typer app at build time (never written by hand).

``docs/reference/cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it with the
``--help`` of ``wmdeploy`` and of every command the app registers, in registration order, exactly as
``wmdeploy COMMAND --help`` prints it (Typer's plain formatter: the app sets ``rich_markup_mode=None``).
A command added to the app appears here on the next build; ``tests/test_docs.py`` checks that every
command is rendered.
"""
from __future__ import annotations

from typing import Any

MARKER = "<!-- cli-reference -->"
WIDTH = 100


def _command_help(cmd: Any, name: str, parent: Any) -> str:
    import click  # noqa: PLC0415 (Typer's dependency)

    ctx = click.Context(cmd, info_name=name, parent=parent, max_content_width=WIDTH, terminal_width=WIDTH)
    return cmd.get_help(ctx)


def render() -> str:
    """The Markdown of the reference: the app's help, then one section per command."""
    import click  # noqa: PLC0415
    import typer.main  # noqa: PLC0415

    from wmdeploy.cli import app  # noqa: PLC0415 (registers every command group)

    group = typer.main.get_command(app)
    root = click.Context(group, info_name="wmdeploy", max_content_width=WIDTH, terminal_width=WIDTH)
    parts = ["## wmdeploy", "", "```text", group.get_help(root).rstrip(), "```", ""]
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        parts += [f"## wmdeploy {name}", "", "```text", _command_help(cmd, name, root).rstrip(), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:  # noqa: ARG001 (MkDocs' signature)
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
