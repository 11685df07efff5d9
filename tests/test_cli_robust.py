"""Issue 17 (items 5, 6, 7, 10, 12): output places checked before any slow work, empty
options, labels files in any common encoding, one exit-code policy with --debug, eval's
too-few-images message, and the lock taken before the model loads."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PHOTOS, ROOT, SQUEEZENET, cli, one_error_line

DUMP = ["dump", *SQUEEZENET, "--workers", "0", "-q"]
EVAL = ["eval", *SQUEEZENET, "--methods", "fullgrad,random", "--metrics", "perturbation",
        "--ks", "50", "-q"]
TWO = [str(PHOTOS / "coffee.png"), str(PHOTOS / "chelsea.png")]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a torchvision model is built (the slow part of a start)."""
    import dataclasses

    import fgcli.models.load  # noqa: F401 - registers the sources
    from fgcli.models import sources

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    torchvision = sources.get_source("resnet18")
    monkeypatch.setitem(sources._SOURCES, torchvision.name,
                        dataclasses.replace(torchvision, load=refuse))


def label_names(n: int = 1000) -> list[str]:
    return ["sky"] + [f"class {i}" for i in range(1, n)]


def reached_the_model(result) -> None:
    """The run got past its checks and the lock to the (refused) model load: exit 3."""
    assert result.exit_code == 3
    one_error_line(result, "internal error: AssertionError: the model was loaded", exit_code=3)


# -- 5: the output place is checked before the model loads -----------------------------

@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_eval_unwritable_out_is_refused_before_the_model_loads(tmp_path, no_model, where):
    (tmp_path / "file").write_text("taken")
    out = tmp_path / where
    result = cli(*EVAL, *TWO, "--out", str(out))
    assert result.exit_code == 2
    one_error_line(result, f"--out {out}: cannot write there", "Not a directory")
    assert (tmp_path / "file").read_text() == "taken"


def test_eval_creates_out_and_removes_it_again_when_it_fails(tmp_path, no_model):
    out = tmp_path / "new" / "deeper"
    reached_the_model(cli(*EVAL, *TWO, "--out", str(out)))
    assert not (tmp_path / "new").exists()  # the folders it made went again


def test_writable_dir_probe_leaves_nothing_but_the_folder(tmp_path):
    from fgcli.errors import SetupError
    from fgcli.tree.atomic import remove_created, writable_dir

    created = writable_dir(tmp_path / "a" / "b", "--out")
    assert created == tmp_path / "a" and os.listdir(tmp_path / "a" / "b") == []
    remove_created(tmp_path / "a" / "b", created)
    assert not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(SetupError, match=r"--out .*f/g: cannot write there \(Not a directory\)"):
        writable_dir(tmp_path / "f" / "g", "--out")


def test_eval_report_write_failure_is_one_line(tmp_path):
    from faults import full_disk

    from fgcli.errors import SetupError
    from fgcli.evaluate import report

    (tmp_path / "file").write_text("taken")
    with pytest.raises(SetupError, match="cannot write eval.json"):
        report._write(tmp_path / "file" / "eval.json", b"{}")

    with full_disk(f"{tmp_path}/*"), pytest.raises(
            SetupError, match=r"^no space left on device writing .*eval\.csv$"):
        report._write(tmp_path / "eval.csv", b"x")
    assert os.listdir(tmp_path) == ["file"]  # no temporary file left


def test_gallery_unwritable_out_is_one_line_before_any_thumbnail(tmp_path, monkeypatch):
    import fgcli.gallery
    import fgcli.tree.atomic

    def denied(*args, **kwargs):  # tests run as root, where chmod does not stop writes
        raise PermissionError(errno.EACCES, "Permission denied")

    def refuse(*args, **kwargs):
        raise AssertionError("the gallery was built")

    monkeypatch.setattr(fgcli.tree.atomic.tempfile, "mkstemp", denied)
    monkeypatch.setattr(fgcli.gallery, "build_gallery", refuse)
    result = cli("gallery", str(tmp_path))
    assert result.exit_code == 2
    one_error_line(result, f"OUT {tmp_path}: cannot write there (Permission denied)")


# -- 6: empty options -------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", "  "])
@pytest.mark.parametrize("command", ["dump", "eval"])
def test_empty_out_is_a_usage_error(tmp_path, monkeypatch, no_model, command, value):
    monkeypatch.chdir(tmp_path)
    args = [*DUMP, str(PHOTOS / "coffee.png")] if command == "dump" else [*EVAL, *TWO]
    result = cli(*args, "-o", value)
    assert result.exit_code == 2
    one_error_line(result, "--out: empty value")
    assert os.listdir(tmp_path) == []  # nothing written into the current directory


@pytest.mark.parametrize("command", ["merge", "gallery"])
def test_empty_tree_argument_is_a_usage_error(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    result = cli(command, "")
    assert result.exit_code == 2
    one_error_line(result, "OUT: empty value")
    assert os.listdir(tmp_path) == []  # merge no longer locks the current directory


@pytest.mark.parametrize("option", ["--labels", "--files-from", "--weights", "--target",
                                    "--layers", "--shard", "--config", "--save"])
def test_empty_dump_options_are_usage_errors(tmp_path, no_model, option):
    result = cli(*DUMP, str(PHOTOS / "coffee.png"), "-o", str(tmp_path / "o"), option, "")
    assert result.exit_code == 2
    one_error_line(result, option)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", ["--labels", "--weights", "--target", "--layers"])
def test_empty_eval_options_are_usage_errors(tmp_path, no_model, option):
    result = cli(*EVAL, *TWO, "-o", str(tmp_path / "o"), option, " ")
    assert result.exit_code == 2
    one_error_line(result, f"{option}: empty value")


def test_empty_input_and_empty_out_in_the_config_file(tmp_path, no_model):
    result = cli(*DUMP, "", "-o", str(tmp_path / "o"))
    assert result.exit_code == 2
    one_error_line(result, "an input is an empty path")
    config = tmp_path / "c.toml"
    config.write_text('out = ""\n')
    result = cli(*DUMP, str(PHOTOS / "coffee.png"), "--config", str(config))
    assert result.exit_code == 2
    one_error_line(result, "--out: empty value")


# -- 7: labels files ----------------------------------------------------------------------

@pytest.mark.parametrize("encoding, bom, newline", [
    ("utf-8", b"\xef\xbb\xbf", "\n"),
    ("utf-8", b"", "\r\n"),
    ("utf-16-le", b"\xff\xfe", "\r\n"),
    ("utf-16-be", b"\xfe\xff", "\n"),
])
def test_labels_in_utf8_with_bom_and_utf16_read_clean(tmp_path, encoding, bom, newline):
    from fgcli.models.base import read_labels

    names = label_names()
    path = tmp_path / "labels.txt"
    path.write_bytes(bom + newline.join(names).encode(encoding) + newline.encode(encoding))
    assert read_labels(str(path)) == tuple(names)


def test_target_by_name_with_a_bom_labels_file(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(label_names()).encode() + b"\n")
    out = tmp_path / "o"
    result = cli(*DUMP, str(PHOTOS / "coffee.png"), "-o", str(out), "--labels", str(path),
                 "--target", "sky")
    assert result.exit_code == 0, result.stderr
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert record["target"] == 0 and record["target_name"] == "sky"


@pytest.mark.parametrize("content, parts", [
    ("café\nsky\n".encode("latin-1"), ["not UTF-8 text (invalid byte 0xe9 at offset 3)"]),
    (b"\xef\xbb\xbfok\n\xff\n", ["not UTF-8 text (invalid byte 0xff at offset 6)"]),
    ("sky\nsea\n".encode("utf-16-le"), ["not UTF-8 text (invalid byte 0x00 at offset 1)"]),
    (b"", ["no class names in it"]),
    (b"\n  \r\n\n", ["no class names in it"]),
])
def test_bad_labels_files_are_one_line_before_the_model_loads(tmp_path, no_model, content,
                                                              parts):
    path = tmp_path / "labels.txt"
    path.write_bytes(content)
    for command in (DUMP, EVAL):
        inputs = [str(PHOTOS / "coffee.png")] if command is DUMP else TWO
        result = cli(*command, *inputs, "-o", str(tmp_path / "o"), "--labels", str(path))
        assert result.exit_code == 2
        one_error_line(result, f"--labels: {path}: ", *parts)


def test_missing_and_directory_labels_files(tmp_path, no_model):
    for path, part in ((tmp_path / "none.txt", "cannot read it (No such file"),
                       (tmp_path, "cannot read it (Is a directory)")):
        result = cli(*DUMP, str(PHOTOS / "coffee.png"), "-o", str(tmp_path / "o"),
                     "--labels", str(path))
        assert result.exit_code == 2
        one_error_line(result, f"--labels: {path}: {part}")


def test_labels_count_that_differs_from_the_model_is_one_line(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("sky\nsea\n")
    out = tmp_path / "new" / "o"
    result = cli(*DUMP, str(PHOTOS / "coffee.png"), "-o", str(out), "--labels", str(path))
    assert result.exit_code == 2
    one_error_line(result, "2 class names for a model with 1000 classes")
    assert not (tmp_path / "new").exists()  # the failed start took its folders away


# -- 10: one exit-code policy; --debug only adds the traceback -------------------------

def _break(monkeypatch, command: str, error: BaseException) -> list[str]:
    """Make ``command`` raise ``error`` deep inside; returns its arguments."""
    import fgcli.cli.check
    import fgcli.cli.models
    import fgcli.engine.saliency
    import fgcli.evaluate.run
    import fgcli.gallery
    import fgcli.tree.shards

    def boom(*args, **kwargs):
        raise error

    targets = {
        "dump": (fgcli.engine.saliency.FullGrad, "explain"),
        "eval": (fgcli.evaluate.run, "_evaluate"),
        "check": (fgcli.cli.check, "_run_check"),
        "merge": (fgcli.tree.shards, "merge"),
        "gallery": (fgcli.gallery, "build_gallery"),
        "models": (fgcli.cli.models, "_model_rows"),
    }
    monkeypatch.setattr(*targets[command], boom)
    return command


@pytest.mark.parametrize("command", ["dump", "eval", "check", "merge", "gallery", "models"])
def test_internal_error_exits_3_with_and_without_debug(tmp_path, monkeypatch, command):
    _break(monkeypatch, command, RuntimeError("deep trouble\nsecond line"))
    args = {
        "dump": [*DUMP, str(PHOTOS / "coffee.png"), "-o", str(tmp_path / "o")],
        "eval": [*EVAL, *TWO, "-o", str(tmp_path / "e")],
        "check": ["check", "--model", "squeezenet1_1"],
        "merge": ["merge", str(tmp_path)],
        "gallery": ["gallery", str(tmp_path)],
        "models": ["models", "resnet*"],
    }[command]
    plain = cli(*args)
    assert plain.exit_code == 3
    one_error_line(plain, "internal error: RuntimeError: deep trouble",
                   "rerun with --debug for the traceback", exit_code=3)
    debug = cli(*args, "--debug")
    assert debug.exit_code == 3
    assert "Traceback (most recent call last)" in debug.stderr
    last = debug.stderr.strip().splitlines()[-1]
    assert last == "fullgrad: error: internal error: RuntimeError: deep trouble"


@pytest.mark.parametrize("command", ["merge", "models"])
def test_interrupt_exits_130(tmp_path, monkeypatch, command):
    _break(monkeypatch, command, KeyboardInterrupt())
    args = ["merge", str(tmp_path)] if command == "merge" else ["models"]
    result = cli(*args)
    assert result.exit_code == 130 and result.stderr.strip() == "fullgrad: interrupted"


# -- 12a: eval names the inputs it cannot use --------------------------------------------

def test_eval_on_one_non_image_names_it_before_the_model_loads(tmp_path, no_model):
    text = tmp_path / "x.txt"
    text.write_text("hello")
    result = cli(*EVAL, str(text), "-o", str(tmp_path / "o"))
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("fullgrad: error: eval needs at least two readable images")
    assert f"found 1 input(s), 0 readable ({text}: not an image Pillow can read)" in line
    assert not (tmp_path / "o").exists()


def test_eval_names_a_few_of_many_failed_inputs(tmp_path):
    names = [tmp_path / f"bad{i}.png" for i in range(5)]
    for p in names:
        p.write_bytes(b"no image")
    result = cli(*EVAL, *map(str, names), "-o", str(tmp_path / "o"))
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "found 5 input(s), 0 readable" in line and "; and 2 more)" in line


# -- 12c: a locked --out is refused before the model loads -------------------------------

def hold(out: Path) -> subprocess.Popen:
    """Another process holding OUT's lock (POSIX locks do not exclude one's own process)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from fgcli.tree.writer import OutputTree; "
         "tree = OutputTree(sys.argv[1]); tree.acquire(['fullgrad', 'dump', 'elsewhere']); "
         "print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("shard", [None, "0/2"])
def test_locked_out_is_refused_without_loading_the_model(tmp_path, no_model, shard):
    out = tmp_path / "out"
    holder = hold(out)
    try:
        extra = ["--shard", shard] if shard else []
        result = cli(*DUMP, str(PHOTOS / "coffee.png"), "-o", str(out), *extra)
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2, result.stderr
    one_error_line(result, f"{out} is in use by pid {holder.pid}", "fullgrad dump elsewhere")
    assert sorted(os.listdir(out)) == [".fullgrad.lock", ".tmp"]  # the holder's, untouched


@pytest.mark.parametrize("shard", [None, "1/2"])
def test_failed_start_leaves_no_new_folder(tmp_path, no_model, shard):
    out = tmp_path / "a" / "b"
    extra = ["--shard", shard] if shard else []
    reached_the_model(cli(*DUMP, str(PHOTOS / "coffee.png"), "-o", str(out), *extra))
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before stays, without a lock
    reached_the_model(cli(*DUMP, str(PHOTOS / "coffee.png"), "-o", str(tmp_path / "kept"),
                          *extra))
    assert os.listdir(tmp_path / "kept") == []


def test_failed_start_keeps_an_existing_tree(tmp_path, no_model):
    out = tmp_path / "o"
    (out / "maps").mkdir(parents=True)
    (out / "manifest.jsonl").write_text("")
    reached_the_model(cli(*DUMP, str(PHOTOS / "coffee.png"), "-o", str(out)))
    assert sorted(os.listdir(out)) == [".fullgrad.lock", "manifest.jsonl", "maps"]
