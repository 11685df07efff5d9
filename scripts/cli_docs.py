"""Write docs/cli.md, the CLI reference, from the Typer app (``fgcli.cli.app``).

    python scripts/cli_docs.py           # write docs/cli.md
    python scripts/cli_docs.py --check   # exit 1 if docs/cli.md differs from the app

The page walks the app's commands and their parameters itself (not the terminal help),
so it is the same at any terminal width; tests/test_cli_docs.py fails when the
committed page is not what the app generates now.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "cli.md"
PROG = "fullgrad"
HEADER = ("<!-- Generated from the Typer app by scripts/cli_docs.py; do not edit. "
          "Regenerate: python scripts/cli_docs.py -->")


def render() -> str:
    """The whole page, as docs/cli.md holds it."""
    import typer.main

    from fgcli.cli import app, exits

    group = typer.main.get_command(app)
    lines = [HEADER, "", f"# `{PROG}` command reference", "", _text(group.help), "",
             f"Usage: `{PROG} [OPTIONS] COMMAND [ARGS]...`", "",
             ("`-h`, `--help` after any command prints its help; `--version` prints the "
              "version."), "", "| Command | What it does |", "| --- | --- |"]
    commands = group.commands  # type: ignore[attr-defined]
    for name, command in commands.items():
        lines.append(f"| [`{name}`](#{PROG}-{name}) | {_cell(_summary(command.help))} |")
    lines += ["", "## Exit codes", "", *_exit_codes(exits.__doc__ or "")]
    for name, command in commands.items():
        lines += ["", *_command(name, command)]
    return "\n".join(lines).rstrip() + "\n"


def _command(name: str, command: Any) -> list[str]:
    """One command's section: its help, usage, arguments and options."""
    ctx = command.context_class(command, info_name=name)
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    opts = [p for p in command.params if p.param_type_name == "option" and not p.hidden]
    usage = " ".join([PROG, name, "[OPTIONS]", *(_usage(p) for p in arguments)])
    lines = [f"## `{PROG} {name}`", "", _text(command.help), "", f"Usage: `{usage}`"]
    if arguments:
        lines += ["", "| Argument | Type | Help |", "| --- | --- | --- |"]
        for p in arguments:
            required = " (required)" if p.required else ""
            lines.append(f"| `{p.name.upper()}` | {_type(p, ctx)} | "
                         f"{_cell((p.help or '') + required)} |")
    lines += ["", "| Option | Type | Default | Help |", "| --- | --- | --- | --- |"]
    for p in opts:
        flags = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        kind = "flag" if p.is_flag else _type(p, ctx) + (", repeatable" if p.multiple else "")
        help_text = (p.help or "") + (" (required)" if p.required else "")
        default = _default(p)
        lines.append(f"| {flags} | {kind} | {f'`{default}`' if default else ''} | "
                     f"{_cell(help_text)} |")
    return lines


def _type(param: Any, ctx: Any) -> str:
    """The value's type as code: ``str``, ``int``, ``fullgrad|simple|smooth``; a list
    (a repeatable option, an argument that takes several) as its element type."""
    text = param.display_type(ctx).strip("<>")
    if text.startswith("list[") and text.endswith("]"):
        text = text[len("list["):-1]
    return f"`{_cell(text)}`"


def _usage(argument: Any) -> str:
    text = argument.name.upper() + ("..." if argument.nargs == -1 else "")
    return text if argument.required else f"[{text}]"


def _default(option: Any) -> str:
    """The default as the command line spells it; empty when there is none to show (the
    help then says what applies: ``[default: ...]``)."""
    value = option.default
    if option.required or value is None or option.show_default is False:
        return ""
    if option.is_flag:
        if option.secondary_opts:
            return (option.opts if value else option.secondary_opts)[0]
        return "" if value is False else option.opts[0]
    return str(getattr(value, "value", value))


def _exit_codes(doc: str) -> list[str]:
    """The bullet list of :mod:`fgcli.cli.exits`' docstring, as markdown."""
    bullets: list[str] = []
    for line in inspect.cleandoc(doc).splitlines():
        if line.startswith("* "):
            bullets.append("- " + line[2:])
        elif line.startswith("  ") and bullets:
            bullets[-1] += " " + line.strip()
    return [re.sub(r":\w+:`", "`", b.replace("``", "`")) for b in bullets]


def _text(help_text: str | None) -> str:
    """A docstring's paragraphs, each on one line."""
    paragraphs = inspect.cleandoc(help_text or "").split("\n\n")
    return "\n\n".join(_prose(" ".join(p.split())) for p in paragraphs)


def _prose(text: str) -> str:
    """``*`` escaped outside code spans: ``2*alpha*saliency`` is not emphasis."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("*", "\\*") for i, p in enumerate(parts))


def _summary(help_text: str | None) -> str:
    """A docstring's first paragraph (raw: :func:`_cell` escapes it)."""
    return inspect.cleandoc(help_text or "").split("\n\n")[0]


def _cell(text: str) -> str:
    """Text for a markdown table cell: one line, pipes escaped, rich's ``\\[`` a bracket."""
    return _prose(" ".join(text.split()).replace("\\[", "[")).replace("|", "\\|")


def main(argv: list[str]) -> int:
    page = render()
    if argv[1:] == ["--check"]:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != page:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run python scripts/cli_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
