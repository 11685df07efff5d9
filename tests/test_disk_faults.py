"""Full disks and failing writes: every file in the tree is whole, the manifest too.

Faults come from tests/faults.py (``os.write`` patched by file path) and, where the
machine allows, a real 1.2 MB tmpfs.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import ROOT, SQUEEZENET_WEIGHTS
from faults import assert_tree_whole, failing_files, full_disk, strict_lines, tiny_filesystem
from fgcli.cli import app
from fgcli.writer import DiskFullError, OutputTree, TreeWriteError

PHOTO = ROOT / "examples" / "photos" / "chelsea.png"
SMALL = ["--model", "squeezenet1_1", "--weights", str(SQUEEZENET_WEIGHTS), "--size", "64",
         "--workers", "0", "-b", "2", "-q"]


OVERLAY = 26_000  # bytes of one overlay of PHOTO (about)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(6):
        shutil.copy(PHOTO, folder / f"cat{i}.png")
    return folder


def dump(inputs: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["dump", str(inputs), "--out", str(out), *SMALL, *extra])


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_resumable(photos: Path, out: Path) -> None:
    """The tree is whole, each output has an ok line, and a rerun completes every image."""
    files = assert_tree_whole(out)
    recs = strict_lines(out / "manifest.jsonl")
    listed = {p for r in recs if r["status"] == "ok" for p in r["outputs"].values()}
    assert listed <= set(files)
    again = dump(photos, out, "--json")
    assert again.exit_code == 0, again.output
    statuses = {}
    for line in again.stdout.splitlines():
        rec = json.loads(line)
        statuses[rec["key"]] = rec["status"]
    assert len(statuses) == 6 and set(statuses.values()) <= {"ok", "skipped"}
    done = {r["key"] for r in recs if r["status"] == "ok"}
    assert {k for k, s in statuses.items() if s == "skipped"} == done  # nothing recomputed
    assert len(strict_lines(out / "manifest.jsonl")) == 6  # compacted again
    assert len(assert_tree_whole(out)) == 18


def test_full_disk_on_an_overlay_stops_the_run_with_one_line(photos, tmp_path):
    out = tmp_path / "out"
    # room for one overlay and a half: the second one is cut off midway
    with full_disk("*/.tmp/*.jpg", after=OVERLAY * 3 // 2) as fault:
        result = dump(photos, out)
    assert result.exit_code == 2, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"fullgrad: error: no space left on device writing {out}/"
                               "overlays/"), lines
    assert fault.failed
    assert not (out / ".tmp").exists() or not any((out / ".tmp").iterdir())
    run = json.loads((out / "run.json").read_text())
    assert run["error"].startswith("no space left on device writing")
    assert_resumable(photos, out)


def test_an_io_error_on_one_image_fails_that_image_only(photos, tmp_path):
    out = tmp_path / "out"
    with failing_files("*/.tmp/*.jpg", errno.EIO, after=100, files=1) as fault:
        result = dump(photos, out)
    assert result.exit_code == 1, result.output
    assert len(fault.failed) == 1
    recs = strict_lines(out / "manifest.jsonl")
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(recs) == 6 and len(failed) == 1
    assert failed[0]["outputs"] == {}
    assert "Input/output error writing" in failed[0]["error"]
    assert stderr_lines(result) == [f"fullgrad: failed: {failed[0]['input']}: "
                                    f"{failed[0]['error']}"]
    assert_tree_whole(out)
    again = dump(photos, out)
    assert again.exit_code == 0
    after = {r["key"]: r["status"] for r in strict_lines(out / "manifest.jsonl")}
    assert after[failed[0]["key"]] == "ok" and set(after.values()) <= {"ok", "skipped"}


def test_full_disk_on_the_manifest_keeps_it_whole(photos, tmp_path):
    out = tmp_path / "out"
    with full_disk("*/manifest.jsonl", after=1500) as fault:  # 3 lines and a part
        result = dump(photos, out)
    assert fault.failed
    assert result.exit_code == 2
    assert stderr_lines(result) == [f"fullgrad: error: no space left on device writing "
                                    f"{out}/manifest.jsonl"]
    assert len(strict_lines(out / "manifest.jsonl")) == 3  # whole lines only
    assert (out / "manifest.jsonl").stat().st_size < 1500
    assert_resumable(photos, out)


def _record(key: str, **extra) -> dict:
    return {"schema": 1, "key": key, "input": key, "status": "ok", "outputs": {}, **extra}


def test_an_append_that_fails_midway_is_cut_back(tmp_path):
    tree = OutputTree(tmp_path / "out")
    tree.acquire(["test"])
    try:
        tree.append(_record("a"))
        with failing_files("*/manifest.jsonl", errno.ENOSPC, after=7):
            with pytest.raises(DiskFullError, match="no space left on device writing"):
                tree.append(_record("b"))
        with failing_files("*/manifest.jsonl", errno.EIO, after=3):
            with pytest.raises(TreeWriteError, match="cannot write .*Input/output error"):
                tree.append(_record("c"))
        assert [r["key"] for r in strict_lines(tree.manifest_path)] == ["a"]
        tree.append(_record("d"))
        assert [r["key"] for r in strict_lines(tree.manifest_path)] == ["a", "d"]
    finally:
        tree.release()


def test_manifest_lines_are_strict_json(tmp_path):
    tree = OutputTree(tmp_path / "out")
    tree.acquire(["test"])
    try:
        with pytest.raises(ValueError):
            tree.append(_record("a", logit=float("nan")))
        tree.append(_record("b", name="caf\u00e9"))
    finally:
        tree.release()
    assert [r["key"] for r in strict_lines(tree.manifest_path)] == ["b"]


def test_a_torn_last_line_is_cut_when_the_manifest_opens(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    whole = json.dumps(_record("a")) + "\n"
    (out / "manifest.jsonl").write_text(whole + '{"schema": 1, "key": "b", "sta')
    tree = OutputTree(out)
    tree.acquire(["test"])
    try:
        tree.append(_record("c"))
    finally:
        tree.release()
    assert [r["key"] for r in strict_lines(out / "manifest.jsonl")] == ["a", "c"]
    # a last record that only lacks its newline is kept
    (out / "manifest.jsonl").write_text(whole + json.dumps(_record("b")))
    tree.acquire(["test"])
    try:
        tree.append(_record("c"))
    finally:
        tree.release()
    assert [r["key"] for r in strict_lines(out / "manifest.jsonl")] == ["a", "b", "c"]


@pytest.mark.parametrize("kind", ["npy", "npz", "png", "jpg", "json", "compact"])
def test_no_partial_file_is_moved_into_place(tmp_path, kind):
    tree = OutputTree(tmp_path / "out")
    tree.acquire(["test"])
    dest = tree.root / "maps" / f"x.{kind}"
    rgb = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    write = {
        "npy": lambda: tree.write_npy(dest, rgb.astype(np.float32)),
        "npz": lambda: tree.write_npz(dest, {"a": rgb.astype(np.float32)}),
        "png": lambda: tree.write_palette_png(dest, rgb[..., 0], np.zeros((256, 3), np.uint8)),
        "jpg": lambda: tree.write_jpeg(dest, rgb),
        "json": lambda: tree.write_json(dest, {"a": "x" * 50_000}),
        "compact": tree.compact_manifest,
    }[kind]
    if kind == "compact":
        for i in range(200):
            tree.append(_record(f"k{i}"))
        dest = tree.manifest_path
    before = dest.read_bytes() if dest.exists() else None
    try:
        with full_disk("*/.tmp/*", after=4000):
            with pytest.raises(DiskFullError, match=f"writing {dest}"):
                write()
        assert (dest.read_bytes() if dest.exists() else None) == before
        assert not any(tree.scratch.iterdir())
        write()  # room again: whole
    finally:
        tree.release()
    assert dest.stat().st_size > 4000


def test_a_gallery_thumbnail_is_never_moved_in_truncated(tmp_path):
    from fgcli.gallery.thumbs import make_thumb

    dest = tmp_path / "thumbs" / "cat.jpg"
    with full_disk(f"{dest.parent}/*", after=1000):
        with pytest.raises(OSError):
            make_thumb(PHOTO, dest)
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir()] == []
    make_thumb(PHOTO, dest)
    assert dest.stat().st_size > 1000


def test_a_real_small_filesystem(photos, tmp_path):
    with tiny_filesystem(tmp_path / "small", "300k") as small:
        out = small / "out"
        result = dump(photos, out)
        assert result.exit_code == 2, result.output
        lines = stderr_lines(result)
        assert len(lines) == 1 and lines[0].startswith(
            f"fullgrad: error: no space left on device writing {out}/"), lines
        assert_tree_whole(out)
        recs = strict_lines(out / "manifest.jsonl")
        assert 0 < len(recs) < 6
        moved = tmp_path / "moved"  # "after space is freed": the tree on a roomy disk
        shutil.copytree(out, moved)
    assert_resumable(photos, moved)


def test_a_merge_on_a_full_disk_loses_nothing(tmp_path):
    from fgcli.distributed.shards import merge

    out = tmp_path / "out"
    for index in range(2):
        shard = OutputTree(out, f"{index}-of-2")
        shard.acquire(["test"])
        try:
            for i in range(50):
                shard.append(_record(f"s{index}/k{i}", time="2026-01-01T00:00:00"))
        finally:
            shard.release()
    before = {p: p.read_bytes() for p in out.rglob("manifest.jsonl")}
    with full_disk("*/.tmp/*", after=2000):
        with pytest.raises(DiskFullError, match=f"no space left on device writing {out}"):
            merge(out, ["test"])
    assert {p: p.read_bytes() for p in out.rglob("manifest.jsonl")} == before
    report = merge(out, ["test"])  # room again
    assert report.records == 100
    assert len(strict_lines(out / "manifest.jsonl")) == 100
    assert not (out / "shards").exists()
