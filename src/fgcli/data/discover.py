"""Finding images: walking directories, reading path lists, giving each input its key.

Discovery rules (documented in the README):

* a directory argument is walked recursively in sorted order; files whose
  extension Pillow reads are kept (case-insensitive); symlinked directories are
  followed once (loops are cut); a *directory* whose name has an image
  extension inside a walk (``x.png/``) is reported as a failure, not entered;
* a file argument is taken as it is, whatever its extension;
* ``-`` reads paths from stdin, ``--files-from FILE`` from a file, one per line
  (``--null``: NUL-separated, for names containing newlines).

Each input gets a *key*, the relative path its outputs mirror: relative to
the directory argument it was found in (prefixed with that directory's name
when several inputs are given), the file name for a file argument, and for
listed paths the path relative to the working directory (or the absolute
path without its root). Two inputs with the same key would overwrite each
other's outputs, so the second one fails.

Names are bytes on POSIX and any name the OS allows is taken: non-UTF-8 bytes, newlines,
control characters, leading dashes. ``Item.path`` is the OS string (undecodable bytes
held as surrogates, as ``os.fsdecode`` gives them; lists are read as bytes the same way),
and the key is valid Unicode text where each byte that is not UTF-8 is written ``\\xNN``
(:func:`fgcli.names.text`), so output files get valid UTF-8 names and a name is never
lost: the manifest's ``input`` is that text too, and ``input_bytes`` (base64 of the raw
path) is added for such names only (:func:`fgcli.names.record_fields`). A real
``\\xff`` in one name and the byte 0xff in another give the same key: the second fails
as above. A failure for a taken key (that one, or an unreadable input's) is recorded under
that key plus ``~dup-`` and a hash of its path (:func:`fgcli.names.duplicate_key`): the
manifest keeps one line per key, and both images keep theirs.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fgcli import names

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff",
     ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".pcx", ".sgi",
     ".qoi", ".dds", ".avif", ".heic"}
)


@dataclass(frozen=True)
class Item:
    """One input: where it is, the relative name its outputs mirror, or why it failed."""

    path: str
    key: str
    error: str | None = None


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def os_reason(exc: OSError) -> str:
    import errno

    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOENT:
        return "no such file (or a broken symlink)"
    return exc.strerror or str(exc)


def _walk(root: Path, prefix: str, seen: set[str]) -> Iterator[Item]:
    try:
        real = os.path.realpath(root)
        if real in seen:
            return  # a symlinked directory we already walked (or the output tree): skip
        seen.add(real)
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        yield Item(str(root), prefix or root.name, f"cannot list directory: {os_reason(exc)}")
        return
    for entry in entries:
        key = f"{prefix}/{entry.name}" if prefix else entry.name
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
            is_file = entry.is_file(follow_symlinks=True)
        except OSError as exc:
            is_dir = is_file = False
            if _is_image_name(entry.name):
                yield Item(str(path), key, os_reason(exc))
                continue
        if is_dir:
            if _is_image_name(entry.name):
                yield Item(str(path), key, "is a directory, not an image file (pass it as "
                                           "an argument of its own to process its contents)")
            else:
                yield from _walk(path, key, seen)
        elif _is_image_name(entry.name):
            if is_file:
                yield Item(str(path), key)
            elif entry.is_symlink():
                try:
                    os.stat(path)
                    reason = "not a regular file"
                except OSError as exc:
                    reason = os_reason(exc)
                yield Item(str(path), key, reason)
            else:
                yield Item(str(path), key, "not a regular file")


def _listed_key(path: str) -> str:
    p = Path(path)
    absolute = Path(os.path.abspath(p))
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return absolute.relative_to(absolute.anchor).as_posix()


def _read_list(stream: io.TextIOBase | Any, null: bool) -> Iterator[str]:
    """The paths of a list (one a line, or NUL-separated), read as bytes where the stream
    has them: a name that is not UTF-8 becomes the OS string ``os.fsdecode`` gives."""
    source = getattr(stream, "buffer", stream)
    read = getattr(source, "read1", None) or source.read  # what is there: lists may be endless
    sep = b"\0" if null else b"\n"
    buf = b""
    while True:
        chunk = read(65536)
        if not chunk:
            break
        buf += chunk if isinstance(chunk, bytes) else os.fsencode(chunk)
        *parts, buf = buf.split(sep)
        yield from _list_names(parts, null)
    yield from _list_names([buf], null)


def _list_names(parts: list[bytes], null: bool) -> Iterator[str]:
    """The OS paths of a list's entries; blank lines (not NUL-separated names) skipped."""
    for part in parts:
        if not null:
            part = part.rstrip(b"\r")
        if part.strip() if not null else part:
            yield os.fsdecode(part)


def _listed_item(path: str) -> Item:
    key = _listed_key(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        return Item(path, key, os_reason(exc))
    if os.path.isdir(path):
        return Item(path, key, "is a directory, not an image file")
    import stat as stat_mod

    if not stat_mod.S_ISREG(st.st_mode):
        return Item(path, key, "not a regular file")
    return Item(path, key)


def discover(inputs: Iterable[str], files_from: str | None = None, null: bool = False,
             stdin: Any = None, exclude: str | None = None,
             on_empty: Callable[[str], None] | None = None) -> Iterator[Item]:
    """Every input image in a deterministic order, lazily (a list may be endless).

    ``exclude``: a directory never walked into (the output tree, so that
    ``fullgrad dump . --out ./saliency`` does not read its own heatmaps back).
    ``on_empty``: told, in one line, of each input that yielded nothing (a directory
    without image files, an empty list).
    """
    inputs = list(inputs)
    several = len(inputs) + (files_from is not None) > 1
    used: dict[str, str] = {}

    def unique(item: Item) -> Item:
        item = Item(item.path, names.text(item.key), item.error)  # the module docstring
        other = used.get(item.key)
        if other is not None and other != item.path:  # its line must not replace the other's
            return Item(item.path, names.duplicate_key(item.key, item.path), item.error or
                        f"output name {item.key!r} is already used by {names.display(other)}")
        if item.error is None:  # an input that cannot be read claims no name
            used[item.key] = item.path
        return item

    def empty(what: str) -> None:
        if on_empty is not None:
            on_empty(what)

    for arg in inputs:
        count = 0
        if arg == "-":
            for path in _read_list(stdin if stdin is not None else sys.stdin, null):
                count += 1
                yield unique(_listed_item(path))
            if not count:
                empty("-: stdin listed no paths")
            continue
        p = Path(arg)
        if p.is_dir():
            prefix = p.resolve().name if several else ""
            skip = {os.path.realpath(exclude)} if exclude else set()
            for item in _walk(p, prefix, skip):
                count += 1
                yield unique(item)
            if not count:
                empty(f"{names.display(arg)}: no image files in this directory (extensions: "
                      ".jpg, .png, .webp, ... see the README)")
        else:
            item = _listed_item(arg)  # not a FIFO or device: reading one would hang
            yield unique(Item(item.path, p.name, item.error))
    if files_from is not None:
        try:
            fh = open(files_from, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            yield unique(Item(files_from, Path(files_from).name,
                              f"--files-from: {os_reason(exc)}"))
            return
        count = 0
        with fh:
            for path in _read_list(fh, null):
                count += 1
                yield unique(_listed_item(path))
        if not count:
            empty(f"--files-from {names.display(files_from)}: the file lists no paths")
