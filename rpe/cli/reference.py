"""The CLI reference as Markdown, rendered from the Typer application itself (so the docs cannot drift).

The documentation build (``mkdocs.yml``'s hook ``docs/_hooks/cli_reference.py``) writes the result as
``reference/cli.md``; ``python -m rpe.cli.reference`` prints it.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

import typer


def _type_name(annotation: Any) -> str:
    """``int``, ``list[str]``, ...; ``Optional[X]`` shows as ``X`` (the default column says when it is unset)."""
    if annotation is inspect.Parameter.empty:
        return ""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return annotation.__name__ if isinstance(annotation, type) and not typing.get_args(annotation) else str(
        annotation).replace("typing.", "")


def _param_row(param: Any, annotations: dict[str, Any]) -> str:
    """One table row; ``param`` is the click parameter Typer built (only its public click attributes are read)."""
    names = " / ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts]) or f"`{param.name}`"
    kind = "flag" if getattr(param, "is_flag", False) else _type_name(annotations.get(param.name,
                                                                                    inspect.Parameter.empty))
    help_text = (getattr(param, "help", None) or "").replace("|", "\\|").replace("\n", " ")
    if param.required:
        default = "required"
    elif param.default is None or callable(param.default) or param.default == ():
        default = ""
    else:
        default = f"`{param.default}`"
    return f"| {names} | {kind} | {default} | {help_text} |"


def _command_section(cmd: Any, path: str, depth: int) -> list[str]:
    lines = [f"{'#' * depth} `{path}`", ""]
    if cmd.help:
        lines += [cmd.help.strip(), ""]
    params = [p for p in cmd.params if not getattr(p, "hidden", False)
              and p.name not in ("help", "install_completion", "show_completion")]
    if params:
        annotations = typing.get_type_hints(cmd.callback) if cmd.callback else {}
        lines += ["| option | type | default | description |", "|---|---|---|---|"]
        lines += [_param_row(p, annotations) for p in params]
        lines.append("")
    for name, sub in getattr(cmd, "commands", {}).items():  # a group: its commands in help order
        if not sub.hidden:
            lines += _command_section(sub, f"{path} {name}", min(depth + 1, 4))
    return lines


def cli_markdown(app: typer.Typer | None = None, name: str = "rpe") -> str:
    """Markdown for every command and option of ``app`` (default: the ``rpe`` application), in help order."""
    if app is None:
        from rpe.cli import app
    root = typer.main.get_command(app)
    lines = ["# CLI reference", "",
             "Generated from the command line itself at build time (`python -m rpe.cli.reference`); "
             "`rpe COMMAND --help` prints the same.", ""]
    lines += _command_section(root, name, 2)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(cli_markdown())
