"""The files of ``OUT/report/``: classes.csv, offobject.csv, report.json and index.html,
each written whole (:func:`fgcli.tree.atomic.atomic_write`)."""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fgcli.report.accumulate import STATS
from fgcli.tree.atomic import atomic_write, finite

LISTS = {
    "border": ("Highest border mass", "stats.border: the share of m+ in the outer 10 %"),
    "energy": ("Lowest energy in the boxes", ("objects.energy: the share of m+ inside the "
                                             "boxes used")),
    "misses": ("Pointing misses, most confident first", ("the peak missed every box "
                                                       "used; value: prob")),
}


def _cell(value: Any) -> str:
    """A CSV cell: 6 significant digits for floats, empty for null."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _csv(rows: list[list[Any]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return text.getvalue().encode("utf-8")


def classes_csv(classes: list[dict[str, Any]]) -> bytes:
    """One row per class: target, name, records, <stat>_mean, <stat>_std, located, hits,
    pointing, pointing_se, energy_mean, energy_se, absent."""
    head = ["target", "name", "records"]
    for stat in STATS:
        head += [f"{stat}_mean", f"{stat}_std"]
    head += ["located", "hits", "pointing", "pointing_se", "energy_mean", "energy_se", "absent"]
    rows: list[list[Any]] = [head]
    for c in classes:
        row = [c["target"], c["name"], c["records"]]
        for stat in STATS:
            row += [c["mean"][stat], c["std"][stat]]
        row += [c["located"], c["hits"], c["pointing"], c["pointing_se"], c["energy"],
                c["energy_se"], c["absent"]]
        rows.append(row)
    return _csv(rows)


def offobject_csv(lists: dict[str, list[dict[str, Any]]]) -> bytes:
    """One row per list entry: list, position (1 first), key, rank, target, target_name,
    value, prob, link."""
    rows: list[list[Any]] = [["list", "position", "key", "rank", "target", "target_name",
                              "value", "prob", "link"]]
    for name, entries in lists.items():
        for i, e in enumerate(entries, 1):
            rows.append([name, i, e["key"], e["rank"], e["target"], e["target_name"],
                         e["value"], e["prob"], e["link"]])
    return _csv(rows)


def report_json(data: dict[str, Any]) -> bytes:
    return (json.dumps(finite(data), ensure_ascii=False, allow_nan=False, indent=1)
            + "\n").encode("utf-8")


def write_files(folder: Path, data: dict[str, Any], notes: list[str]) -> None:
    """classes.csv, offobject.csv, report.json and index.html into ``folder``."""
    atomic_write(folder / "classes.csv", lambda fh: fh.write(classes_csv(data["classes"])))
    atomic_write(folder / "offobject.csv", lambda fh: fh.write(offobject_csv(data["lists"])))
    atomic_write(folder / "report.json", lambda fh: fh.write(report_json(data)))
    page = page_html(data, notes).encode("utf-8")
    atomic_write(folder / "index.html", lambda fh: fh.write(page))


_STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{padding:2px 8px;border-bottom:1px
solid #ddd;text-align:right}td.l,th.l{text-align:left}img.t{height:48px;vertical-align:middle}
.note{color:#a40}"""


def _num(value: Any, digits: int = 3) -> str:
    return "" if value is None else (f"{value:.{digits}g}" if isinstance(value, float)
                                     else str(value))


def page_html(data: dict[str, Any], notes: list[str]) -> str:
    """The static page: summary, notes, the class-mean grid, the three lists (linked
    into the gallery) and the class table. Opens from disk."""
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             "<title>fullgrad report</title><style>", _STYLE, "</style></head><body>",
             "<h1>fullgrad report</h1>",
             (f"<p>{data['records']} records, {data['images']} images, {data['failed']} "
             f"failed; {len(data['classes'])} classes. <a href='../index.html'>Gallery</a>"
             " &middot; <a href='classes.csv'>classes.csv</a> &middot; "
             "<a href='offobject.csv'>offobject.csv</a> &middot; "
             "<a href='report.json'>report.json</a></p>")]
    parts += [f"<p class='note'>{esc(n)}</p>" for n in notes]
    if data.get("grid"):
        parts.append("<h2>Class-mean maps</h2><p><img src='class_means.png' "
                     "alt='class-mean maps'></p>")
    for name, (title, what) in LISTS.items():
        parts.append(f"<h2 id='{name}'>{esc(title)}</h2><p>{esc(what)}</p>")
        parts.append(_list_table(data["lists"][name]))
    parts.append("<h2 id='classes'>Classes</h2>")
    parts.append(_class_table(data["classes"]))
    parts.append("</body></html>\n")
    return "".join(parts)


def _list_table(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "<p>(none)</p>"
    esc = html.escape
    rows = [("<table><tr><th>#</th><th></th><th class='l'>image</th><th>rank</th>"
            "<th class='l'>class</th><th>value</th><th>prob</th></tr>")]
    for i, e in enumerate(entries, 1):
        pic = (f"<img class='t' loading='lazy' alt='' src='../{esc(quote(e['picture']))}'>"
               if e.get("picture") else "")
        rows.append(f"<tr><td>{i}</td><td>{pic}</td><td class='l'><a href='{esc(e['link'])}'>"
                    f"{esc(e['key'])}</a></td><td>{_num(e['rank'])}</td><td class='l'>"
                    f"{esc(str(e['target_name'] or e['target']))}</td>"
                    f"<td>{_num(e['value'])}</td><td>{_num(e['prob'])}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _class_table(classes: list[dict[str, Any]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(s)}</th>" for s in STATS)
    rows = [(f"<table><tr><th>target</th><th class='l'>name</th><th>records</th>{head}"
            "<th>pointing</th><th>&plusmn;</th><th>energy</th><th>&plusmn;</th>"
            "<th>absent</th></tr>")]
    for c in classes:
        stats = "".join(f"<td>{_num(c['mean'][s])}</td>" for s in STATS)
        rows.append(f"<tr><td>{c['target']}</td><td class='l'>{esc(c['name'])}</td>"
                    f"<td>{c['records']}</td>{stats}<td>{_num(c['pointing'])}</td>"
                    f"<td>{_num(c['pointing_se'])}</td><td>{_num(c['energy'])}</td>"
                    f"<td>{_num(c['energy_se'])}</td><td>{c['absent']}</td></tr>")
    rows.append("</table>")
    return "".join(rows)
