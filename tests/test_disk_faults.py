"""Full disks and failing writes: every file in the tree is whole, the manifest too.

Faults come from tests/faults.py (``os.write`` patched by file path) and, where the
machine allows, a real 1.2 MB tmpfs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from faults import (
    DriverState,
    assert_tree_whole,
    failing_files,
    full_disk,
    tiny_filesystem,
)
from helpers import PHOTOS, ROOT, SQUEEZENET, strict_lines
from typer.testing import CliRunner

from fgcli.cli import app
from fgcli.tree.atomic import DiskFullError, TreeWriteError
from fgcli.tree.writer import OutputTree

PHOTO = PHOTOS / "chelsea.png"
SMALL = [*SQUEEZENET, "--workers", "0", "-b", "2", "-q"]


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
    with full_disk("*/manifest.jsonl", after=2000) as fault:  # 3 lines (~600 B) and a part
        result = dump(photos, out)
    assert fault.failed
    assert result.exit_code == 2
    assert stderr_lines(result) == [f"fullgrad: error: no space left on device writing "
                                    f"{out}/manifest.jsonl"]
    assert len(strict_lines(out / "manifest.jsonl")) == 3  # whole lines only
    assert (out / "manifest.jsonl").stat().st_size < 2000
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
        with pytest.raises(DiskFullError, match=f"^no space left on device writing {dest}$"):
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


@contextlib.contextmanager
def _shard_of_two(out: Path, index: int):
    """Shard ``index`` of 2 of the tree ``out``, locked while the block writes to it."""
    shard = OutputTree(out, f"{index}-of-2")
    shard.acquire(["test"])
    try:
        yield shard
    finally:
        shard.release()


def test_a_merge_on_a_full_disk_loses_nothing(tmp_path):
    from fgcli.tree.shards import merge

    out = tmp_path / "out"
    for index in range(2):
        with _shard_of_two(out, index) as shard:
            for i in range(50):
                shard.append(_record(f"s{index}/k{i}", time="2026-01-01T00:00:00"))
    before = {p: p.read_bytes() for p in out.rglob("manifest.jsonl")}
    with full_disk("*/.tmp/*", after=2000):
        with pytest.raises(DiskFullError, match=f"no space left on device writing {out}"):
            merge(out, ["test"])
    assert {p: p.read_bytes() for p in out.rglob("manifest.jsonl")} == before
    report = merge(out, ["test"])  # room again
    assert report.records == 100
    assert len(strict_lines(out / "manifest.jsonl")) == 100
    assert not (out / "shards").exists()


# -- the one atomic writer's other users: eval's report, the gallery, Ray, merge --------

def test_eval_report_on_a_full_disk_is_one_line(tmp_path):
    out = tmp_path / "eval"
    photos = [str(ROOT / "examples" / "photos" / n) for n in ("coffee.png", "chelsea.png")]
    with full_disk(f"{out}/*", after=100):
        result = CliRunner().invoke(app, [
            "eval", *photos, *SMALL[:6], "--methods", "random", "--steps", "4", "--samples",
            "1", "--out", str(out), "-q"])
    assert result.exit_code == 2, result.output
    assert stderr_lines(result) == [
        f"fullgrad: error: no space left on device writing {out / 'eval.json'}"]
    assert sorted(p.name for p in out.iterdir()) == []  # no temporary file left


def gallery_files(out: Path) -> list[Path]:
    """The gallery's files in ``out``; no hidden temporary file anywhere in the tree."""
    leftovers = [p for p in out.rglob(".*") if p.is_file() and p.name != ".fullgrad.lock"]
    assert leftovers == []
    return [p for p in [out / "index.html", *out.rglob("thumbs/*"), *out.rglob("gallery/**/*")]
            if p.is_file()]


def assert_gallery_whole(out: Path, room: Path) -> None:
    """Every gallery file in ``out`` is whole: a thumbnail decodes, any other file is the
    one a build with room (``room``, a copy of the same tree) wrote."""
    from PIL import Image

    for path in gallery_files(out):
        if path.parent.name == "thumbs":
            with Image.open(path) as img:
                img.load()
        elif path.name != "terms-cache.json":  # holds times: compared as JSON
            assert path.read_bytes() == (room / path.relative_to(out)).read_bytes(), path
        else:
            json.loads(path.read_text("utf-8"))


@pytest.fixture(scope="module")
def dumped(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dumped") / "out"
    assert dump(photos, out, "--save", "heatmap,overlay,map,decomp").exit_code == 0
    return out


def _sizes(out: Path) -> tuple[int, int]:
    """Bytes of the thumbnails and of everything else a gallery build writes."""
    thumbs = sum(p.stat().st_size for p in out.rglob("thumbs/*"))
    return thumbs, sum(p.stat().st_size for p in gallery_files(out)) - thumbs


@pytest.mark.parametrize("where", ["thumbs", "page"])
def test_gallery_on_a_full_disk_is_one_line_naming_the_file(dumped, tmp_path, where):
    room, out = tmp_path / "room", tmp_path / "out"
    shutil.copytree(dumped, room)
    shutil.copytree(dumped, out)
    assert CliRunner().invoke(app, ["gallery", str(room), "-q"]).exit_code == 0
    thumbs, page = _sizes(room)
    after = thumbs // 2 if where == "thumbs" else thumbs + page // 2
    with full_disk(f"{out}/*", after=after) as fault:
        result = CliRunner().invoke(app, ["gallery", str(out), "--threads", "1", "-q"])
    assert fault.failed
    assert result.exit_code == 2, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    prefix = f"fullgrad: error: no space left on device writing {out}/"
    assert lines[0].startswith(prefix) and ".tmp" not in lines[0], lines
    named = out / lines[0][len(prefix) - len(f"{out}/"):].split(" ")[-1]
    assert named.parent.name == ("thumbs" if where == "thumbs" else "gallery"), named
    assert_gallery_whole(out, room)
    assert CliRunner().invoke(app, ["gallery", str(out), "-q"]).exit_code == 0  # room again


def test_dump_gallery_on_a_full_disk_keeps_the_dump(photos, tmp_path):
    out = tmp_path / "out"
    with full_disk(f"{out}/thumbs/*", after=3000) as fault:
        result = dump(photos, out, "--gallery", "--save", "heatmap,overlay")
    assert fault.failed
    assert result.exit_code == 2, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"fullgrad: error: no space left on device writing "
                               f"{out}/thumbs/"), lines
    assert lines[0].endswith("; the gallery is incomplete, the dump's results are whole "
                             "and kept"), lines
    assert ".tmp" not in lines[0]
    recs = strict_lines(out / "manifest.jsonl")
    assert len(recs) == 6 and {r["status"] for r in recs} == {"ok"}
    gallery_files(out)  # no temporary file left
    from PIL import Image

    for thumb in (out / "thumbs").iterdir():
        with Image.open(thumb) as img:
            img.load()


def test_a_thumbnail_failing_otherwise_stays_one_line_each(dumped, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(dumped, out)
    with failing_files(f"{out}/thumbs/*", errno.EIO, files=2):
        result = CliRunner().invoke(app, ["gallery", str(out), "--threads", "1", "-q"])
    assert result.exit_code == 1, result.output
    lines = stderr_lines(result)
    assert len(lines) == 2 and all(
        line.startswith("fullgrad: gallery: ") and "thumbnail failed" in line
        and "Input/output error writing " in line for line in lines), lines
    assert (out / "index.html").is_file()
    gallery_files(out)


def test_gallery_other_errors_than_writes_are_internal(dumped, tmp_path, monkeypatch):
    import fgcli.gallery

    def broken(*args, **kwargs):
        raise OSError(errno.EBADF, "Bad file descriptor")

    out = tmp_path / "out"
    shutil.copytree(dumped, out)
    monkeypatch.setattr(fgcli.gallery, "collect_images", broken)
    result = CliRunner().invoke(app, ["gallery", str(out)])
    assert result.exit_code == 3, result.output
    assert stderr_lines(result)[0].startswith("fullgrad: error: internal error: OSError")


def test_ray_actor_full_disk_still_writes_run_json(photos, tmp_path, monkeypatch):
    """A full disk an actor reports (TreeWriteError back through Ray) halts the run as a
    plain run does: run.json records the error, then exit 2. Ray itself is faked: the
    driver's handling is what is tested (no Ray start)."""
    pytest.importorskip("ray")
    from fgcli.distributed import ray_data

    out = tmp_path / "out"
    full = DiskFullError(out / "overlays" / "cat3.jpg")

    class FakeRay:
        @staticmethod
        def is_initialized() -> bool:
            return True

    def compute(state, items, cfg, cwd, reporter):
        def rows():
            yield {"record": json.dumps({"key": "cat0.png", "rank": None, "status": "failed",
                                         "error": "x", "outputs": {}, "input": "cat0.png"})}
            raise RuntimeError("ray wrapped") from full  # as Ray wraps an actor's error
        ray_data.write_records(state.ledger, ray_data._records(rows()))

    monkeypatch.setattr(ray_data, "_import_ray", lambda: FakeRay)
    monkeypatch.setattr(ray_data, "_compute", compute)
    result = dump(photos, out, "--ray")
    assert result.exit_code == 2, result.output
    assert stderr_lines(result) == ["fullgrad: failed: cat0.png: x", f"fullgrad: error: {full}"]
    run = json.loads((out / "run.json").read_text("utf-8"))
    assert run["error"] == str(full) and run["engine"] == "ray"
    assert [r["key"] for r in strict_lines(out / "manifest.jsonl")] == ["cat0.png"]


def test_merged_run_json_has_no_one_shards_run_fields(tmp_path):
    from fgcli.tree.shards import merge

    out = tmp_path / "out"
    for index in range(2):
        with _shard_of_two(out, index) as shard:
            shard.append(_record(f"s{index}/k", time="2026-01-01T00:00:00"))
            shard.write_json(shard.run_json_path, {
                "model": "m", "finished": f"2026-01-01T00:00:0{index}", "cwd": "/w",
                "interrupted": "SIGTERM" if index else None,
                "error": "no space left on device writing x" if index else None})
    merge(out, ["test"])
    run = json.loads((out / "run.json").read_text("utf-8"))
    assert "interrupted" not in run and "error" not in run
    assert run["model"] == "m" and run["cwd"] == "/w"
    by_shard = {s["shard"]: s for s in run["shards"]}
    assert by_shard["1/2"]["interrupted"] == "SIGTERM"
    assert by_shard["1/2"]["error"].startswith("no space left")


@pytest.mark.parametrize("shard", [None, "0-of-2"])
def test_a_failed_holder_write_leaks_no_locked_handle(tmp_path, monkeypatch, shard):
    import fgcli.tree.lock

    opened = []

    class NoRoom:
        """A lock file whose holder text does not fit (the buffered write bypasses
        os.write, so faults.py cannot reach it)."""

        def __init__(self, *args, **kwargs) -> None:
            self.fh = open(*args, **kwargs)  # noqa: SIM115 - closed by the code under test
            opened.append(self)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fgcli.tree.lock, "open", NoRoom, raising=False)
    tree = OutputTree(tmp_path / "out", shard)
    with pytest.raises(OSError, match="No space"):
        tree.acquire(["test"])
    assert opened and all(o.fh.closed for o in opened)
    assert tree.lock.handles == []


def test_ray_driver_parses_actor_lines_strictly():
    """An actor's record line is a manifest line: bare NaN is refused (a warning, not
    written), as every reader of a manifest does."""
    pytest.importorskip("ray")
    from fgcli.distributed import ray_data
    state = DriverState()
    good = '{"key": "a.png", "status": "ok", "rank": null, "outputs": {}}'
    rows = [{"record": good}, {"record": good.replace("a.png", "b.png")[:-1] + ', "logit": NaN}'}]
    assert ray_data.write_records(state, ray_data._records(rows)) == 0
    assert [r["key"] for r in state.written] == ["a.png"]
    assert len(state.warned) == 1 and "(first: not strict JSON (" in state.warned[0]
