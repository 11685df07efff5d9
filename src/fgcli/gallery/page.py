"""The gallery's files: ``index.html`` (a jinja2 template) and ``gallery/``'s data and code.

The page reads its data from JavaScript files loaded with ``<script>`` tags, because a
page opened from ``file://`` may not ``fetch`` files beside it:

* ``gallery/data.js``: one compact array per image (key, status, original, error and
  one row per --topk rank: id, rank, class, probability, logit, residual, output stem,
  which outputs exist, the map's statistics and pointing game). Originals at
  ``originalPrefix + key`` are stored as 1, stems
  equal to the key as null; an original whose name is not UTF-8 as ``{href, text}``
  (its bytes percent-encoded, and :func:`fgcli.names.text`). About 95 bytes an image,
  handed over as one ``JSON.parse`` string (faster than an object literal): 100,000
  images are 9 MB, parsed in ~0.5 s.
  The grid shows one page of cards at a time. The map statistics (``stats``) and the
  pointing game (``objects.hit``, ``objects.energy``) add ~60 bytes an image when the
  records have them (4 significant digits; 99 -> 160 bytes, docs/gallery-bench.md).
  With ``OUT/report/report.json`` (``fullgrad report``), its classes too (:mod:`.classes`).
* ``gallery/records/NNNNN.js``: the full manifest records and decomposition terms of
  CHUNK entries each, loaded when the detail view opens one of them.
* ``gallery/app.js``, ``gallery/style.css``: the page's code, copied from the package.

Everything the page needs is inside the tree: no server, no network, no CDN.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fgcli.audit import STAT_NAMES
from fgcli.gallery.collect import Image, TermsCache
from fgcli.names import href, needs_bytes, text
from fgcli.tree.atomic import atomic_write, finite
from fgcli.tree.layout import FOLDER, SUFFIX

CHUNK = 200
ASSETS = ("app.js", "style.css")
# bits of an entry's mask: which outputs exist
MASK = {"overlay": 1, "heatmap": 2, "map": 4, "decomp": 8, "thumb": 16}
RUN_FIELDS = ("model", "weights", "source", "method", "psi", "layers", "target", "topk",
              "overlay", "device", "host", "finished", "merged", "counts")
STATS = STAT_NAMES  # a record's "stats" keys, in the order of an entry row's audit array
AUDIT_DIGITS = 4  # significant digits of the statistics in data.js
# objects.hit in data.js: the pointing game's outcome; "absent": the image has no box of
# the target's class (hit false, counted apart)
HIT, MISS, ABSENT = 1, 0, -1


def sig(x: Any, digits: int) -> float | None:
    """A float rounded to ``digits`` significant digits (compact JSON), None if absent or
    not finite (booleans are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _js(call: str, *args: Any) -> bytes:
    """``call(<args as JSON>);``: a script that hands its data to the page (records may
    hold NaN, which is JavaScript but not JSON)."""
    text = ",".join(json.dumps(a, separators=(",", ":"), ensure_ascii=True)
                    for a in args)
    return f"{call}({text});\n".encode("ascii")


def _js_parsed(call: str, value: Any) -> bytes:
    """``call(JSON.parse("..."));``: browsers parse a JSON string faster than the same
    object literal (at 100,000 images 0.49 s instead of 0.81 s, scripts/gallery_bench.py).
    Non-finite floats become null, as JSON has none."""
    text = json.dumps(finite(value), separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return f"{call}(JSON.parse({json.dumps(text)}));\n".encode("ascii")


def eval_summary(root: Path, data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The eval.json table (mean and standard error per method and metric), if any."""
    if not data or not isinstance(data.get("results"), dict):
        return None
    return {
        "ks": data.get("ks"), "metrics": data.get("metrics"), "images": len(
            data.get("images") or []), "command": data.get("command"),
        "results": data["results"],
        "plot": "eval.png" if (root / "eval.png").is_file() else None,
        "csv": "eval.csv" if (root / "eval.csv").is_file() else None,
    }


@dataclass
class _Tables:
    """The page's data, built image by image: one row per image, its maps' records in
    chunks of CHUNK, class names numbered in order of appearance."""

    root: Path
    terms: TermsCache
    classes: dict[str, int] = field(default_factory=dict)
    rows: list[list[Any]] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    next_id: int = 0
    maps: int = 0
    stats: bool = False  # some record has statistics
    objects: bool = False  # some record has the pointing game
    prefix: str | None = None  # originals that are <prefix><key> are stored as 1

    def add(self, image: Image) -> None:
        entries = [row for entry in image.entries if (row := self._entry(image, entry))]
        first = image.entries[0].record
        error = first.get("error") if image.status == "failed" else None
        path = image.original
        if (self.prefix is None and path and not needs_bytes(path)
                and path.endswith(image.key)):
            self.prefix = path[:len(path) - len(image.key)]
        self.rows.append([image.key, image.status, _original(image, self.prefix), error,
                          entries])

    def _entry(self, image: Image, entry: Any) -> list[Any] | None:
        """Store one map's record (and its terms) in the current chunk; its row in the
        image's list, or None for a failed one."""
        rec = entry.record
        ident = self.next_id
        self.next_id += 1
        if ident % CHUNK == 0:
            self.chunks.append({"records": [], "terms": []})
        chunk = self.chunks[-1]
        chunk["records"].append(rec)
        stem = entry.stem
        found = self.terms.get(stem, self.root / entry.paths["decomp"]) if (
            stem and "decomp" in entry.paths) else None
        chunk["terms"].append(found)
        if rec.get("status") == "failed":
            return None
        name = rec.get("target_name")
        cls = self.classes.setdefault(str(name), len(self.classes)) if name is not None else None
        mask = sum(bit for kind, bit in MASK.items() if kind in entry.paths)
        if entry.thumb:
            mask |= MASK["thumb"]
        row: list[Any] = [ident, rec.get("rank"), rec.get("target"), cls,
                          sig(rec.get("prob"), 4), sig(rec.get("logit"), 6),
                          sig(rec.get("residual"), 3),
                          None if stem == image.key else stem, mask]
        odd = {kind: p for kind, p in entry.paths.items()
               if p != f"{FOLDER[kind]}/{stem}{SUFFIX[kind]}"}
        audit = self._audit(rec)
        if audit is not None or odd:
            row.append(audit)
        if odd:
            row.append(odd)
        self.maps += 1
        return row

    def _audit(self, rec: dict[str, Any]) -> list[Any] | None:
        """An entry's statistics in STATS order, then (with ``objects``) its pointing
        game: hit as HIT, MISS or ABSENT, and the energy in the boxes; None when the
        record has neither (a tree from before them). Values that are not finite
        numbers (older or damaged records) become null."""
        stats = rec.get("stats")
        objects = rec.get("objects")
        if not isinstance(stats, dict) and not isinstance(objects, dict):
            return None
        out: list[Any] = [None] * len(STATS)
        if isinstance(stats, dict):
            self.stats = True
            out = [sig(stats.get(name), AUDIT_DIGITS) for name in STATS]
        if isinstance(objects, dict):
            self.objects = True
            hit = objects.get("hit")
            out.append(ABSENT if objects.get("match") == "absent" else
                       None if not isinstance(hit, bool) else HIT if hit else MISS)
            out.append(sig(objects.get("energy"), AUDIT_DIGITS))
        return out


def write_page(root: Path, images: list[Image], run: dict[str, Any],
               evaluation: dict[str, Any] | None, terms: TermsCache, title: str,
               report: dict[str, Any] | None = None) -> int:
    """Write data.js, the record chunks, the assets and index.html; returns the number
    of maps on the page. ``report``: the class view's data (:func:`.classes.class_view`)."""
    tables = _Tables(root, terms)
    for image in images:
        tables.add(image)
    gallery = root / "gallery"
    data = {
        "schema": 1, "title": title, "chunk": CHUNK,
        "run": {k: run.get(k) for k in RUN_FIELDS},  # None where run.json has no such key
        "classes": list(tables.classes), "layers": terms.tables, "eval": evaluation,
        "originalPrefix": tables.prefix,
        # the names of an entry's audit values (then hit and energy), and whether any
        # record has statistics / the pointing game (the page offers them only then)
        "stats": list(STATS), "audit": {"stats": tables.stats, "objects": tables.objects},
        "report": report,
        "images": tables.rows,
    }
    blob = _js_parsed("fgcliData", data)
    atomic_write(gallery / "data.js", lambda fh: fh.write(blob))
    _write_chunks(gallery / "records", tables.chunks)
    package = resources.files("fgcli.gallery") / "assets"
    for asset in ASSETS:
        blob = (package / asset).read_bytes()
        atomic_write(gallery / asset, lambda fh, b=blob: fh.write(b))
    blob = _render_index(title, data, images).encode("utf-8")
    atomic_write(root / "index.html", lambda fh: fh.write(blob))
    return tables.maps


def _write_chunks(records: Path, chunks: list[dict[str, Any]]) -> None:
    """One script file per chunk of records; chunk files of an earlier, longer page go."""
    names = set()
    for n, chunk in enumerate(chunks):
        name = f"{n:05d}.js"
        names.add(name)
        blob = _js("fgcliChunk", n, chunk)
        atomic_write(records / name, lambda fh, b=blob: fh.write(b))
    if records.is_dir():
        for old in records.iterdir():
            if old.name not in names:
                old.unlink(missing_ok=True)


def _original(image: Image, prefix: str | None) -> str | int | dict[str, str] | None:
    """An image's original in data.js: 1 for ``prefix + key`` (the usual case: the tree
    mirrors the input folder), else its path; a path that is not UTF-8 as
    ``{"href": its percent-encoded bytes, "text": readable}`` (JavaScript strings cannot
    carry the bytes)."""
    path = image.original
    if path is None:
        return None
    if needs_bytes(path):
        return {"href": href(path), "text": text(path)}
    return 1 if prefix is not None and path == prefix + image.key else path


def _render_index(title: str, data: dict[str, Any], images: list[Image]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fgcli.gallery", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True,
        lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    for image in images:
        counts[image.status] = counts.get(image.status, 0) + 1
    return env.get_template("index.html.j2").render(
        title=title, run=data["run"], counts=counts, images=len(images),
        has_eval=data["eval"] is not None, has_report=data["report"] is not None)
