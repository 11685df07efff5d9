"""``python -m fgcli`` (what ``torchrun -m fgcli dump ...`` starts on every rank)."""

from fgcli.cli import main

main()
