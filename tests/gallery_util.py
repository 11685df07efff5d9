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
    nested keys, random classes, probabilities and residuals, 1 in 50 failed."""
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
        base = recs[i % len(recs)]
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
