"""``python -m fgcli.cli`` (as ``python -m fgcli``)."""

from fgcli.cli import main

main()
