"""The CLI package itself: --help stays instant (no torch), and the exit-code policy's
table names exceptions that exist."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT

COMMANDS = ["", "dump", "check", "eval", "merge", "gallery", "models"]
HEAVY = ("torch", "torchvision", "timm")


def test_help_of_every_command_imports_no_torch():
    probe = (
        "import sys\n"
        "from fgcli.cli import main\n"
        f"for command in {COMMANDS!r}:\n"
        "    sys.argv = ['fullgrad', *([command] if command else []), '--help']\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (command, exc.code)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "100"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]


def test_every_exception_the_exit_policy_names_exists():
    from fgcli.cli import exits

    for row in exits.USAGE_ERRORS:
        for kind in exits.usage_errors(row):
            assert isinstance(kind, type) and issubclass(kind, Exception), (row, kind)
