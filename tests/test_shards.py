"""--shard I/N, shard locks, `fullgrad merge`, and what -q still reports."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import PHOTOS, SQUEEZENET, cli, one_thread

from fgcli.tree.shards import Shard, shard_of

SMALL = [*SQUEEZENET, "--workers", "0"]
TIMING = ("seconds", "time")
FLOATS = ("logit", "prob", "residual")


def dump(inputs: Path | str, out: Path, *extra: str):
    return cli("dump", str(inputs), *SMALL, "--out", str(out), *extra)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def comparable(out: Path) -> dict[tuple[str, object], dict]:
    """Manifest records by (key, rank), without the fields that time a run."""
    found = {}
    for rec in records(out / "manifest.jsonl"):
        key = (rec["key"], rec.get("rank"))
        assert key not in found, f"{key} twice in the manifest"
        found[key] = {k: v for k, v in rec.items() if k not in TIMING}
    return found


def assert_same_records(a: dict, b: dict) -> None:
    """Equal records, scores within float rounding (batches are composed differently)."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = dict(a[key]), dict(b[key])
        scale = max(1.0, abs(x.get("logit") or 0.0))
        for name in FLOATS:
            if name in x or name in y:
                assert abs(x.pop(name) - y.pop(name)) <= 1e-4 * scale, (key, name)
        sx, sy = x.pop("stats", None), y.pop("stats", None)  # from maps equal to rounding
        assert (sx is None) == (sy is None), key
        if sx is not None:
            assert sx.keys() == sy.keys()
            for name in sx:
                assert (sx[name] is None) == (sy[name] is None), (key, name)
                if sx[name] is not None:
                    assert abs(sx[name] - sy[name]) <= 1e-3 * max(1.0, abs(sx[name])), \
                        (key, name)
        assert x == y


def hold(out: Path, shard: str | None) -> subprocess.Popen:
    """Another process holding the tree (shard None) or one shard of it."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from fgcli.tree.writer import OutputTree; "
         "tree = OutputTree(sys.argv[1], sys.argv[2] or None); "
         "tree.acquire(['fullgrad', 'dump', 'holder']); print('held', flush=True); "
         "time.sleep(120)", str(out), shard or ""],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


# -- the partition -----------------------------------------------------------------

def test_shard_of_is_a_fixed_function_of_the_key():
    # the contract: BLAKE2b-64 of the key's UTF-8 bytes, big-endian, mod N. These values
    # must never change between versions, machines or processes (resumed shards rely on it)
    keys = ["coffee.png", "sub/chelsea.png", "a/b/c.jpg", "ümlaut.jpg"]
    expected = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") % 7
                for k in keys]
    assert [shard_of(k, 7) for k in keys] == expected
    assert [shard_of(k, 7) for k in keys] == [6, 0, 2, 4]
    # the same in another process with another hash seed
    code = ("from fgcli.tree.shards import shard_of; "
            f"print([shard_of(k, 7) for k in {keys!r}])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True)
    assert other.stdout.strip() == str(expected)


def test_shards_partition_the_keys_evenly():
    keys = [f"dir{i % 13}/img{i:05d}.jpg" for i in range(4000)]
    owners = [[Shard(i, 4).owns(k) for i in range(4)] for k in keys]
    assert all(sum(row) == 1 for row in owners)  # every key in exactly one shard
    sizes = [sum(row[i] for row in owners) for i in range(4)]
    assert all(900 < n < 1100 for n in sizes), sizes


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_bad_shard_is_a_usage_error(tmp_path, text):
    result = dump(PHOTOS, tmp_path / "out", "--shard", text)
    assert result.exit_code == 2
    assert "--shard: expected I/N" in result.stderr and not (tmp_path / "out").exists()


def test_shard_membership_does_not_depend_on_the_listing(tmp_path, images):
    for i in range(10):  # enough files that both shards get some, whatever tmp_path is
        (images / f"copy{i}.png").write_bytes((PHOTOS / "coffee.png").read_bytes())
    files = sorted(str(p) for p in images.rglob("*.png"))
    forward, backward = tmp_path / "fwd.txt", tmp_path / "bwd.txt"
    forward.write_text("\n".join(files) + "\n")
    backward.write_text("\n".join(reversed(files)) + "\n")
    got = []
    for listing, out in ((forward, tmp_path / "a"), (backward, tmp_path / "b")):
        result = cli("dump", "--files-from", str(listing), *SMALL, "--out", str(out),
                     "--shard", "1/2", "--save", "map")
        assert result.exit_code == 0, result.stderr
        got.append({r["key"] for r in records(out / "shards" / "1-of-2" / "manifest.jsonl")})
    assert got[0] == got[1] and 0 < len(got[0]) < len(files)


# -- shards side by side, and merged ---------------------------------------------------

@pytest.mark.slow
def test_concurrent_shard_processes_equal_a_single_run(tmp_path, images):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    script = Path(sys.executable).with_name("fullgrad")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fgcli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    procs = [subprocess.Popen([*command, "dump", str(images), *SMALL, "--out", str(sharded),
                               "--shard", f"{i}/3", "--quiet"], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    with one_thread():  # meanwhile, the single run (in this process, one thread as theirs)
        alone = dump(images, single, "--quiet")
    errors = [p.communicate(timeout=600)[1] for p in procs] + [alone.stderr]
    codes = [p.returncode for p in procs] + [alone.exit_code]
    owner = shard_of("broken.jpg", 3)
    # the broken file fails in its own shard only, reported once, with the shard
    assert codes == [1 if i == owner else 0 for i in range(3)] + [1], errors
    assert sum("broken.jpg" in e for e in errors[:3]) == 1
    assert f"fullgrad: shard {owner}/3: failed: {images / 'broken.jpg'}: " in errors[owner]
    assert not (sharded / "manifest.jsonl").exists()
    assert len(list((sharded / "shards").iterdir())) == 3

    merged = cli("merge", str(sharded))
    assert merged.exit_code == 0, merged.stderr
    assert "merged 3 shard(s)" in merged.stderr and "failed 1" in merged.stderr
    assert not (sharded / "shards").exists()
    assert_same_records(comparable(sharded), comparable(single))
    files = sorted(p.relative_to(single).as_posix() for p in single.rglob("*") if p.is_file()
                   and p.name not in ("run.json", "manifest.jsonl", ".fullgrad.lock"))
    assert files == sorted(p.relative_to(sharded).as_posix() for p in sharded.rglob("*")
                           if p.is_file() and p.name not in ("run.json", "manifest.jsonl",
                                                              ".fullgrad.lock"))
    for name in (f for f in files if f.endswith(".npy")):
        a, b = np.load(single / name), np.load(sharded / name)
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(a).max()))
    run = json.loads((sharded / "run.json").read_text())
    assert run["counts"] == {"ok": 6, "skipped": 0, "failed": 1}
    assert sorted(s["shard"] for s in run["shards"]) == ["0/3", "1/3", "2/3"]
    assert run["settings"] == json.loads((single / "run.json").read_text())["settings"]
    # merged lines are sorted by key
    keys = [r["key"] for r in records(sharded / "manifest.jsonl")]
    assert keys == sorted(keys, key=lambda k: k.split("/"))


def test_merge_after_a_crashed_and_resumed_shard(tmp_path, images):
    out = tmp_path / "out"
    for i in range(2):
        dump(images, out, "--shard", f"{i}/2")
    crashed = out / "shards" / "1-of-2" / "manifest.jsonl"
    lines = crashed.read_text().splitlines(keepends=True)
    assert len(lines) >= 2
    # the crash: the last line torn mid-write, an output of a finished image gone,
    # no run.json, and the killed run's holder text left in the shard's lock file
    crashed.write_text(lines[0] + lines[1] + lines[-1][: len(lines[-1]) // 2])
    gone = json.loads(lines[1])
    for rel in gone["outputs"].values():
        (out / rel).unlink()
    (out / "shards" / "1-of-2" / "run.json").unlink()
    (out / "shards" / "1-of-2" / ".fullgrad.lock").write_text(
        json.dumps({"pid": 999999, "host": "gone", "command": ["x"]}))
    partial = cli("merge", str(out))  # merging a crashed shard keeps what it finished
    assert partial.exit_code == 0, partial.stderr
    merged_once = comparable(out)
    assert (json.loads(lines[0])["key"], None) in merged_once

    resumed = dump(images, out, "--shard", "1/2")
    assert resumed.exit_code in (0, 1), resumed.stderr
    shard1 = records(out / "shards" / "1-of-2" / "manifest.jsonl")
    status = {r["key"]: r["status"] for r in shard1}
    assert status[json.loads(lines[0])["key"]] == "skipped"  # done before the crash
    assert status[gone["key"]] == "ok"  # its file was lost: computed again
    assert cli("merge", str(out)).exit_code == 0
    final = comparable(out)
    everything = {p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file()}
    assert {key for key, _ in final} == everything  # every image once
    assert all((out / rel).is_file() for rec in final.values() for rel in rec["outputs"].values())
    before = (out / "manifest.jsonl").read_bytes()
    again = cli("merge", str(out))
    assert again.exit_code == 0 and "no shards to merge" in again.stderr
    assert (out / "manifest.jsonl").read_bytes() == before


def test_newest_record_of_a_key_wins_the_merge(tmp_path, images):
    out = tmp_path / "out"
    dump(images, out)  # broken.jpg fails in the plain run's manifest
    assert comparable(out)[("broken.jpg", None)]["status"] == "failed"
    (images / "broken.jpg").write_bytes((PHOTOS / "rocket.jpg").read_bytes())  # mended
    owner = shard_of("broken.jpg", 2)
    assert dump(images, out, "--shard", f"{owner}/2").exit_code == 0
    cli("merge", str(out))
    final = comparable(out)
    assert final[("broken.jpg", None)]["status"] == "ok"
    assert {r["status"] for k, r in final.items() if k[0] != "broken.jpg"} == {"ok", "skipped"}


def test_plain_run_folds_unmerged_shards_first(tmp_path, images):
    out = tmp_path / "out"
    dump(images, out, "--shard", "0/2")
    done = {r["key"] for r in records(out / "shards" / "0-of-2" / "manifest.jsonl")
            if r["status"] == "ok"}  # failed images are tried again
    result = dump(images, out)
    assert "merged 1 shard manifest" in result.stderr
    assert not (out / "shards").exists()
    final = comparable(out)
    assert len(final) == 7
    assert {k for (k, _), r in final.items() if r["status"] == "skipped"} == done


# -- locks --------------------------------------------------------------------------

def test_plain_run_refused_while_a_shard_runs_and_the_reverse(tmp_path):
    out = tmp_path / "out"
    holder = hold(out, "1-of-2")
    try:
        plain = dump(PHOTOS / "coffee.png", out)
        assert plain.exit_code == 2
        assert "1 running shard(s)" in plain.stderr and f"shard 1-of-2 by pid {holder.pid}" in \
            plain.stderr
        merge = cli("merge", str(out))
        assert merge.exit_code == 2 and f"pid {holder.pid}" in merge.stderr
        same = dump(PHOTOS / "coffee.png", out, "--shard", "1/2")
        assert same.exit_code == 2 and f"shard 1-of-2 of {out} is in use by pid " \
            f"{holder.pid}" in same.stderr
        other_count = dump(PHOTOS / "coffee.png", out, "--shard", "0/3")
        assert other_count.exit_code == 2 and "another count" in other_count.stderr
        sibling = dump(PHOTOS / "coffee.png", out, "--shard", "0/2")  # runs beside it
        assert sibling.exit_code == 0, sibling.stderr
    finally:
        holder.kill()
        holder.wait()
    holder = hold(out, None)
    try:
        shard = dump(PHOTOS / "coffee.png", out, "--shard", "0/2")
        assert shard.exit_code == 2
        assert f"pid {holder.pid}" in shard.stderr and "fullgrad dump holder" in shard.stderr
    finally:
        holder.kill()
        holder.wait()
    assert dump(PHOTOS / "coffee.png", out).exit_code == 0  # the killed holders left nothing


# -- reports --------------------------------------------------------------------------

def test_quiet_keeps_failures_and_empty_inputs_on_stderr(tmp_path, images):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    result = cli("dump", str(images), str(empty), *SMALL, "--out", str(tmp_path / "out"),
                 "-q")
    assert result.exit_code == 1
    lines = sorted(result.stderr.splitlines())
    assert lines == [f"fullgrad: failed: {images / 'broken.jpg'}: not an image Pillow can read",
                     f"fullgrad: warning: {empty}: no image files in this directory "
                     "(extensions: .jpg, .png, .webp, ... see the README)"]
    listing = tmp_path / "list.txt"
    listing.write_text("")
    only = cli("dump", "--files-from", str(listing), *SMALL, "--out", str(tmp_path / "o2"),
               "-q")
    assert only.exit_code == 0
    assert only.stderr.strip() == f"fullgrad: warning: --files-from {listing}: the file " \
                                  "lists no paths"


def test_shard_warns_of_empty_inputs_once(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    first = cli("dump", str(empty), *SMALL, "--out", str(tmp_path / "o"), "--shard", "0/2")
    second = cli("dump", str(empty), *SMALL, "--out", str(tmp_path / "o"), "--shard", "1/2")
    assert "shard 0/2: warning:" in first.stderr and "no image files" in first.stderr
    assert "no image files" not in second.stderr


def _line(key: str, status: str, when: str, note: str) -> str:
    return json.dumps({"schema": 1, "key": key, "input": key, "status": status,
                       "rank": None, "time": when, "note": note}) + "\n"


def test_merge_rule_later_line_in_a_file_later_time_across_files(tmp_path):
    from fgcli.tree.shards import merge

    out = tmp_path / "out"
    shard = out / "shards" / "0-of-2"
    shard.mkdir(parents=True)
    (out / "manifest.jsonl").write_text(
        _line("a.jpg", "ok", "2026-01-02T00:00:00.000+00:00", "main, newer than the shard")
        + _line("b.jpg", "failed", "2026-01-01T00:00:00.000+00:00", "main, older"))
    (shard / "manifest.jsonl").write_text(
        _line("a.jpg", "failed", "2026-01-01T00:00:00.000+00:00", "shard, older")
        + _line("b.jpg", "ok", "2026-01-03T00:00:00.000+00:00", "shard, first")
        # a clock stepped back: the later line of one file still wins
        + _line("b.jpg", "skipped", "2026-01-02T00:00:00.000+00:00", "shard, last"))
    report = merge(out, ["test"])
    assert report.shards == ["0-of-2"] and report.lines == 5 and report.records == 2
    got = {r["key"]: r["note"] for r in records(out / "manifest.jsonl")}
    assert got == {"a.jpg": "main, newer than the shard", "b.jpg": "shard, last"}
    assert not (out / "shards").exists()


def test_refused_shards_leave_no_folder_and_merge_skips_empty_ones(tmp_path):
    out = tmp_path / "out"
    holder = hold(out, "0-of-2")
    try:
        refused = dump(PHOTOS / "coffee.png", out, "--shard", "2/3")
        assert refused.exit_code == 2 and "another count" in refused.stderr
        assert not (out / "shards" / "2-of-3").exists()
    finally:
        holder.kill()
        holder.wait()
    # the killed holder left an empty folder with a lock: merge drops it, reports nothing
    result = cli("merge", str(out))
    assert result.exit_code == 0 and "no shards to merge" in result.stderr
    assert not (out / "shards").exists() and not (out / "run.json").exists()
