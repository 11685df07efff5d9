"""Errors that end a run before any image is processed. No torch here."""

from __future__ import annotations


class SetupError(Exception):
    """The run cannot start (missing or unloadable model or weights, offline, locked
    output): exit code 2, one line."""
