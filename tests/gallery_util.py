"""Output trees for the gallery tests: a real dump, and large synthetic trees built from it."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from helpers import PHOTOS, SQUEEZENET, cli, manifest

# a name that needs escaping in HTML and in URLs
ODD = "odd names/50% <b>cup #1 & 'q'.png"


def real_tree(root: Path, *extra: str) -> tuple[Path, Any]:
    """`fullgrad dump` of the six photos, one with an odd name, and a broken file, with
    the real squeezenet weights at 64 px (fast); returns (tree, the CLI result)."""
    imgs = root / "imgs"
    imgs.mkdir(parents=True)
    for photo in sorted(PHOTOS.iterdir()):
        shutil.copy(photo, imgs / photo.name)
    (imgs / ODD).parent.mkdir(parents=True)
    shutil.copy(PHOTOS / "coffee.png", imgs / ODD)
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = root / "out"
    result = cli("dump", str(imgs), *SQUEEZENET, "--workers", "0", "--out", str(out),
                 "--save", "heatmap,overlay,decomp", *extra)
    return out, result


def read_js(path: Path) -> list[Any]:
    """The arguments of the one call a gallery data script makes."""
    text = path.read_text("ascii").strip()
    _, _, body = text.partition("(")
    return json.loads("[" + body.removesuffix(");") + "]")


def page_data(tree: Path) -> dict[str, Any]:
    """What gallery/data.js hands the page: ``fgcliData(JSON.parse("<json>"));``."""
    text = (tree / "gallery" / "data.js").read_text("ascii").strip()
    head, tail = "fgcliData(JSON.parse(", "));"
    assert text.startswith(head) and text.endswith(tail), text[:80]
    return json.loads(json.loads(text[len(head):-len(tail)]))


def synthetic_tree(source: Path, dest: Path, n: int, seed: int = 0) -> Path:
    """A tree of ``n`` images made from a real tree's records and files (no model run):
    nested keys, random classes, probabilities and residuals, 1 in 50 failed; no
    statistics or pointing-game fields, as an older dump's (:func:`add_audit` adds them)."""
    rng = random.Random(seed)
    recs = [r for r in manifest(source) if r["status"] == "ok" and r.get("rank") in (None, 1)]
    dest.mkdir(parents=True)
    shutil.copy(source / "run.json", dest / "run.json")
    lines = []
    for i in range(n):
        key = f"set{i % 7}/img_{i:05d}.jpg"
        if i % 50 == 49:
            lines.append({"schema": 1, "input": key, "key": key, "status": "failed",
                          "error": "corrupt image: synthetic", "outputs": {}, "rank": None,
                          "time": "2026-01-01T00:00:00.000+00:00"})
            continue
        base = {k: v for k, v in recs[i % len(recs)].items() if k not in ("stats", "objects")}
        outputs = {}
        for kind, rel in base["outputs"].items():
            if kind == "decomp":
                continue
            folder, _, name = rel.partition("/")
            new = f"{folder}/{key}{name[len(base['key']):]}"
            (dest / new).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / rel, dest / new)
            outputs[kind] = new
        cls = rng.randrange(40)
        lines.append(dict(base, input=key, key=key, outputs=outputs, target=cls,
                          target_name=f"class {cls:02d}", prob=rng.random(),
                          residual=rng.uniform(-1e-5, 1e-5), logit=rng.uniform(5, 30),
                          time="2026-01-01T00:00:00.000+00:00"))
    (dest / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return dest


def stem_of(row: list[Any], entry: list[Any]) -> str:
    """An entry's output stem as the page derives it (null: the image's key)."""
    return row[0] if entry[7] is None else entry[7]


def original_of(data: dict[str, Any], row: list[Any]) -> str | None:
    """An image's original, relative to the tree, as the page derives it."""
    return data["originalPrefix"] + row[0] if row[2] == 1 else row[2]


# ------------------------------------------------------------- statistics and classes
STATS = ("peak_x", "peak_y", "com_x", "com_y", "concentration", "entropy", "border",
         "centre")


def add_audit(tree: Path, seed: int = 0, without: int = 0) -> list[dict[str, Any]]:
    """Give the tree's ok records ``stats`` and (3 in 4 of them) ``objects`` as a dump
    with --boxes writes them (spec20.md), hand-made and seeded; every ``without``-th ok
    record keeps neither (as in an older tree); returns the new records."""
    rng = random.Random(seed)
    recs = manifest(tree)
    matches = ("class", "any", "absent", None)
    n = 0
    for rec in recs:
        if rec["status"] != "ok":
            continue
        n += 1
        rec.pop("stats", None)  # this version's dump writes stats: replaced by these
        rec.pop("objects", None)
        if without and n % without == 0:
            continue
        rec["stats"] = {
            "peak_x": rng.randrange(300) + 0.5, "peak_y": rng.randrange(200) + 0.5,
            "com_x": round(rng.uniform(0, 300), 4), "com_y": round(rng.uniform(0, 200), 4),
            "concentration": round(rng.uniform(0.01, 0.5), 6),
            "entropy": round(rng.uniform(0.3, 1), 6), "border": round(rng.random() * 0.5, 6),
            "centre": round(rng.random(), 6)}
        match = matches[n % 4]
        if match is None:
            continue  # no annotation for this image
        hit = False if match == "absent" else rng.random() < 0.6
        rec["objects"] = {
            "source": "boxes", "match": match, "boxes": 1 if match != "absent" else 0,
            "hit": hit, "energy": 0.0 if match == "absent" else round(rng.random(), 6),
            "box": 0 if hit else None, "label": "x" if hit else None, "tolerance": 15.0}
    (tree / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def write_report(tree: Path, tile: int = 8, columns: int = 3, gap: int | None = None,
                 label: int | None = None) -> dict[str, Any]:
    """A report/report.json (schema 1, spec20.md) over the tree's ok records, with a
    class_means.png of solid tiles (class i: gray level 40 * i + 20) ``gap`` pixels apart
    with a ``label`` band (black) below each (None: no such key in grid, as 0), and
    report/index.html; returns the report."""
    from PIL import Image as PILImage

    by_class: dict[int, list[dict[str, Any]]] = {}
    for rec in manifest(tree):
        if rec["status"] == "ok":
            by_class.setdefault(rec["target"], []).append(rec)
    classes = []
    for i, (target, recs) in enumerate(sorted(by_class.items())):
        located = [r["objects"] for r in recs
                   if r.get("objects") and r["objects"]["match"] != "absent"]
        hits = sum(o["hit"] for o in located)
        means = {s: sum(r["stats"][s] for r in recs) / len(recs)
                 for s in STATS if all("stats" in r for r in recs)}
        classes.append({
            "target": target, "name": recs[0]["target_name"], "records": len(recs),
            "mean": means, "std": {s: 0.1 for s in means}, "located": len(located),
            "hits": hits, "pointing": hits / len(located) if located else None,
            "pointing_se": 0.1 if located else None,
            "energy": (sum(o["energy"] for o in located) / len(located)) if located else None,
            "energy_se": 0.01 if located else None,
            "absent": sum(1 for r in recs if (r.get("objects") or {}).get("match") == "absent"),
            "tile": [i // columns, i % columns]})
    rows = -(-len(classes) // columns)
    g, band = gap or 0, label or 0
    grid = PILImage.new("L", (g + columns * (tile + g), g + rows * (tile + band + g)))
    for i in range(len(classes)):
        x, y = g + i % columns * (tile + g), g + i // columns * (tile + band + g)
        grid.paste((40 * i + 20) % 256, (x, y, x + tile, y + tile))
    folder = tree / "report"
    folder.mkdir(exist_ok=True)
    grid.save(folder / "class_means.png")
    (folder / "index.html").write_text("<!DOCTYPE html><title>report</title>")
    report = {"schema": 1, "records": sum(c["records"] for c in classes),
              "images": len({r["key"] for r in manifest(tree)}), "failed": 0,
              "stats": list(STATS), "classes": classes,
              "grid": {"file": "class_means.png", "tile": tile, "columns": columns,
                       **({} if gap is None else {"gap": gap}),
                       **({} if label is None else {"label": label})},
              "lists": {"border": [], "energy": [], "misses": []}}
    (folder / "report.json").write_text(json.dumps(report))
    return report
