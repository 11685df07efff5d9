"""docs/cli.md is what scripts/cli_docs.py generates from the Typer app now."""

from __future__ import annotations

import importlib.util

from helpers import ROOT


def _cli_docs():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_cli_reference_matches_the_app():
    cli_docs = _cli_docs()
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == cli_docs.render(), (
        "docs/cli.md is out of date: run python scripts/cli_docs.py")


def test_cli_reference_names_every_command_and_option_whatever_the_terminal(monkeypatch):
    import typer.main

    from fgcli.cli import app

    cli_docs = _cli_docs()
    page = cli_docs.render()
    monkeypatch.setenv("COLUMNS", "40")
    assert cli_docs.render() == page
    assert page.splitlines()[0] == cli_docs.HEADER
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert f"## `fullgrad {name}`" in page
        for param in command.params:
            names = param.opts if param.param_type_name == "option" else [param.name.upper()]
            for flag in names:
                assert f"`{flag}`" in page, (name, flag)
