"""`fullgrad report OUT`: per-class statistics against NumPy, the class-mean grid, the
off-object lists and their links, sharded and running trees, failures, the CLI."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from helpers import PHOTOS, SQUEEZENET, cli, one_error_line
from PIL import Image

from fgcli.gallery.collect import latest_records
from fgcli.render import colormap_table
from fgcli.report import accumulate, write_report
from fgcli.report.accumulate import STATS
from fgcli.report.grid import COLORMAP, tile_origin, to_grid
from fgcli.report.scan import LatestRecords, stamp_code, winners
from fgcli.tree.manifest import BadLines, Latest

T0 = "2026-01-01T00:00:00.000+00:00"
T1 = "2026-01-02T00:00:00.000+00:00"


def rec(key: str, target: int = 1, status: str = "ok", rank: int | None = None,
        time: str = T0, **fields) -> dict:
    """A manifest line as the dump writes it (only the fields the report reads)."""
    if status == "failed":
        return {"schema": 1, "key": key, "input": key, "status": "failed", "rank": rank,
                "error": "synthetic", "outputs": {}, "time": time}
    return {"schema": 1, "key": key, "input": key, "status": status, "rank": rank,
            "target": target, "target_name": f"class {target}", "prob": 0.5,
            "outputs": {}, "time": time, **fields}


def write_lines(path: Path, lines: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(x if isinstance(x, str) else json.dumps(x) + "\n" for x in lines))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def report_json(out: Path) -> dict:
    return json.loads((out / "report" / "report.json").read_text("utf-8"))


# -- per-class statistics -------------------------------------------------------------

def _random_records(n: int, seed: int) -> list[dict]:
    """Records of three classes with every stat (some null, some records without stats)
    and objects of every kind of match."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        fields: dict = {}
        if i % 9 != 8:  # some records of an older dump: no stats at all
            fields["stats"] = {s: (None if rng.random() < 0.1 else
                                   round(rng.uniform(100, 101) if s.startswith("peak")
                                         else rng.random(), 6)) for s in STATS}
        if i % 4 != 3:  # some images without an annotation
            match = rng.choice(("class", "any", "absent"))
            fields["objects"] = {
                "source": "boxes", "match": match, "boxes": 1,
                "hit": match != "absent" and rng.random() < 0.5,
                "energy": (0.0 if match == "absent" else
                           None if rng.random() < 0.1 else round(rng.random(), 6)),
                "box": None, "label": None, "tolerance": 15.0}
        out.append(rec(f"img{i:03d}.jpg", target=rng.choice((3, 7, 281)), **fields))
    return out


def _expected(records: list[dict], target: int) -> dict:
    """One class's row computed directly with NumPy."""
    mine = [r for r in records if r["target"] == target]
    row: dict = {"records": len(mine)}
    for s in STATS:
        x = np.array([r["stats"][s] for r in mine
                      if r.get("stats") and r["stats"][s] is not None], dtype=np.float64)
        row[f"{s}_mean"] = x.mean() if len(x) else None
        row[f"{s}_std"] = x.std(ddof=1) if len(x) > 1 else None
    located = [r["objects"] for r in mine if r.get("objects", {}).get("match") in ("class", "any")]
    hits = sum(o["hit"] for o in located)
    p = hits / len(located)
    energy = np.array([o["energy"] for o in located if o["energy"] is not None])
    row.update(located=len(located), hits=hits, pointing=p,
               pointing_se=math.sqrt(p * (1 - p) / len(located)),
               energy_mean=energy.mean(), energy_se=energy.std(ddof=1) / math.sqrt(len(energy)),
               absent=sum(r.get("objects", {}).get("match") == "absent" for r in mine))
    return row


@pytest.mark.parametrize("chunk", [7, 8192])  # folded in many chunks, or in one
def test_class_rows_match_numpy(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(accumulate, "_CHUNK", chunk)
    records = _random_records(150, seed=1)
    write_lines(tmp_path / "manifest.jsonl", records)
    calls = []
    summary = write_report(tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (150, 150)
    assert (summary.records, summary.images, summary.classes) == (150, 150, 3)
    assert summary.with_stats == sum("stats" in r for r in records)
    rows = read_csv(tmp_path / "report" / "classes.csv")
    assert [r["target"] for r in rows] == ["3", "7", "281"]  # by target
    assert list(rows[0])[:5] == ["target", "name", "records", "peak_x_mean", "peak_x_std"]
    assert list(rows[0])[-7:] == ["located", "hits", "pointing", "pointing_se",
                                  "energy_mean", "energy_se", "absent"]
    data = {c["target"]: c for c in report_json(tmp_path)["classes"]}
    for row in rows:
        target = int(row["target"])
        want = _expected(records, target)
        got = data[target]
        assert row["name"] == got["name"] == f"class {target}"
        for column, value in want.items():
            assert float(row[column]) == pytest.approx(value, rel=1e-5, abs=1e-12), column
        for s in STATS:  # report.json: full precision
            assert got["mean"][s] == pytest.approx(want[f"{s}_mean"], rel=1e-12)
            assert got["std"][s] == pytest.approx(want[f"{s}_std"], rel=1e-9)
        assert got["pointing_se"] == pytest.approx(want["pointing_se"], rel=1e-12)
        assert got["energy_se"] == pytest.approx(want["energy_se"], rel=1e-9)
        assert (got["located"], got["hits"], got["absent"]) == (
            want["located"], want["hits"], want["absent"])


def test_one_record_has_no_spread_and_no_objects_leave_pointing_empty(tmp_path):
    write_lines(tmp_path / "manifest.jsonl", [rec("a.jpg", stats={"border": 0.25})])
    write_report(tmp_path)
    row = read_csv(tmp_path / "report" / "classes.csv")[0]
    assert (row["border_mean"], row["border_std"], row["peak_x_mean"]) == ("0.25", "", "")
    assert row["pointing"] == row["pointing_se"] == row["energy_mean"] == ""
    c = report_json(tmp_path)["classes"][0]
    assert c["pointing"] is None and c["energy"] is None and c["std"]["border"] is None


# -- the class-mean grid ---------------------------------------------------------------

def test_to_grid_keeps_the_mass_above_the_minimum_by_area():
    m = np.full((3, 3), -5.0, np.float32)  # the minimum: no mass
    m[0, 0], m[1, 1], m[2, 2] = -1.0, -3.0, -3.0  # masses 4, 2, 2
    grid = to_grid(m, 2)
    # cells cover 1.5 pixels a side: the centre pixel splits in four, corners stay whole
    assert grid == pytest.approx(np.array([[0.5 + 0.0625, 0.0625],
                                           [0.0625, 0.25 + 0.0625]]))
    assert grid.sum() == pytest.approx(1.0)
    assert to_grid(np.full((4, 4), -1.0), 2) is None  # a constant map has no mass
    assert to_grid(np.arange(24.0).reshape(1, 6, 4), 3).sum() == pytest.approx(1.0)  # any aspect


def _tree_with_maps(root: Path) -> None:
    """Class 5 with a hot-corner map and an anti-diagonal one; class 9 with a constant map
    (no mass: unusable); one record whose map file is missing."""
    (root / "maps").mkdir(parents=True)
    hot = np.full((4, 4), -1.0, np.float32)
    hot[0, 0], hot[3, 3] = 3.0, 1.0
    np.save(root / "maps" / "a.npy", hot)
    np.save(root / "maps" / "b.npy", np.array([[0, 1], [1, 0]], np.float32))
    np.save(root / "maps" / "c.npy", -np.ones((4, 4), np.float32))
    write_lines(root / "manifest.jsonl", [
        rec("a.jpg", 5, outputs={"map": "maps/a.npy"}),
        rec("b.jpg", 5, outputs={"map": "maps/b.npy"}),
        rec("c.jpg", 9, outputs={"map": "maps/c.npy"}),
        rec("d.jpg", 9, outputs={"map": "maps/gone.npy"})])


def test_grid_tiles_show_the_class_mean(tmp_path):
    _tree_with_maps(tmp_path)
    summary = write_report(tmp_path, grid=2)
    assert (summary.maps, summary.maps_unusable) == (2, 2)
    data = report_json(tmp_path)
    grid = data["grid"]
    assert grid["file"] == "class_means.png" and grid["cells"] == 2 and grid["tile"] == 96
    five, nine = data["classes"]
    assert (five["maps"], five["tile"], nine["maps"], nine["tile"]) == (2, [0, 0], 0, None)
    # masses above the minimum: a: 4 and 2 in opposite corners; b: .5 off the diagonal;
    # mean of [[2/3, 0], [0, 1/3]] and [[0, .5], [.5, 0]]: [[1/3, 1/4], [1/4, 1/6]];
    # min-max over the tile: [[1, .5], [.5, 0]] -> colormap indices [[255, 128], [128, 0]]
    lut = colormap_table(COLORMAP)
    png = np.asarray(Image.open(tmp_path / "report" / "class_means.png").convert("RGB"))
    x0, y0 = tile_origin(0, 0, grid["tile"])
    half = grid["tile"] // 2
    for (r, c), index in {(0, 0): 255, (0, 1): 128, (1, 0): 128, (1, 1): 0}.items():
        block = png[y0 + r * half:y0 + (r + 1) * half, x0 + c * half:x0 + (c + 1) * half]
        assert (block == lut[index]).all(), (r, c)
    assert any("2 map file(s) missing" in n for n in summary.notes)


def test_tree_without_maps_skips_the_grid_with_a_note(tmp_path):
    _tree_with_maps(tmp_path)
    write_report(tmp_path)
    assert (tmp_path / "report" / "class_means.png").is_file()
    write_lines(tmp_path / "manifest.jsonl", [rec("a.jpg"), rec("b.jpg", 2)])
    summary = write_report(tmp_path)
    assert not summary.grid and report_json(tmp_path)["grid"] is None
    assert not (tmp_path / "report" / "class_means.png").exists()  # the old one is gone
    assert "no record names a map file (dump --save map): class_means.png skipped" in (
        summary.notes)
    assert "<img src='class_means.png'" not in (tmp_path / "report" / "index.html").read_text()


# -- the off-object lists ------------------------------------------------------------------

ODD = "odd dir/50% <b>#1&'q'.jpg"


def _objects(match: str, hit: bool, energy: float | None) -> dict:
    return {"source": "boxes", "match": match, "boxes": 1, "hit": hit, "energy": energy,
            "box": None, "label": None, "tolerance": 15.0}


def test_lists_order_ties_and_links(tmp_path):
    (tmp_path / "heatmaps").mkdir()
    (tmp_path / "heatmaps" / "b.png").write_bytes(b"png")
    write_lines(tmp_path / "manifest.jsonl", [
        rec("a.jpg", stats={"border": 0.2}, prob=0.9, objects=_objects("class", False, 0.3)),
        rec("b.jpg", stats={"border": 0.7}, prob=0.2, objects=_objects("any", False, 0.1),
            outputs={"heatmap": "heatmaps/b.png"}),
        rec(ODD, rank=2, stats={"border": 0.7}, prob=0.95,
            objects=_objects("class", True, 0.05)),
        rec("c.jpg", stats={"border": 0.1}, prob=0.99, objects=_objects("absent", False, 0.0)),
        rec("d.jpg", stats={"border": None}, prob=0.5, objects=_objects("class", False, None)),
        rec("e.jpg", prob=0.6, objects=_objects("class", False, 0.2),
            outputs={"heatmap": "heatmaps/missing.png"}),
    ])
    write_report(tmp_path, top=2)
    lists = report_json(tmp_path)["lists"]
    # border: highest first, the tie by key; energy: lowest of the boxes used (absent:
    # not); misses: located misses by prob, highest first
    assert [e["key"] for e in lists["border"]] == ["b.jpg", ODD]
    assert [e["value"] for e in lists["border"]] == [0.7, 0.7]
    assert [e["key"] for e in lists["energy"]] == [ODD, "b.jpg"]
    assert [e["key"] for e in lists["misses"]] == ["a.jpg", "e.jpg"]
    assert [e["value"] for e in lists["misses"]] == [0.9, 0.6]
    odd = lists["border"][1]
    assert odd["link"] == f"../index.html#image={quote(ODD, safe='')}&rank=2"
    assert lists["border"][0]["link"] == "../index.html#image=b.jpg"
    assert lists["border"][0]["picture"] == "heatmaps/b.png"
    assert lists["misses"][1]["picture"] is None  # its heatmap file is not there
    rows = read_csv(tmp_path / "report" / "offobject.csv")
    assert [(r["list"], r["position"], r["key"]) for r in rows] == [
        ("border", "1", "b.jpg"), ("border", "2", ODD), ("energy", "1", ODD),
        ("energy", "2", "b.jpg"), ("misses", "1", "a.jpg"), ("misses", "2", "e.jpg")]
    page = (tmp_path / "report" / "index.html").read_text("utf-8")
    assert f"href='../index.html#image={quote(ODD, safe='')}&amp;rank=2'" in page
    assert "&lt;b&gt;" in page and "<b>#1" not in page  # the key is escaped
    assert "src='../heatmaps/b.png'" in page


def test_top_zero_writes_empty_lists(tmp_path):
    write_lines(tmp_path / "manifest.jsonl", [rec("a.jpg", stats={"border": 0.2})])
    write_report(tmp_path, top=0)
    assert report_json(tmp_path)["lists"] == {"border": [], "energy": [], "misses": []}


# -- which lines count: shards, repeats, failures --------------------------------------------

def test_sharded_tree_reads_the_latest_line_as_the_gallery_does(tmp_path):
    write_lines(tmp_path / "manifest.jsonl", [
        rec("a.jpg", 1, time=T0, stats={"border": 0.9}),  # redone by shard 0: T1 wins
        rec("b.jpg", 1, time=T0, stats={"border": 0.8}),
        rec("b.jpg", 2, time="", stats={"border": 0.1}),  # same file, later line: wins
        rec("f.jpg", status="failed"),
    ])
    write_lines(tmp_path / "shards" / "0-of-2" / "manifest.jsonl", [
        rec("a.jpg", 1, time=T1, stats={"border": 0.5}),
        rec("c.jpg", 3, rank=1, time=T1, stats={"border": 0.4}),
        rec("c.jpg", 4, rank=2, time=T1, stats={"border": 0.3}),
    ])
    write_lines(tmp_path / "shards" / "1-of-2" / "manifest.jsonl", [
        rec("d.jpg", 1, time=T1, stats={"border": 0.2}),
        rec("f.jpg", 1, time=T1, stats={"border": 0.6}),  # the failed image, redone
        "{not json\n",
    ])
    summary = write_report(tmp_path)
    latest = [r for r in latest_records(tmp_path) if r["status"] != "failed"]
    assert summary.records == len(latest) == 6  # a, b, c (two ranks), d, f
    assert (summary.images, summary.failed) == (5, 0)
    borders = {(c["target"], c["records"]): c["mean"]["border"]
               for c in report_json(tmp_path)["classes"]}
    assert borders[(1, 3)] == pytest.approx((0.5 + 0.2 + 0.6) / 3)  # a (shard), d, f
    assert borders[(2, 1)] == pytest.approx(0.1)
    assert len(summary.warnings) == 1 and "1-of-2" in summary.warnings[0]


def test_failed_lines_and_older_records_are_counted_not_fatal(tmp_path):
    write_lines(tmp_path / "manifest.jsonl", [
        rec("a.jpg", stats={"border": 0.3}), rec("b.jpg"), rec("c.jpg", status="failed"),
        rec("d.jpg", status="skipped", stats={"border": 0.5}),
        rec("e.jpg", stats="garbage", objects=["garbage"]),
        {"schema": 1, "key": "g.jpg", "status": "ok"},  # no target: nothing to file it under
    ])
    summary = write_report(tmp_path)
    assert (summary.records, summary.failed, summary.with_stats) == (4, 1, 2)
    assert "2 of 4 records have no stats (an older dump): the stat columns count only the " \
           "others" in summary.notes
    assert report_json(tmp_path)["classes"][0]["mean"]["border"] == pytest.approx(0.4)


def test_only_repeated_lines_are_held(tmp_path):
    """Memory: pass 1 keeps the hashes of the (key, rank)s written twice, nothing else."""
    write_lines(tmp_path / "manifest.jsonl", [
        *(rec(f"k{i}.jpg") for i in range(100)), rec("k7.jpg", time=T1),
        rec("k8.jpg", rank=2), "[]\n"])
    latest = LatestRecords(tmp_path, BadLines())
    latest.open()
    try:
        assert latest.index() == 102
        assert latest.repeated == {hash(("k7.jpg", None))}
        got = [(r["key"], r.get("rank"), r["time"]) for r in latest.records()]
    finally:
        latest.close()
    assert len(got) == 101 and got[-1] == ("k7.jpg", None, T1)
    assert ("k7.jpg", None, T0) not in got


def test_winners_follow_the_latest_rule():
    rng = random.Random(3)
    stamps = ["", T0, T1, "2026-01-01T00:00:00.500+00:00", "garbage"]
    for _ in range(200):
        lines = []  # (file, offset, key, time) in reading order
        for file in range(rng.randint(1, 4)):
            for offset in range(rng.randint(0, 6)):
                lines.append((file, offset * 10, rng.choice("abc"), rng.choice(stamps)))
        best = Latest()
        for file, offset, key, stamp in lines:
            best.offer({"key": key, "time": stamp if stamp != "garbage" else ""}, file, offset)
        want = sorted((p, o) for _, p, o in best.values())
        got = winners([hash((k, None)) for _, _, k, _ in lines],
                      [stamp_code(t) for *_, t in lines], [f for f, *_ in lines],
                      [o for _, o, _, _ in lines])
        assert got == want, lines


def test_stamp_codes_order_like_the_strings():
    stamps = [None, "", "2026-01-01T00:00:00+00:00", T0, "2026-01-01T00:00:00.5+00:00",
              "2026-01-01T00:00:00.987+00:00", "2026-01-01T00:00:01.000+00:00", T1]
    codes = [stamp_code(s) for s in stamps]
    assert codes == sorted(codes) and codes[0] == codes[1] == -1
    assert len(set(codes[2:])) == len(codes) - 2


# -- the command -----------------------------------------------------------------------------

def test_cli_not_a_tree_exits_2_with_one_line(tmp_path):
    one_error_line(cli("report", str(tmp_path / "nope")), "no such directory")
    one_error_line(cli("report", str(tmp_path)), "not an output tree", "manifest.jsonl")
    assert not (tmp_path / "report").exists()
    write_lines(tmp_path / "manifest.jsonl", [rec("a.jpg")])
    one_error_line(cli("report", str(tmp_path), "--grid", "0"), "--grid")
    one_error_line(cli("report", str(tmp_path), "--top", "-1"), "--top")


def test_cli_summary_json_and_gallery_rebuild(tmp_path):
    write_lines(tmp_path / "manifest.jsonl", [rec("a.jpg", stats={"border": 0.3}),
                                              rec("b.jpg", status="failed")])
    result = cli("report", str(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"report: {tmp_path / 'report'} (1 records, 1 images, "
                                "1 failed, 1 classes;")
    assert all(line.startswith("fullgrad: report: ") for line in lines[:-1])
    for name in ("classes.csv", "offobject.csv", "index.html", "report.json"):
        assert (tmp_path / "report" / name).is_file()
    assert cli("report", str(tmp_path), "-q").stderr == ""
    assert not (tmp_path / "index.html").exists()  # no gallery: none is made
    assert cli("gallery", str(tmp_path), "-q").exit_code == 0
    before = (tmp_path / "index.html").stat().st_mtime_ns
    result = cli("report", str(tmp_path), "--json", "-q")
    assert result.exit_code == 0 and result.stderr == ""
    summary = json.loads(result.stdout)
    assert (summary["records"], summary["failed"], summary["grid"]) == (1, 1, False)
    assert summary["gallery"] == str(tmp_path / "index.html")
    assert (tmp_path / "index.html").stat().st_mtime_ns >= before


def test_report_of_a_real_dump(tmp_path):
    out = tmp_path / "out"
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1,label\nchelsea.png,100,20,350,280,cat\n"
                     "coffee.png,150,100,450,350,cup\ngrace_hopper.jpg,0,0,20,20,x\n")
    result = cli("dump", str(PHOTOS), *SQUEEZENET, "--workers", "0", "--out", str(out),
                 "--save", "heatmap,map", "--quiet", "--boxes", str(boxes))
    assert result.exit_code == 0, result.output
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    result = cli("report", str(out), "--grid", "16")
    assert result.exit_code == 0, result.output
    data = report_json(out)
    targets = sorted({r["target"] for r in manifest})
    assert data["records"] == data["images"] == len(manifest) == 6
    rows = read_csv(out / "report" / "classes.csv")
    assert [int(r["target"]) for r in rows] == targets
    assert sum(int(r["records"]) for r in rows) == 6
    assert data["grid"]["cells"] == 16 and all(c["maps"] >= 1 for c in data["classes"])
    png = Image.open(out / "report" / "class_means.png")
    columns = data["grid"]["columns"]
    assert png.width == columns * data["grid"]["tile"] + (columns + 1) * data["grid"]["gap"]
    assert data["with_stats"] == 6 and data["with_objects"] == 3
    border = sorted(((r["stats"]["border"], r["key"]) for r in manifest), reverse=True)
    assert [(e["value"], e["key"]) for e in data["lists"]["border"]] == border
    for row in rows:  # each class's means and pointing, straight from the manifest
        mine = [r for r in manifest if r["target"] == int(row["target"])]
        assert float(row["border_mean"]) == pytest.approx(
            np.mean([r["stats"]["border"] for r in mine]), rel=1e-6)
        located = [r["objects"] for r in mine if "objects" in r]
        assert int(row["located"]) == len(located)
        assert int(row["hits"]) == sum(o["hit"] for o in located)
