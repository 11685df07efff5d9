"""Reading a damaged tree back (issue #17, item 8; and merge's stale shards, item 12).

Every reader of a manifest (a resumed dump, compaction, merge, the gallery) skips a
malformed line with one warning line per file, never crashes, and never reads a path
that leads out of the tree. Damaged trees are a tiny real dump with manifest.jsonl edited.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import PHOTOS, SQUEEZENET, cli

from fgcli.tree.manifest import BadLines, TreeFiles, check_record, iter_manifest, parse_line

SMALL = [*SQUEEZENET, "--workers", "0", "--save", "heatmap,overlay,decomp"]
SECRET = "secret-outside-the-tree"  # the content of a file outside every tree
BAD = "chelsea.png"  # the record that gets damaged
GOOD = "coffee.png"  # its neighbour, left alone


def warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "warning:" in line]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(images, tree): a dump of two photos, made once."""
    root = tmp_path_factory.mktemp("readback")
    imgs = root / "imgs"
    imgs.mkdir()
    for name in (BAD, GOOD):
        shutil.copy(PHOTOS / name, imgs / name)
    out = root / "tree"
    result = cli("dump", str(imgs), *SMALL, "--out", str(out))
    assert result.exit_code == 0, result.stderr
    return imgs, out


@pytest.fixture()
def tree(base, tmp_path) -> Path:
    """A fresh copy of the base tree for one test, and a file beside it (outside it)."""
    copy = tmp_path / "tree"
    shutil.copytree(base[1], copy, symlinks=True)
    (tmp_path / "outside.txt").write_text(SECRET)
    return copy


def _edit(field: str, value: object) -> Callable[[dict], dict]:
    def edit(rec: dict) -> dict:
        rec = dict(rec)
        if value is _DELETE:
            rec.pop(field)
        elif field.startswith("outputs."):
            rec["outputs"] = dict(rec["outputs"], **{field[8:]: value})
        else:
            rec[field] = value
        return rec
    return edit


_DELETE = object()
# kind -> (edit of BAD's record, or None; extra raw line(s), where BAD's line stays good)
RECORD_DAMAGE = {
    "rank-not-int": _edit("rank", "x"),
    "rank-zero": _edit("rank", 0),
    "rank-bool": _edit("rank", True),
    "no-key": _edit("key", _DELETE),
    "key-dotdot": _edit("key", "../../evil.png"),
    "key-absolute": _edit("key", "/tmp/evil.png"),
    "output-dotdot": _edit("outputs.heatmap", "../../../../../etc/passwd"),
    "output-absolute": _edit("outputs.overlay", "/etc/passwd"),
    "status-unknown": _edit("status", "great"),
    "outputs-not-dict": _edit("outputs", ["heatmaps/chelsea.png.png"]),
    "logit-string": _edit("logit", "38.6"),
}
LINE_DAMAGE = {
    "nan-token": None,  # BAD's line with a bare NaN for its logit
    "json-array": b"[1, 2, 3]\n",
    "binary-garbage": b"\xff\xfe\x00\x81garbage\x00\n",
    "torn-last-line": b"",  # half of GOOD's line at the end, no newline
}
KINDS = [*RECORD_DAMAGE, *LINE_DAMAGE, "symlink-out"]
REPLACED = {*RECORD_DAMAGE, "nan-token"}  # BAD's only line is the damaged one


def damage(tree: Path, kind: str) -> None:
    """Damage BAD's record (or add a bad line next to the good ones) in ``tree``."""
    path = tree / "manifest.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    recs = [json.loads(line) for line in lines]
    i = next(n for n, r in enumerate(recs) if r["key"] == BAD)
    if kind in RECORD_DAMAGE:
        lines[i] = json.dumps(RECORD_DAMAGE[kind](recs[i])).encode() + b"\n"
    elif kind == "nan-token":
        text = json.dumps(recs[i])
        lines[i] = text.replace(json.dumps(recs[i]["logit"]), "NaN").encode() + b"\n"
        assert b"NaN" in lines[i]
    elif kind == "torn-last-line":
        good = next(line for line in lines if GOOD.encode() in line)
        lines.append(good[: len(good) // 2])
    elif kind == "symlink-out":  # the heatmap file is a link to a file outside the tree
        heatmap = tree / recs[i]["outputs"]["heatmap"]
        heatmap.unlink()
        heatmap.symlink_to(tree.parent / "outside.txt")
    else:
        lines.insert(i, LINE_DAMAGE[kind])
    path.write_bytes(b"".join(lines))


def outside_secrets(tree: Path) -> str:
    """Anything the gallery wrote that names or holds a path outside the tree."""
    text = "".join(p.read_text("ascii") for p in [tree / "gallery" / "data.js",
                                                  *(tree / "gallery" / "records").iterdir()])
    found = [s for s in ("passwd", "evil", "/etc/", "outside.txt", SECRET) if s in text]
    return ", ".join(found)


def assert_strict_and_valid(path: Path) -> list[dict]:
    """Every line of a manifest parses as strict JSON and is a well-formed record."""
    recs = []
    for line in path.read_bytes().splitlines():
        rec = parse_line(line)
        assert check_record(rec) is None, (line, check_record(rec))
        recs.append(rec)
    return recs


def page_keys(tree: Path) -> list[str]:
    text = (tree / "gallery" / "data.js").read_text("ascii").strip()
    head, tail = "fgcliData(JSON.parse(", "));"
    data = json.loads(json.loads(text[len(head):-len(tail)]))
    return [row[0] for row in data["images"]]


# -- the one validation --------------------------------------------------------------

def _record() -> dict:
    return {"schema": 1, "input": "imgs/a.png", "key": "sub/a.png", "settings": "x",
            "status": "ok", "error": None, "rank": 1, "target": 3, "target_name": "cat",
            "logit": 1.5, "prob": 0.5, "residual": 0.0, "seconds": 0.1,
            "outputs": {"heatmap": "heatmaps/sub/a.png.top1_3.png"},
            "time": "2026-01-01T00:00:00.000+00:00"}


@pytest.mark.parametrize("change, reason", [
    ({"rank": "1"}, "rank is not a positive integer"),
    ({"rank": 0}, "rank is not a positive integer"),
    ({"rank": True}, "rank is not a positive integer"),
    ({"rank": 1.0}, "rank is not a positive integer"),
    ({"key": ""}, "key is not a non-empty string"),
    ({"key": 7}, "key is not a non-empty string"),
    ({"key": "a/../../b.png"}, "key has a '..' component"),
    ({"key": "/etc/b.png"}, "key is an absolute path"),
    ({"key": "a\0b.png"}, "key contains NUL"),
    ({"key": "a\udcffb.png"}, "key is not valid Unicode"),
    ({"status": "done"}, "status is not ok, failed or skipped"),
    ({"input": None}, "input is not a string"),
    ({"outputs": "heatmaps/a.png"}, "outputs is not an object"),
    ({"outputs": {"thumb": "x.png"}}, "outputs has an unknown kind 'thumb'"),
    ({"outputs": {"map": "../x.npy"}}, "outputs.map has a '..' component"),
    ({"outputs": {"map": "/x.npy"}}, "outputs.map is an absolute path"),
    ({"outputs": {"map": 3}}, "outputs.map is not a non-empty string"),
    ({"logit": "1.5"}, "logit is not a number"),
    ({"prob": float("inf")}, "prob is not finite"),
    ({"residual": float("nan")}, "residual is not finite"),
    ({"logit": 10 ** 400}, "logit is not finite"),
    ({"target": 10 ** 400}, "target is not finite"),
    ({"target": 2.0}, "target is not an integer"),
    ({"target": -1}, "target is not >= 0"),
    ({"seconds": False}, "seconds is not a number"),
    ({"time": 5}, "time is not a string"),
])
def test_check_record_names_what_is_malformed(change, reason):
    assert check_record(_record()) is None
    assert check_record({**_record(), **change}) == reason


def test_check_record_accepts_what_dumps_write():
    failed = {"schema": 1, "input": "x.png", "key": "x.png", "settings": "s",
              "status": "failed", "error": "corrupt", "outputs": {}, "rank": None,
              "time": "t"}
    assert check_record(failed) is None
    assert check_record({"key": "x.png", "status": "skipped"}) is None  # a hand-made line
    assert check_record([failed]) == "not a JSON object"


def test_iter_manifest_counts_bad_lines_once_per_file(tmp_path):
    path = tmp_path / "manifest.jsonl"
    good = json.dumps(_record())
    path.write_bytes(b"\n".join([b"[1]", good.encode(), b'{"key": NaN}', b"",
                                 b"\xff garbage", good.encode()[:20]]))
    bad = BadLines()
    assert [rec["key"] for _, rec in iter_manifest(path, bad)] == ["sub/a.png"]
    assert bad.warnings() == [f"{path}: skipped 4 malformed line(s) (first: line 1: not a "
                              "JSON object)"]
    bad = BadLines()
    list(iter_manifest(path, bad))
    assert bad.warnings(lambda p: True)[0].startswith(f"{path}: dropped 4 ")
    path.write_bytes(good.encode() + b"\n" + good.encode()[:20])
    bad = BadLines()
    list(iter_manifest(path, bad))
    assert "line 2: torn" in bad.warnings()[0]


def test_tree_files_refuse_links_out_of_the_tree(tmp_path):
    root = tmp_path / "tree"
    (root / "maps").mkdir(parents=True)
    (root / "maps" / "a.npy").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.npy").write_bytes(b"x")
    (root / "maps" / "in.npy").symlink_to(root / "maps" / "a.npy")
    (root / "maps" / "out.npy").symlink_to(tmp_path / "elsewhere" / "b.npy")
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    files = TreeFiles(root)
    assert files.state("maps/a.npy") == "file"
    assert files.state("maps/in.npy") == "file"  # a link inside the tree is fine
    assert files.state("maps/gone.npy") == "missing"
    assert files.state("maps/out.npy") == "outside"
    assert files.state("linked/b.npy") == "outside"  # a folder that leads out
    assert files.state("../elsewhere/b.npy") == "outside"
    assert files.state(str(tmp_path / "elsewhere" / "b.npy")) == "outside"
    assert files.outside({"map": "maps/a.npy", "heatmap": "linked/b.npy"}) == "heatmap"


# -- every reader, every kind of damage ----------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_gallery_skips_a_damaged_record(tree, kind):
    damage(tree, kind)
    result = cli("gallery", str(tree))
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = warnings(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fullgrad: warning: {tree / 'manifest.jsonl'}: skipped 1 "
                               "malformed line(s) (first: ")
    keys = page_keys(tree)
    assert GOOD in keys  # the good record next to the bad one still shows
    assert (BAD in keys) == (kind not in REPLACED and kind != "symlink-out")
    assert not outside_secrets(tree)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_drops_a_damaged_line_and_keeps_the_rest(tree, kind):
    damage(tree, kind)
    shard = tree / "shards" / "0-of-2"
    shard.mkdir(parents=True)
    (tree / "manifest.jsonl").rename(shard / "manifest.jsonl")
    result = cli("merge", str(tree))
    assert result.exit_code == 0, result.stderr
    lines = warnings(result)
    if kind == "symlink-out":  # the line is well formed: merge never opens outputs
        assert lines == []
    else:
        assert lines == [lines[0]] and lines[0].startswith(
            f"fullgrad: warning: {shard / 'manifest.jsonl'}: dropped 1 malformed line(s)")
    keys = [r["key"] for r in assert_strict_and_valid(tree / "manifest.jsonl")]
    assert keys == ([GOOD] if kind in REPLACED else [BAD, GOOD])


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_dump_heals_a_damaged_tree(base, tree, kind):
    imgs = base[0]
    damage(tree, kind)
    result = cli("dump", str(imgs), *SMALL, "--out", str(tree))
    assert result.exit_code == 0, result.stderr
    lines = warnings(result)
    assert len(lines) == 1, result.stderr
    if kind == "symlink-out":
        assert "outputs.heatmap of chelsea.png leads outside the tree" in lines[0]
        assert not (tree / "heatmaps" / "chelsea.png.png").is_symlink()  # replaced
    else:
        assert lines[0].startswith(f"fullgrad: warning: {tree / 'manifest.jsonl'}: dropped 1 "
                                   "malformed line(s) (first: line ")
    recs = {r["key"]: r for r in assert_strict_and_valid(tree / "manifest.jsonl")}
    assert sorted(recs) == [BAD, GOOD]  # compaction dropped the bad line
    assert recs[GOOD]["status"] == "skipped"  # the good record was trusted
    healed = kind in REPLACED or kind == "symlink-out"
    assert recs[BAD]["status"] == ("ok" if healed else "skipped")
    assert (tree.parent / "outside.txt").read_text() == SECRET
    gallery = cli("gallery", str(tree))
    assert gallery.exit_code == 0 and warnings(gallery) == [], gallery.stderr
    assert page_keys(tree) == [BAD, GOOD] and not outside_secrets(tree)


def test_shards_read_a_damaged_main_manifest_without_dropping_it(base, tree):
    """Shards skip the main manifest's bad line (one warning, from shard 0 alone: every
    shard reads that file) but do not rewrite that file; the merge afterwards drops it."""
    damage(tree, "rank-not-int")
    other = cli("dump", str(base[0]), *SMALL, "--out", str(tree), "--shard", "1/2")
    assert other.exit_code == 0 and warnings(other) == [], other.stderr
    first = cli("dump", str(base[0]), *SMALL, "--out", str(tree), "--shard", "0/2")
    assert first.exit_code == 0, first.stderr
    assert warnings(first) == [f"fullgrad: shard 0/2: warning: {tree / 'manifest.jsonl'}: "
                               "skipped 1 malformed line(s) (first: line 1: rank is not a "
                               "positive integer)"]
    assert b'"rank": "x"' in (tree / "manifest.jsonl").read_bytes()
    merged = cli("merge", str(tree))
    assert merged.exit_code == 0 and len(warnings(merged)) == 1, merged.stderr
    recs = {r["key"]: r for r in assert_strict_and_valid(tree / "manifest.jsonl")}
    assert sorted(recs) == [BAD, GOOD]
    assert recs[BAD]["status"] == "ok" and recs[GOOD]["status"] == "skipped"


def test_compaction_keeps_lines_apart_when_the_last_has_no_newline(tree):
    """The last line of a hand-edited file may lack its newline; when compaction moves it
    before another line, the two stay two lines."""
    path = tree / "manifest.jsonl"
    lines = path.read_bytes().splitlines()
    first = json.loads(lines[0])
    again = json.dumps(dict(first, note="again")).encode()
    path.write_bytes(lines[0] + b"\n" + lines[1] + b"\n" + again)  # no final newline
    from fgcli.tree.writer import OutputTree

    out = OutputTree(tree)
    out.acquire(["test"])
    try:
        out.compact_manifest()
    finally:
        out.release()
    recs = assert_strict_and_valid(path)
    assert [r["key"] for r in recs] == [first["key"], json.loads(lines[1])["key"]]
    assert recs[0]["note"] == "again"


# -- merge: shards of another count --------------------------------------------------

def _stamped(rec: dict, when: str, **change: object) -> bytes:
    return json.dumps({**rec, **change, "time": when}).encode() + b"\n"


def test_merge_names_stale_shards_and_loses_no_result(tree):
    """A stale shards/1-of-3 next to 0-of-2 and 1-of-2: every line is merged by time (the
    newest of each key wins, an image only the stale shard has is kept) and one warning
    names the stale shards."""
    recs = {r["key"]: r for r in assert_strict_and_valid(tree / "manifest.jsonl")}
    (tree / "manifest.jsonl").unlink()
    old, new = "2026-01-01T00:00:00.000+00:00", "2026-02-01T00:00:00.000+00:00"
    shards = tree / "shards"
    for name, body in {
        "0-of-2": _stamped(recs[BAD], new, note="current"),
        "1-of-2": _stamped(recs[GOOD], new, note="current"),
        "1-of-3": _stamped(recs[BAD], old, note="stale")
        + _stamped(recs[GOOD], old, key="only-stale.png", note="stale only"),
    }.items():
        (shards / name).mkdir(parents=True)
        (shards / name / "manifest.jsonl").write_bytes(body)
    result = cli("merge", str(tree))
    assert result.exit_code == 0, result.stderr
    assert warnings(result) == [
        "fullgrad: warning: shards 1-of-3 are from another shard count than 0-of-2, 1-of-2; "
        "their lines were merged by time (the newest line of each image wins)"]
    notes = {r["key"]: r["note"] for r in assert_strict_and_valid(tree / "manifest.jsonl")}
    assert notes == {BAD: "current", GOOD: "current", "only-stale.png": "stale only"}
    assert "3 shard(s)" in result.stderr and not shards.exists()


def test_merge_of_one_count_has_no_warning(tree):
    recs = assert_strict_and_valid(tree / "manifest.jsonl")
    for i, rec in enumerate(recs):
        (tree / "shards" / f"{i}-of-2").mkdir(parents=True)
        (tree / "shards" / f"{i}-of-2" / "manifest.jsonl").write_bytes(
            json.dumps(rec).encode() + b"\n")
    result = cli("merge", str(tree))
    assert result.exit_code == 0 and warnings(result) == [], result.stderr



def test_ray_driver_writes_no_malformed_record():
    """Records an actor returns pass the same check before the driver appends them."""
    from faults import DriverState

    from fgcli.distributed import ray_data

    state = DriverState()
    good = {"key": "a.png", "status": "ok", "rank": None, "outputs": {}}
    records = [good, dict(good, key="b.png", logit=float("nan")), dict(good, rank="x"),
               dict(good, key="c.png")]
    assert ray_data.write_records(state, records) == 0
    assert [r["key"] for r in state.written] == ["a.png", "c.png"]
    assert state.warned == ["Ray returned 2 malformed record(s), not written (first: logit "
                            "is not finite); a rerun computes those images again"]
