"""The gallery's class view: ``OUT/report/report.json`` (written by ``fullgrad report``)
read at build time and embedded in ``gallery/data.js``.

Only what the view shows is kept, rounded like the image rows: per class its target,
name, counts, pointing accuracy and energy (with standard errors), the mean and standard
deviation of every statistic (in :data:`.page.STATS` order) and its tile in
``report/class_means.png``. A report.json that is not what ``fullgrad report`` writes
(schema 1) is ignored with a warning: the gallery never fails for it.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from fgcli.gallery.page import AUDIT_DIGITS, STATS, sig

REPORT_DIR = "report"
REPORT_JSON = "report.json"
COUNTS = ("records", "located", "hits", "absent")
NUMBERS = ("pointing", "pointing_se", "energy", "energy_se")


class MalformedReport(Exception):
    """report.json is not what ``fullgrad report`` writes (one line: what is wrong)."""


def class_view(root: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The class view's data (None without a usable report.json) and warnings (one
    line each, naming the file)."""
    path = root / REPORT_DIR / REPORT_JSON
    if not path.exists():
        return None, []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        view = _view(data)
    except (OSError, ValueError, MalformedReport) as err:  # ValueError: JSON, UTF-8
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return None, [f"{path}: {reason}; the gallery has no class view"]
    warnings = []
    grid = view["grid"]
    if grid is not None and not (root / grid["file"]).is_file():
        warnings.append(f"{root / grid['file']}: missing; the class view has no tiles")
        view["grid"] = None
    index = root / REPORT_DIR / "index.html"
    view["index"] = f"{REPORT_DIR}/index.html" if index.is_file() else None
    return view, warnings


def _view(data: Any) -> dict[str, Any]:
    """Check and compact a parsed report.json; MalformedReport (one line) when it is not
    schema 1's shape."""
    if not isinstance(data, dict):
        raise MalformedReport("not a JSON object")
    if data.get("schema") != 1:
        raise MalformedReport(f"schema {data.get('schema')!r}, expected 1")
    classes = data.get("classes")
    if not isinstance(classes, list):
        raise MalformedReport("'classes' is not a list")
    return {"classes": [_class(i, c) for i, c in enumerate(classes)],
            "grid": _grid(data.get("grid")),
            **{k: _count(data, k, k) for k in ("records", "images", "failed")}}


def _class(i: int, c: Any) -> dict[str, Any]:
    """One class's row of the view."""
    where = f"classes[{i}]"
    if not isinstance(c, dict):
        raise MalformedReport(f"{where} is not an object")
    target = c.get("target")
    if not _is_int(target):
        raise MalformedReport(f"{where}.target is not an integer")
    name = c.get("name")
    if name is not None and not isinstance(name, str):
        raise MalformedReport(f"{where}.name is not a string")
    row: dict[str, Any] = {"target": target, "name": name}
    row.update({k: _count(c, k, f"{where}.{k}") for k in COUNTS})
    row.update({k: _number(c.get(k), f"{where}.{k}") for k in NUMBERS})
    for part in ("mean", "std"):
        values = c.get(part) or {}
        if not isinstance(values, dict):
            raise MalformedReport(f"{where}.{part} is not an object")
        row[part] = [_number(values.get(s), f"{where}.{part}.{s}") for s in STATS]
    tile = c.get("tile")
    if tile is not None and not (isinstance(tile, list) and len(tile) == 2 and all(
            _is_int(t) and t >= 0 for t in tile)):
        raise MalformedReport(f"{where}.tile is not [row, column]")
    row["tile"] = tile
    return row


def _grid(grid: Any) -> dict[str, Any] | None:
    """The class-mean grid: its file (relative to the tree), tile size, columns, and the
    optional ``gap`` between tiles and ``label`` band below each (0 when absent): the
    tile at [row, col] starts at (gap + col (tile + gap), gap + row (tile + label + gap))."""
    if grid is None:
        return None
    if not isinstance(grid, dict):
        raise MalformedReport("'grid' is not an object or null")
    file, tile, columns = grid.get("file"), grid.get("tile"), grid.get("columns")
    if not isinstance(file, str) or not file:
        raise MalformedReport("grid.file is not a file name")
    rel = PurePosixPath(file)
    if rel.is_absolute() or ".." in rel.parts or "\\" in file:
        raise MalformedReport(f"grid.file {file!r} leads outside {REPORT_DIR}/")
    if not (_is_int(tile) and tile > 0 and _is_int(columns) and columns > 0):
        raise MalformedReport("grid.tile and grid.columns are not positive integers")
    gap, label = grid.get("gap", 0), grid.get("label", 0)
    if not (_is_int(gap) and gap >= 0 and _is_int(label) and label >= 0):
        raise MalformedReport("grid.gap and grid.label are not counts of pixels")
    return {"file": f"{REPORT_DIR}/{rel.as_posix()}", "tile": tile, "columns": columns,
            "gap": gap, "label": label}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _count(obj: dict[str, Any], key: str, where: str) -> int | None:
    """A count: a non-negative integer, or None when missing or null."""
    x = obj.get(key)
    if x is None:
        return None
    if not _is_int(x) or x < 0:
        raise MalformedReport(f"{where} is not a count")
    return int(x)


def _number(x: Any, where: str) -> float | None:
    """A number rounded for the page, or None for a missing, null or non-finite one."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise MalformedReport(f"{where} is not a number")
    return sig(x, AUDIT_DIGITS)
