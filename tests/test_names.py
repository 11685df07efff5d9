"""Any file name the OS allows, end to end: non-UTF-8 bytes, newlines, control characters,
leading dashes, spaces, HTML-ish characters, names at the file system's length limit.

The rule (fgcli.names): ``input`` and ``key`` are valid Unicode with each undecodable byte
written ``\\xNN``; ``input_bytes`` (base64 of the raw path) only for such names; output
files are named after the key. Every manifest here is read with a strict parser.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest
from helpers import PHOTOS, ROOT, SQUEEZENET, cli, reject_constant
from PIL import Image

from fgcli import names

SMALL = [*SQUEEZENET, "--workers", "0"]
pytestmark = pytest.mark.skipif(sys.platform == "win32" or os.uname().sysname == "Darwin",
                                reason="names as arbitrary bytes: Linux file systems")


# ------------------------------------------------------------------------------ helpers
def dump(*args: str, **kwargs):
    return cli("dump", *SMALL, "--save", "heatmap", *args, **kwargs)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity and lone surrogates (RFC 8259 text)."""
    value = json.loads(text, parse_constant=reject_constant)
    for s in _strings(value):
        assert not re.search("[\ud800-\udfff]", s), f"lone surrogate in {s!r}"
    return value


def strict_manifest(path: Path) -> list[dict]:
    """Every line of a manifest, parsed strictly; the file is UTF-8 and ends in a newline."""
    text = path.read_bytes().decode("utf-8", "strict")
    assert text.endswith("\n")
    return [strict_json(line) for line in text.split("\n")[:-1]]


def raw_path(rec: dict) -> bytes:
    """The raw bytes of a record's input, from input_bytes or the (UTF-8) input text."""
    if "input_bytes" in rec:
        return base64.b64decode(rec["input_bytes"], validate=True)
    return rec["input"].encode("utf-8")


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.open(PHOTOS / "coffee.png").convert("RGB").resize((24, 24)).save(buf, "PNG")
    return buf.getvalue()


def make(folder: Path, name: bytes, blob: bytes) -> bytes:
    """Write ``blob`` as ``folder/name`` (a raw byte name); returns the full raw path."""
    path = os.fsencode(folder) + b"/" + name
    with open(path, "wb") as fh:
        fh.write(blob)
    return path


def key_text(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


def check_tree(out: Path, expected: dict[bytes, str], status: str = "ok") -> list[dict]:
    """One strict manifest line per expected raw path, with its key, status, input and
    input_bytes as the rule says, and its heatmap on disk; returns the records."""
    recs = strict_manifest(out / "manifest.jsonl")
    assert sorted(raw_path(r) for r in recs) == sorted(expected)
    for rec in recs:
        raw = raw_path(rec)
        assert rec["key"] == expected[raw]
        assert rec["status"] == status, rec
        assert rec["input"] == raw.decode("utf-8", "backslashreplace")
        assert ("input_bytes" in rec) == (rec["input"].encode("utf-8") != raw)
        heatmap = out / rec["outputs"]["heatmap"]
        assert heatmap.is_file() and rec["outputs"]["heatmap"].startswith("heatmaps/")
    return recs


# ------------------------------------------------------------------------ names module
def test_text_escapes_only_undecodable_bytes_and_bytes_come_back():
    path = os.fsdecode(b"/d/caf\xc3\xa9 \xff\x80-x\n.png")
    assert names.text(path) == "/d/café \\xff\\x80-x\n.png"
    fields = names.record_fields(path)
    assert fields["input"] == names.text(path)
    assert names.path_of(fields) == path
    assert names.record_fields("/d/café.png") == {"input": "/d/café.png"}
    assert names.path_of({"input": "/d/café.png"}) == "/d/café.png"
    assert names.path_of({"input": "x", "input_bytes": "not base64!"}) is None
    assert names.display(path) == "/d/café \\xff\\x80-x\\n.png"  # one line
    assert names.display("a\tb\x1b[31m\u2028") == "a\\tb\\x1b[31m\\u2028"
    assert names.href(os.fsdecode(b"../in/a b\xff%.png")) == "../in/a%20b%FF%25.png"
    assert names.clean({"e": [os.fsdecode(b"x\xff")]}) == {"e": ["x\\xff"]}


def test_fit_shortens_long_components_the_same_way_every_time():
    short = "a/b.png"
    assert names.fit(short) == short
    long_dir, long_file = "d" * 300, "\\xff" * 70  # 300 and 280 bytes
    fitted = names.fit(f"{long_dir}/{long_file}")
    head, tail = fitted.split("/")
    assert len(head.encode()) <= 255 and len(tail.encode()) <= 255 - 16
    assert re.fullmatch(r"d+~[0-9a-f]{16}", head)
    assert fitted == names.fit(f"{long_dir}/{long_file}")
    assert names.fit("é" * 200) != names.fit("é" * 199 + "e")
    assert names.fit("é" * 200).encode("utf-8").decode("utf-8")  # cut on a character


# ----------------------------------------------------------------- (a) the original case
def test_a_non_utf8_name_among_photos_is_one_image_like_the_others(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    expected = {}
    for name in (b"astronaut.png", b"bad\xff.png", b"chelsea.png", b"zz rocket.jpg"):
        source = PHOTOS / ("rocket.jpg" if name.endswith(b".jpg") else "coffee.png")
        expected[make(folder, name, source.read_bytes())] = key_text(name)
    out = tmp_path / "out"
    first = dump(str(folder), "--out", str(out))
    assert first.exit_code == 0, first.output
    recs = check_tree(out, expected)
    bad = next(r for r in recs if r["key"] == "bad\\xff.png")
    assert os.path.isfile(base64.b64decode(bad["input_bytes"]))
    assert (out / "heatmaps" / "bad\\xff.png.png").is_file()  # the escaped name on disk
    assert all(os.fsencode(p.name).decode("utf-8") for p in out.rglob("*"))

    again = dump(str(folder), "--out", str(out), "--json")
    assert again.exit_code == 0
    check_tree(out, expected, status="skipped")
    assert len(again.stdout.splitlines()) == 4  # --json lines: valid UTF-8 text
    assert all(strict_json(line)["status"] == "skipped" for line in again.stdout.splitlines())


@pytest.mark.slow
def test_raw_names_on_a_real_command_line_and_stderr(tmp_path):
    """A real process: raw bytes in argv (a folder, a file after ``--`` with a leading
    dash) and in the working directory; the failed line is one line on stderr, run.json is
    strict with ``cwd_bytes``, and the gallery, built from elsewhere, finds the originals
    that are relative to that directory."""
    cwd = os.fsencode(tmp_path) + b"/cwd\xfd"
    os.makedirs(cwd + b"/in\xfc")
    make(Path(os.fsdecode(cwd)), b"in\xfc/good\xe9.png", small_png())
    make(Path(os.fsdecode(cwd)), b"in\xfc/broken\xfe\n\x1b.jpg", b"not a jpeg")
    make(Path(os.fsdecode(cwd)), b"-x\xfb.png", small_png())
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([sys.executable, "-m", "fgcli", "dump", *SMALL, "--save", "heatmap",
                          "--out", str(out), "--quiet", "--", b"in\xfc", b"-x\xfb.png"],
                         cwd=cwd, env=env, capture_output=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert run.stderr.decode("utf-8").splitlines() == [
        "fullgrad: failed: in\\xfc/broken\\xfe\\n\\x1b.jpg: not an image Pillow can read"]
    recs = {r["key"]: r for r in strict_manifest(out / "manifest.jsonl")}
    assert {k: r["status"] for k, r in recs.items()} == {
        "in\\xfc/broken\\xfe\n\x1b.jpg": "failed", "in\\xfc/good\\xe9.png": "ok",
        "-x\\xfb.png": "ok"}
    info = strict_json((out / "run.json").read_bytes().decode("utf-8"))
    assert base64.b64decode(info["cwd_bytes"]) == cwd and info["cwd"].endswith("cwd\\xfd")
    assert info["command"][-2:] == ["in\\xfc", "-x\\xfb.png"]

    assert cli("gallery", str(out)).exit_code == 0  # this process's cwd is elsewhere
    from gallery_util import page_data

    data = page_data(out)
    for row in data["images"]:
        if row[1] == "ok":
            target = os.fsencode(out) + b"/" + unquote_to_bytes(row[2]["href"])
            assert os.path.realpath(target) == os.path.realpath(
                cwd + b"/" + raw_path(recs[row[0]]))


# ------------------------------------------------------------------- (b) path lists
def test_files_from_null_and_stdin_lists_with_raw_names(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    blob = small_png()
    raws = [make(folder, n, blob) for n in (b"a\xff.png", b"-dash\n\x80.png", b"ok.png")]
    expected = {r: key_text(r.lstrip(b"/")) for r in raws}  # listed: the path without root
    (tmp_path / "list0").write_bytes(b"\0".join(raws) + b"\0")
    out = tmp_path / "out0"
    result = dump("--files-from", str(tmp_path / "list0"), "-0", "--out", str(out))
    assert result.exit_code == 0, result.output
    check_tree(out, expected)

    out = tmp_path / "stdin0"
    assert dump("-", "-0", "--out", str(out), input=b"\0".join(raws)).exit_code == 0
    check_tree(out, expected)

    lines = [r for r in raws if b"\n" not in r]  # one a line: no newline in a name
    out = tmp_path / "stdin"
    result = dump("-", "--out", str(out), input=b"\r\n".join(lines) + b"\n")
    assert result.exit_code == 0, result.output
    check_tree(out, {r: expected[r] for r in lines})
    again = dump("-", "--out", str(out), input=b"\n".join(lines))
    assert again.exit_code == 0
    check_tree(out, {r: expected[r] for r in lines}, status="skipped")


def test_a_literal_backslash_name_and_the_byte_it_spells_collide_cleanly(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    blob = small_png()
    make(folder, b"x\\xff.png", blob)  # a real backslash: sorts first
    make(folder, b"x\xff.png", blob)
    out = tmp_path / "out"
    result = dump(str(folder), "--out", str(out))
    assert result.exit_code == 1
    # both keep their line: the failure's key is marked (one line per key in a manifest)
    failed, ok = sorted(strict_manifest(out / "manifest.jsonl"), key=lambda r: r["status"])
    assert (ok["status"], ok["key"], ok["input"]) == ("ok", "x\\xff.png", f"{folder}/x\\xff.png")
    assert "input_bytes" not in ok
    assert failed["status"] == "failed" and "input_bytes" in failed
    assert re.fullmatch(r"x\\xff\.png~dup-[0-9a-f]{16}", failed["key"])
    assert failed["error"] == (f"output name 'x\\\\xff.png' is already used by "
                               f"{folder}/x\\xff.png")
    again = dump(str(folder), "--out", str(out))  # the ok one is done, the other fails again
    assert again.exit_code == 1
    assert sorted((r["key"], r["status"]) for r in strict_manifest(out / "manifest.jsonl")) \
        == [(ok["key"], "skipped"), (failed["key"], "failed")]


# -------------------------------------------------------------- (c) random byte names
ALLOWED = [b for b in range(1, 256) if b not in (ord("/"), ord("\\"))]  # no collisions


def random_names(rng: random.Random, n: int) -> list[bytes]:
    """``n`` distinct names of random bytes (an image extension each), with the usual
    suspects forced in: newline, 0xff, 0x80, a leading dash, spaces, HTML, the length
    limit (255 bytes)."""
    forced = [b"\n.png", b"\xff.png", b"\x80\x80.jpg", b"-rf .png", b" sp ace .PNG",
              b"<b>&amp;\"'.png", b"\xe2\x80\xa8\x1b[0m.png", b"\xed\xa0\x80.png",
              b"\xff" * 251 + b".png", "é".encode() * 125 + b".png"]
    found = list(forced)
    while len(found) < n:
        stem = bytes(rng.choice(ALLOWED) for _ in range(rng.randint(1, 60)))
        name = stem + rng.choice([b".png", b".jpg", b".PNG"])
        if name not in found and name not in (b".png", b".jpg", b".PNG"):
            found.append(name)
    return found


@pytest.mark.parametrize("seed", [0, 1])
def test_random_byte_names_are_each_processed_once(tmp_path, seed):
    rng = random.Random(seed)
    folder = tmp_path / "in"
    sub = bytes(rng.choice(ALLOWED) for _ in range(40)) + b"\xfe" * 100  # a subfolder too
    os.makedirs(os.fsencode(folder) + b"/" + sub)
    blob = small_png()
    expected = {}
    for i, name in enumerate(random_names(rng, 28)):
        where = sub + b"/" + name if i % 3 == 2 else name
        expected[make(folder, where, blob)] = key_text(where)
    out = tmp_path / "out"
    result = dump(str(folder), "--out", str(out))
    assert result.exit_code == 0, result.output
    check_tree(out, expected)
    again = dump(str(folder), "--out", str(out))
    assert again.exit_code == 0
    check_tree(out, expected, status="skipped")


# ---------------------------------------------------------------------- (d) gallery
def test_gallery_shows_raw_names_readably_and_links_resolve(tmp_path):
    from gallery_util import page_data, read_js

    folder = tmp_path / "in\xe9"  # a folder whose name is valid UTF-8
    folder.mkdir()
    blob = small_png()
    for name in (b"plain.png", b"bad\xff.png", b"<i>&\n.png"):
        make(folder, name, blob)
    os.mkdir(os.fsencode(folder) + b"/sub\xfe")
    make(folder, b"sub\xfe/in\x80side.png", blob)
    out = tmp_path / "out"
    assert dump(str(folder), "--out", str(out), "--save", "heatmap,overlay").exit_code == 0
    result = cli("gallery", str(out))
    assert result.exit_code == 0, result.output
    text = (out / "gallery" / "data.js").read_text("ascii")
    assert not re.search(r"\\\\u(d[89a-f])", text, re.I)  # no lone surrogate for the page
    data = page_data(out)
    rows = {row[0]: row for row in data["images"]}
    assert set(rows) == {"plain.png", "bad\\xff.png", "<i>&\n.png", "sub\\xfe/in\\x80side.png"}
    for key, row in rows.items():
        assert row[1] == "ok"
        original = row[2]
        if isinstance(original, dict):  # raw bytes: a percent-encoded href of them
            assert original["text"].endswith(key)
            target = os.fsencode(out) + b"/" + unquote_to_bytes(original["href"])
        else:
            rel = data["originalPrefix"] + key if original == 1 else original
            target = os.fsencode(out / rel)
        assert os.path.isfile(target), (key, original)
        assert open(target, "rb").read() == blob
        stem = key if row[4][0][7] is None else row[4][0][7]
        for folder_name, suffix in (("heatmaps", ".png"), ("overlays", ".jpg"),
                                    ("thumbs", ".jpg")):
            assert (out / folder_name / f"{stem}{suffix}").is_file()
    assert isinstance(rows["bad\\xff.png"][2], dict)
    assert rows["plain.png"][2] == 1
    chunk = read_js(out / "gallery" / "records" / "00000.js")[1]
    assert {r["key"] for r in chunk["records"]} == set(rows)


# ----------------------------------------------------------------------- (e) shards
def test_shards_and_merge_with_raw_names(tmp_path):
    rng = random.Random(7)
    folder = tmp_path / "in"
    folder.mkdir()
    blob = small_png()
    expected = {make(folder, n, blob): key_text(n) for n in random_names(rng, 16)}
    out = tmp_path / "out"
    for shard in ("0/2", "1/2"):
        assert dump(str(folder), "--out", str(out), "--shard", shard).exit_code == 0
    shard_lines = [rec for p in (out / "shards").glob("*/manifest.jsonl")
                   for rec in strict_manifest(p)]
    assert len(shard_lines) == len(expected)
    result = cli("merge", str(out))
    assert result.exit_code == 0, result.output
    check_tree(out, expected)
    assert not (out / "shards").exists()
    again = dump(str(folder), "--out", str(out))
    assert again.exit_code == 0
    check_tree(out, expected, status="skipped")


# -------------------------------------------------------------------- eval and check
def test_eval_and_check_take_raw_names(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    make(folder, b"a\xff.png", (PHOTOS / "coffee.png").read_bytes())
    make(folder, b"b\n.jpg", (PHOTOS / "rocket.jpg").read_bytes())
    make(folder, b"c\x80.png", b"broken")
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", ["fullgrad", "eval", os.fsdecode(b"x\xff")])  # command
    result = cli("eval", str(folder), *SQUEEZENET, "--methods", "fullgrad,random",
                 "--metrics", "perturbation", "--ks", "50", "--out", str(out), "-q")
    assert result.exit_code == 0, result.output
    report = strict_json((out / "eval.json").read_bytes().decode("utf-8"))
    assert sorted(report["images"]) == sorted([f"{folder}/a\\xff.png", f"{folder}/b\n.jpg"])
    (failed,) = report["failed"]
    assert base64.b64decode(failed["input_bytes"]) == os.fsencode(folder) + b"/c\x80.png"
    assert f"fullgrad: failed: {folder}/c\\x80.png: " in result.stderr
    assert report["command"] == ["fullgrad", "eval", "x\\xff"]

    bad = os.fsdecode(os.fsencode(folder) + b"/a\xff.png")
    result = cli("check", bad, *SQUEEZENET)
    assert result.exit_code == 0, result.output
    assert "a\\xff.png" in result.stdout


# ------------------------------------------------------------------------------ Ray
@pytest.mark.slow
def test_ray_run_with_raw_names(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    folder = tmp_path / "in"
    folder.mkdir()
    blob = small_png()
    expected = {make(folder, n, blob): key_text(n) for n in random_names(random.Random(3), 12)}
    out = tmp_path / "out"
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        result = dump(str(folder), "--out", str(out), "--ray", "--ray-actors", "1")
        assert result.exit_code == 0, result.output
        check_tree(out, expected)
        again = dump(str(folder), "--out", str(out), "--ray", "--ray-actors", "1")
        assert again.exit_code == 0
        check_tree(out, expected, status="skipped")
    finally:
        if started:
            ray.shutdown()



# -------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_ranks_with_raw_names(tmp_path):
    """Two gloo ranks on the CPU (tests/test_torchrun.py's set-up): each rank's shard,
    rank 0's merge and a resumed run see the same escaped keys."""
    folder = tmp_path / "in"
    folder.mkdir()
    blob = small_png()
    expected = {make(folder, n, blob): key_text(n) for n in random_names(random.Random(5), 12)}
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "fgcli", "dump", *SMALL, "--save", "heatmap",
               str(folder), "--out", str(out), "--quiet"]
    run = subprocess.run(command, env=env, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr.decode("utf-8", "replace")
    check_tree(out, expected)
    assert not (out / "shards").exists()
    again = subprocess.run(command, env=env, capture_output=True, timeout=600)
    assert again.returncode == 0
    check_tree(out, expected, status="skipped")
