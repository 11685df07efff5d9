"""File names as text: one rule for the manifest, output names, messages and the gallery.

A POSIX file name is bytes; Python holds an undecodable byte as a lone surrogate
(``surrogateescape``), which no UTF-8 writer accepts. So wherever a path leaves the
process as text, it goes through this module:

* :func:`text`: the path's bytes decoded as UTF-8, each byte that is not valid UTF-8
  written ``\\xNN`` (``bytes.decode("utf-8", "backslashreplace")`` of
  ``os.fsencode(path)``). Valid Unicode, readable, and the same string for every valid
  UTF-8 name. The manifest's ``input`` and ``key`` are this text; output files are named
  after the key, so every file the tree writes has a valid UTF-8 name.
* :func:`record_fields`: ``input``, plus ``input_bytes`` (base64 of the raw path bytes)
  only for names that needed escaping, so the original path is recoverable losslessly
  (:func:`path_of`; a real ``\\xff`` in a name and the escaped byte 0xff give the same
  text, the bytes tell them apart).
* :func:`display`: one printable line for messages (control characters, newlines
  included, written as escapes too).
* :func:`href`: a relative URL of the raw bytes, percent-encoded (the gallery's link to an
  original whose name is not UTF-8).
* :func:`fit`: output names whose components are longer than the file system allows
  (``NAME_MAX``, 255 bytes) are cut and end in a hash of the full component.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from typing import Any
from urllib.parse import quote

NAME_MAX = 255  # bytes in one path component (ext4, xfs, btrfs, APFS, NTFS in UTF-16 units)
_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 and C1 controls, DEL and the Unicode line and paragraph separators: a message stays
# one line, whatever the name holds
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def raw(path: str) -> bytes:
    """The bytes of an OS path string (``os.fsencode``; a lone surrogate that no byte
    decodes to, from elsewhere than the OS, is kept as its UTF-8 form)."""
    try:
        return os.fsencode(path)
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogatepass")


def text(path: str) -> str:
    """Valid Unicode text of a path: undecodable bytes as ``\\xNN``."""
    return raw(path).decode("utf-8", "backslashreplace")


def needs_bytes(path: str) -> bool:
    """True when the path's text is not the path itself (a name that is not UTF-8)."""
    return _SURROGATE.search(path) is not None


def record_fields(path: str, field: str = "input") -> dict[str, str]:
    """A manifest record's ``input`` (and ``input_bytes`` for names that are not UTF-8);
    ``field`` names another path the same way (run.json's ``cwd`` and ``cwd_bytes``)."""
    fields = {field: text(path)}
    if needs_bytes(path):
        fields[f"{field}_bytes"] = base64.b64encode(raw(path)).decode("ascii")
    return fields


def path_of(record: dict[str, Any], field: str = "input") -> str | None:
    """The OS path a record's ``input`` (or ``field``) names, from ``input_bytes`` when
    present; None when the record holds no readable path."""
    blob = record.get(f"{field}_bytes")
    if blob is not None:
        try:
            return os.fsdecode(base64.b64decode(str(blob), validate=True))
        except (ValueError, binascii.Error):
            return None
    value = record.get(field)
    return value if isinstance(value, str) else None


def display(name: str) -> str:
    """A name as one printable line for messages: :func:`text`, with control characters
    (newline, tab, escape, ...) written ``\\n``, ``\\t``, ``\\x1b``, ``\\u2028``."""
    return _CONTROL.sub(_escape, text(name))


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if char in named:
        return named[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(value: Any) -> Any:
    """``value`` with every string made valid Unicode (:func:`text` of any string that
    holds a lone surrogate), through dicts and lists: a record never carries a raw path
    into a UTF-8 writer, whatever message quoted it."""
    if isinstance(value, str):
        return text(value) if needs_bytes(value) else value
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def href(path: str) -> str:
    """A relative path as a URL: its raw bytes percent-encoded, ``/`` kept."""
    return quote(raw(path), safe="/")


def duplicate_key(key: str, path: str) -> str:
    """The key of an input whose key another input already has (it fails, writing
    nothing): the key, ``~dup-`` and 16 hex digits of a hash of its path, so its failed
    line is not taken for the other image's line (the manifest keeps one line per key)."""
    return f"{key}~dup-{hashlib.blake2b(raw(path), digest_size=8).hexdigest()}"


def fit(stem: str, reserve: int = 16) -> str:
    """An output stem (``a/b/c.jpg``) whose every component fits ``NAME_MAX`` bytes, the
    last one leaving ``reserve`` bytes for a suffix (``.png``, a thumbnail's ``.jpg``).

    A longer component keeps its first bytes and ends in ``~`` and 16 hex digits of its
    BLAKE2b hash (the same name every run, so resume finds it); others are unchanged.
    """
    parts = stem.split("/")
    for i, part in enumerate(parts):
        limit = NAME_MAX - (reserve if i == len(parts) - 1 else 0)
        data = part.encode("utf-8", "surrogatepass")
        if len(data) <= limit:
            continue
        digest = hashlib.blake2b(data, digest_size=8).hexdigest()
        head = data[:limit - len(digest) - 1].decode("utf-8", "ignore")
        parts[i] = f"{head}~{digest}"
    return "/".join(parts)
