"""MkDocs hook: fill the CLI reference page from the Typer app, so the page cannot drift from the flags."""

from __future__ import annotations

from typing import Any

MARKER = "<!-- llmctl-cli-reference -->"


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    import typer
    from llmctl_cli.main import app
    from typer.cli import get_docs_for_click

    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="llmctl")
    docs = get_docs_for_click(obj=command, ctx=ctx, name="llmctl", title="`llmctl`")
    # The generator's first heading is the page's own title: demote it under the page heading.
    return markdown.replace(MARKER, docs.replace("\n# ", "\n## ").removeprefix("# "))
