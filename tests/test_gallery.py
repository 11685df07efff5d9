"""`fullgrad gallery` and `dump --gallery` without a browser: files, data, resumable
thumbnails, decomposition terms, errors. The page itself: tests/test_gallery_browser.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from gallery_util import (
    ODD,
    STATS,
    add_audit,
    cli,
    manifest,
    original_of,
    page_data,
    read_js,
    real_tree,
    stem_of,
    synthetic_tree,
    write_report,
)
from PIL import Image

from fgcli.gallery import GalleryError, build_gallery
from fgcli.gallery.collect import decomp_terms
from fgcli.gallery.page import STATS as PAGE_STATS
from fgcli.gallery.thumbs import THUMB


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    out, result = real_tree(tmp_path_factory.mktemp("gallery"), "--topk", "2", "--gallery",
                            "--quiet")
    assert result.exit_code == 1, result.output  # the broken file failed
    return out


def test_dump_gallery_writes_a_self_contained_page(tree):
    assert (tree / "index.html").is_file()
    for name in ("app.js", "style.css", "data.js", "records/00000.js"):
        assert (tree / "gallery" / name).is_file(), name
    html = (tree / "index.html").read_text()
    # nothing from the network: every src/href is relative, inside the tree
    for attr in ("src=", "href="):
        for part in html.split(attr)[1:]:
            target = part.split('"')[1]
            assert "://" not in target and not target.startswith("/"), target
            if not target.startswith("#"):
                assert (tree / target).is_file(), target


def test_data_has_every_image_with_its_maps(tree):
    data = page_data(tree)
    recs = manifest(tree)
    images = {row[0]: row for row in data["images"]}
    assert set(images) == {r["key"] for r in recs}
    assert len(images) == 8
    broken = images["broken.jpg"]
    assert broken[1] == "failed" and broken[3] == "not an image Pillow can read"
    for rec in recs:
        if rec["status"] != "ok":
            continue
        row = images[rec["key"]]
        entry = next(e for e in row[4] if e[1] == rec["rank"])
        assert data["classes"][entry[3]] == rec["target_name"]
        assert entry[2] == rec["target"]
        assert entry[4] == pytest.approx(rec["prob"], rel=1e-3)
        assert entry[6] == pytest.approx(rec["residual"], rel=1e-2, abs=1e-12)
        assert [e[1] for e in row[4]] == [1, 2]  # --topk: both ranks, best first
        # the page builds output paths from the stem: they must be the manifest's
        stem = stem_of(row, entry)
        assert f"overlays/{stem}.jpg" == rec["outputs"]["overlay"]
        assert f"heatmaps/{stem}.png" == rec["outputs"]["heatmap"]
        assert (tree / "thumbs" / f"{stem}.jpg").is_file()
        original = original_of(data, row)
        assert original is not None and (tree / original).resolve().is_file()
        assert row[2] == 1  # stored as originalPrefix + key


def test_thumbnails_are_small_and_show_the_overlay(tree):
    rec = next(r for r in manifest(tree) if r["key"] == "chelsea.png" and r["rank"] == 1)
    thumb = Image.open(tree / "thumbs" / "chelsea.png.top1_{}.jpg".format(rec["target"]))
    assert max(thumb.size) == THUMB
    overlay = Image.open(tree / rec["outputs"]["overlay"]).convert("RGB")
    expected = np.asarray(overlay.resize(thumb.size, Image.Resampling.BICUBIC), np.float32)
    assert np.abs(np.asarray(thumb, np.float32) - expected).mean() < 6  # JPEG, resampling


def test_records_and_decomposition_terms_add_up_to_the_logit(tree):
    data = page_data(tree)
    records = read_js(tree / "gallery" / "records" / "00000.js")
    assert records[0] == 0
    chunk = records[1]
    for row in data["images"]:
        for entry in row[4]:
            rec = chunk["records"][entry[0]]
            assert rec["key"] == row[0] and rec["rank"] == entry[1]
            table, values = chunk["terms"][entry[0]]
            layers = data["layers"][table]
            z = np.load(tree / rec["outputs"]["decomp"])
            assert layers == list(z["layers"])
            assert len(values) == len(layers) + 3  # input, layers, residual, logit
            assert values[-1] == pytest.approx(rec["logit"], rel=1e-6)
            # completeness, live: the chart's terms sum to the logit
            assert sum(values[:-1]) == pytest.approx(values[-1], rel=1e-5, abs=1e-4)
            assert values[0] == pytest.approx(float(z["input"].sum(dtype=np.float64)))


def test_thumbnails_are_made_once(tmp_path, tree):
    copy = tmp_path / "t"
    shutil.copytree(tree, copy)
    again = build_gallery(copy)
    assert again.thumbs.made == 0 and again.thumbs.kept == 14 and again.decomp_read == 0
    thumbs = sorted((copy / "thumbs").rglob("*.jpg"))
    gone, newer = thumbs[0], thumbs[1]
    gone.unlink()
    source = copy / "overlays" / newer.relative_to(copy / "thumbs")
    os.utime(source, ns=(newer.stat().st_mtime_ns + 10**9,) * 2)
    third = build_gallery(copy)
    assert third.thumbs.made == 2 and third.thumbs.kept == 12 and gone.is_file()


def test_a_broken_overlay_is_one_line_and_the_rest_is_shown(tmp_path, tree):
    copy = tmp_path / "t"
    shutil.copytree(tree, copy)
    rec = next(r for r in manifest(copy) if r["key"] == "rocket.jpg" and r["rank"] == 1)
    overlay = copy / rec["outputs"]["overlay"]
    overlay.write_bytes(b"not a jpeg")
    os.utime(overlay, ns=(10**19,) * 2)  # newer than its thumbnail
    result = cli("gallery", str(copy), "--quiet")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(overlay) in lines[0] and "thumbnail failed" in lines[0]
    data = page_data(copy)
    row = next(r for r in data["images"] if r[0] == "rocket.jpg")
    assert not row[4][0][8] & 16  # no thumbnail bit: the card shows no stale image
    assert row[4][1][8] & 16
    assert not (copy / "thumbs" / (rec["outputs"]["overlay"][len("overlays/"):])).exists()


def test_decomposition_terms_are_cached_and_refreshed(tmp_path, tree):
    copy = tmp_path / "t"
    shutil.copytree(tree, copy)
    rec = next(r for r in manifest(copy) if r["key"] == "coffee.png" and r["rank"] == 1)
    path = copy / rec["outputs"]["decomp"]
    arrays = dict(np.load(path))
    arrays["residual"] = np.float64(1.5)
    np.savez(path, **arrays)
    report = build_gallery(copy)
    assert report.decomp_read == 1
    _, values = decomp_terms(path)
    assert values[-2] == 1.5
    chunk = read_js(copy / "gallery" / "records" / "00000.js")[1]
    row = next(r for r in page_data(copy)["images"] if r[0] == "coffee.png")
    assert chunk["terms"][row[4][0][0]][1][-2] == 1.5


def test_odd_file_names_are_kept_verbatim(tree):
    row = next(r for r in page_data(tree)["images"] if r[0] == ODD)
    assert row[1] == "ok"
    assert (tree / "thumbs" / f"{stem_of(row, row[4][0])}.jpg").is_file()


def test_not_a_tree_is_a_usage_error(tmp_path):
    with pytest.raises(GalleryError, match="not an output tree"):
        build_gallery(tmp_path)
    result = cli("gallery", str(tmp_path / "missing"))
    assert result.exit_code == 2
    assert result.output.strip() == f"fullgrad: error: {tmp_path / 'missing'}: no such directory"
    assert cli("gallery", str(tmp_path), "--threads", "0").exit_code == 2


def test_gallery_command_summary_and_quiet(tmp_path, tree):
    copy = tmp_path / "t"
    shutil.copytree(tree, copy)
    loud = cli("gallery", str(copy))
    assert loud.exit_code == 0
    assert "8 images, 14 maps, 1 failed; thumbnails made 0, kept 14" in loud.output
    assert cli("gallery", str(copy), "-q").output == ""


def test_unmerged_shards_and_a_later_failure_are_shown(tmp_path, tree):
    copy = tmp_path / "t"
    shutil.copytree(tree, copy)
    recs = manifest(copy)
    main = [r for r in recs if r["key"] != "astronaut.png"]
    moved = [r for r in recs if r["key"] == "astronaut.png"]
    (copy / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in main))
    shard = copy / "shards" / "0-of-2"
    shard.mkdir(parents=True)
    later = {"schema": 1, "input": "x", "key": "chelsea.png", "status": "failed",
             "error": "corrupt image: now", "outputs": {}, "rank": None,
             "time": "2999-01-01T00:00:00.000+00:00"}
    (shard / "manifest.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [*moved, later]))
    (copy / "run.json").write_text("{}")  # e.g. a tree whose run.json is lost
    build_gallery(copy)
    images = {r[0]: r for r in page_data(copy)["images"]}
    assert images["astronaut.png"][1] == "ok" and len(images["astronaut.png"][4]) == 2
    assert images["chelsea.png"][1] == "failed"
    assert images["chelsea.png"][3] == "corrupt image: now"


def test_eval_results_in_the_tree_are_shown(tmp_path, tree):
    copy = tmp_path / "t"
    shutil.copytree(tree, copy)
    docs = Path(__file__).resolve().parents[1] / "docs"
    shutil.copy(docs / "eval-squeezenet1_1-examples.json", copy / "eval.json")
    shutil.copy(docs / "eval-squeezenet1_1-examples.png", copy / "eval.png")
    build_gallery(copy)
    ev = page_data(copy)["eval"]
    assert ev["plot"] == "eval.png" and "fullgrad" in ev["results"]
    assert ev["results"]["fullgrad"]["perturbation"]["mean"][0] == pytest.approx(
        json.loads((copy / "eval.json").read_text())["results"]["fullgrad"]["perturbation"]
        ["mean"][0])
    assert 'id="eval"' in (copy / "index.html").read_text()


@pytest.mark.slow
def test_a_large_tree_pages_data_compactly(tmp_path, tree):
    big = synthetic_tree(tree, tmp_path / "big", 1000)
    report = build_gallery(big, threads=2)
    assert report.images == 1000 and report.failed == 20
    size = (big / "gallery" / "data.js").stat().st_size
    assert size < 160 * 1000  # compact: ~120 bytes an image
    chunks = sorted((big / "gallery" / "records").iterdir())
    assert len(chunks) == 5  # 200 maps or failures per chunk
    # a smaller rebuild drops chunks it no longer needs
    lines = (big / "manifest.jsonl").read_text().splitlines(keepends=True)
    (big / "manifest.jsonl").write_text("".join(lines[:300]))
    build_gallery(big)
    assert len(list((big / "gallery" / "records").iterdir())) == 2


def test_gallery_without_decomp_says_there_will_be_no_chart(tmp_path):
    out, result = real_tree(tmp_path, "--save", "heatmap,overlay", "--gallery")
    assert result.exit_code == 1  # the broken file
    notes = [line for line in result.output.splitlines() if "--gallery without" in line]
    assert notes == [("fullgrad: warning: --gallery without decomp in --save: the detail view "
                      "will have no decomposition chart (--save heatmap,overlay,map,decomp)")]
    data = page_data(out)
    assert data["layers"] == [] and (out / "index.html").is_file()
    assert all(not e[8] & 8 for row in data["images"] for e in row[4])  # no decomp bit


# ------------------------------------------------------------- statistics and classes
def _sig4(x):
    return None if x is None else float(f"{x:.4g}")


@pytest.fixture()
def audit_copy(tmp_path, tree) -> Path:
    """A copy of the tree whose records have statistics and pointing-game fields; every
    3rd ok record has neither (as an older dump's)."""
    copy = tmp_path / "t"
    shutil.copytree(tree, copy)
    add_audit(copy, without=3)
    return copy


def test_rows_carry_the_statistics_rounded_and_the_pointing_game(audit_copy):
    report = build_gallery(audit_copy)
    assert report.warnings == [] and report.classes is None
    data = page_data(audit_copy)
    assert data["stats"] == list(STATS) == list(PAGE_STATS)
    assert data["audit"] == {"stats": True, "objects": True} and data["report"] is None
    rows = {(row[0], e[1]): e for row in data["images"] for e in row[4]}
    kinds = set()
    for rec in manifest(audit_copy):
        if rec["status"] != "ok":
            continue
        entry = rows[rec["key"], rec["rank"]]
        if "stats" not in rec:  # an older record: no audit array (nor paths here)
            assert len(entry) == 9
            kinds.add("none")
            continue
        audit = entry[9]
        assert audit[:8] == [_sig4(rec["stats"][s]) for s in STATS]
        assert all(v is None or len(f"{abs(v):.10g}".replace(".", "").strip("0")) <= 4
                   for v in audit[:8])  # 4 significant digits
        objects = rec.get("objects")
        if objects is None:
            assert len(audit) == 8
            kinds.add("no annotation")
        else:
            hit = -1 if objects["match"] == "absent" else int(objects["hit"])
            assert audit[8:] == [hit, _sig4(objects["energy"])]
            kinds.add({1: "hit", 0: "miss", -1: "absent"}[hit])
    assert kinds == {"none", "no annotation", "hit", "miss", "absent"}


def test_a_tree_without_statistics_has_no_audit_values(tmp_path, tree):
    assert page_data(tree)["audit"] == {"stats": True, "objects": False}  # this version's
    older = tmp_path / "older"  # a tree of a dump from before the statistics
    shutil.copytree(tree, older)
    recs = manifest(older)
    for rec in recs:
        rec.pop("stats", None)
    (older / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    build_gallery(older)
    data = page_data(older)
    assert data["audit"] == {"stats": False, "objects": False}
    assert all(len(e) == 9 for row in data["images"] for e in row[4])


def test_odd_output_paths_follow_the_audit_values(tmp_path, audit_copy):
    recs = manifest(audit_copy)
    rec = next(r for r in recs if r["key"] == "chelsea.png" and r["rank"] == 1)
    os.replace(audit_copy / rec["outputs"]["overlay"], audit_copy / "overlays" / "elsewhere.jpg")
    rec["outputs"]["overlay"] = "overlays/elsewhere.jpg"
    (audit_copy / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    build_gallery(audit_copy)
    row = next(r for r in page_data(audit_copy)["images"] if r[0] == "chelsea.png")
    entry = row[4][0]
    assert entry[9] is None or len(entry[9]) >= 8  # the audit slot, then the odd paths
    assert entry[10]["heatmap"] == rec["outputs"]["heatmap"]
    assert "elsewhere" in (entry[7], entry[10].get("overlay"))


def test_the_report_classes_are_embedded(audit_copy):
    written = write_report(audit_copy)
    report = build_gallery(audit_copy)
    assert report.warnings == [] and report.classes == len(written["classes"]) > 3
    view = page_data(audit_copy)["report"]
    assert view["grid"] == {"file": "report/class_means.png", "tile": 8, "columns": 3,
                            "gap": 0, "label": 0}  # spec20.md's grid: no gap, no label
    assert view["index"] == "report/index.html" and view["records"] == written["records"]
    for got, want in zip(view["classes"], written["classes"], strict=True):
        assert got["target"] == want["target"] and got["name"] == want["name"]
        assert got["tile"] == want["tile"] and got["records"] == want["records"]
        assert got["pointing"] == _sig4(want["pointing"])
        assert got["energy"] == _sig4(want["energy"])
        assert got["mean"] == [_sig4(want["mean"].get(s)) for s in STATS]
        assert got["std"] == [_sig4(want["std"].get(s)) for s in STATS]
    html = (audit_copy / "index.html").read_text()
    assert 'id="view-classes"' in html and 'id="class-view"' in html
    # without report.json: no class view
    (audit_copy / "report" / "report.json").unlink()
    assert build_gallery(audit_copy).classes is None
    assert page_data(audit_copy)["report"] is None
    assert 'id="class-view"' not in (audit_copy / "index.html").read_text()


@pytest.mark.parametrize("text, reason", [
    ("{not json", "Expecting property name"),
    ("[]", "not a JSON object"),
    ('{"schema": 2, "classes": []}', "schema 2, expected 1"),
    ('{"schema": 1, "classes": {}}', "'classes' is not a list"),
    ('{"schema": 1, "classes": [{"name": "x"}]}', "classes[0].target is not an integer"),
    ('{"schema": 1, "classes": [{"target": 1, "records": -1}]}',
     "classes[0].records is not a count"),
    ('{"schema": 1, "classes": [{"target": 1, "mean": {"border": "a"}}]}',
     "classes[0].mean.border is not a number"),
    ('{"schema": 1, "classes": [{"target": 1, "tile": [0]}]}',
     "classes[0].tile is not [row, column]"),
    ('{"schema": 1, "classes": [], "grid": {"file": "../x.png", "tile": 8, "columns": 2}}',
     "leads outside report/"),
    ('{"schema": 1, "classes": [], "grid": {"file": "g.png", "tile": 0, "columns": 2}}',
     "not positive integers"),
    (('{"schema": 1, "classes": [], "grid": {"file": "g.png", "tile": 8, "columns": 2, '
      '"gap": -1}}'), "grid.gap and grid.label are not counts of pixels"),
])
def test_a_malformed_report_json_is_a_warning_not_a_failure(tmp_path, tree, text, reason):
    copy = tmp_path / "t"
    shutil.copytree(tree, copy)
    (copy / "report").mkdir()
    path = copy / "report" / "report.json"
    path.write_text(text)
    report = build_gallery(copy)
    assert report.classes is None and len(report.warnings) == 1
    assert report.warnings[0].startswith(f"{path}: ") and reason in report.warnings[0]
    assert report.warnings[0].endswith("; the gallery has no class view")
    assert page_data(copy)["report"] is None
    result = cli("gallery", str(copy))
    assert result.exit_code == 0
    assert f"fullgrad: warning: {path}: " in result.output


def test_a_missing_class_mean_grid_leaves_the_view_without_tiles(tmp_path, audit_copy):
    write_report(audit_copy)
    (audit_copy / "report" / "class_means.png").unlink()
    report = build_gallery(audit_copy)
    assert report.classes and report.warnings == [
        f"{audit_copy / 'report' / 'class_means.png'}: missing; the class view has no tiles"]
    assert page_data(audit_copy)["report"]["grid"] is None
