"""Where #17's fixes meet: stop signals in every command, a second signal while writes
are drained, an unreadable input that shares a readable one's name, and messages that
quote raw file names."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import Future
from pathlib import Path

import pytest
from helpers import PHOTOS, ROOT, SQUEEZENET, cli

DUMP = ["dump", *SQUEEZENET, "--workers", "0", "-q", "--save", "map"]


def _sigterm(*args, **kwargs):
    signal.raise_signal(signal.SIGTERM)
    raise AssertionError("the stop handler should have ended the command")


@pytest.mark.parametrize("command", ["eval", "check", "merge", "gallery", "models"])
def test_every_command_stops_on_sigterm_with_one_line(tmp_path, monkeypatch, command):
    """SIGTERM (a scheduler's time limit) ends every command with one line and 143, not
    silently; the handlers are the caller's again afterwards."""
    import fgcli.cli.check
    import fgcli.cli.models
    import fgcli.evaluate.run
    import fgcli.gallery
    import fgcli.tree.shards

    target, args = {
        "eval": ((fgcli.evaluate.run, "_evaluate"),
                 ["eval", "--model", "squeezenet1_1", str(PHOTOS / "coffee.png"),
                  str(PHOTOS / "chelsea.png"), "-o", str(tmp_path / "e")]),
        "check": ((fgcli.cli.check, "_run_check"), ["check", "--model", "squeezenet1_1"]),
        "merge": ((fgcli.tree.shards, "merge"), ["merge", str(tmp_path)]),
        "gallery": ((fgcli.gallery, "build_gallery"), ["gallery", str(tmp_path)]),
        "models": ((fgcli.cli.models, "_model_rows"), ["models"]),
    }[command]
    monkeypatch.setattr(*target, _sigterm)

    def unhandled(signum, frame):  # fgcli's handler missing: fail, don't kill pytest
        raise RuntimeError("SIGTERM reached the caller's handler")

    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        result = cli(*args)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the caller's again
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 143, result.output
    assert result.stderr.strip() == "fullgrad: interrupted by SIGTERM"


def test_an_unreadable_input_never_takes_a_readable_ones_line(tmp_path, monkeypatch):
    """``b/x.png`` (a photo) and ``a/x.png`` (a broken link) share the key ``x.png``: the
    broken one's failed line gets a key of its own, so the photo's line stays in the
    compacted manifest and the rerun skips it instead of computing it again forever."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").write_bytes((PHOTOS / "chelsea.png").read_bytes())
    os.symlink(tmp_path / "nowhere.png", tmp_path / "a" / "x.png")
    for run in range(2):
        result = cli(*DUMP, "b/x.png", "a/x.png", "-o", "out")
        assert result.exit_code == 1, result.output
        records = {r["key"]: r for r in map(json.loads,
                                            Path("out/manifest.jsonl").read_text().splitlines())}
        assert len(records) == 2
        photo = records["x.png"]
        assert photo["input"] == "b/x.png"
        assert photo["status"] == ("ok" if run == 0 else "skipped")
        (broken,) = (r for k, r in records.items() if k != "x.png")
        assert broken["key"].startswith("x.png~dup-") and broken["status"] == "failed"
        assert broken["input"] == "a/x.png"


def test_a_second_signal_while_draining_keeps_the_lines_of_finished_writes():
    """The second signal arrives while the drain waits for a write: the records of the
    writes that did finish still get their lines (by ``_salvage``), none is lost between
    leaving the queue and reaching the manifest."""
    from fgcli.config import ModelSpec, RunConfig
    from fgcli.dump.ledger import CollectLedger
    from fgcli.dump.writeback import WriteBack
    from fgcli.signals import Interrupted

    ledger = CollectLedger(RunConfig(inputs=("x",), spec=ModelSpec("m")), "", None)
    run = WriteBack(None, ledger.cfg, ledger, writers=1)  # records kept, as for a Ray actor
    done = [Future() for _ in range(3)]
    for i, fut in enumerate(done):
        fut.set_result(({"map": f"maps/{i}.npy"}, {}))  # (outputs, record fields)
    hanging: Future = Future()  # a write still running when the second signal comes
    records = [{"key": str(i), "status": "ok"} for i in range(4)]
    from collections import deque

    run.pending = deque([(records[:2], done[:2]), (records[2:], [hanging, done[2]])])
    waits = []

    def finished(fut: Future) -> bool:
        if fut is hanging:
            raise Interrupted("SIGINT")
        waits.append(fut)
        return True

    run._finished = finished
    with pytest.raises(Interrupted):
        run.drain(0)
    run.salvage()
    assert [r["key"] for r in ledger.records] == ["0", "1", "3"]
    assert [r["outputs"]["map"] for r in ledger.records] == ["maps/0.npy", "maps/1.npy",
                                                             "maps/2.npy"]


def test_messages_quote_raw_names_on_one_line(tmp_path):
    """A message naming a file whose name is not UTF-8 and holds a newline is one line,
    the byte written \\xNN and the newline \\n (never a console error, never two lines)."""
    missing = os.fsdecode(os.fsencode(str(tmp_path)) + b"/list\xff\nx.txt")
    result = cli(*DUMP, "--files-from", missing, "-o", str(tmp_path / "o"))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "list\\xff\\nx.txt" in lines[0] and lines[0].startswith("fullgrad: error: ")


def test_a_locked_out_is_refused_before_torch_is_imported(tmp_path):
    """Another run holds --out: the second dump says so at once, in one line, without
    importing torch (let alone loading its model); the holder is named."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fgcli.tree.writer import OutputTree; "
         "t = OutputTree(sys.argv[1]); t.acquire(['holder-cmd']); print('held', flush=True);"
         " time.sleep(60)", str(tmp_path / "out")], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline().strip() == b"held"
        probe = ("import sys\nfrom fgcli.cli import main\n"
                 "sys.argv = ['fullgrad', 'dump', sys.argv[1], '-o', sys.argv[2], '-q',\n"
                 "            '--model', 'squeezenet1_1']\n"
                 "try:\n    main()\nexcept SystemExit as exc:\n"
                 "    print(exc.code, 'torch' in sys.modules)\n")
        done = subprocess.run([sys.executable, "-c", probe, str(PHOTOS / "coffee.png"),
                               str(tmp_path / "out")], capture_output=True, text=True,
                              env=env, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fullgrad: error: ")
    assert "is in use by pid" in lines[0] and "holder-cmd" in lines[0]


def test_a_second_signal_during_worker_shutdown_is_raised_after_it():
    """Joining the decoding workers happens in a DataLoader iterator's ``__del__``, where
    an exception is printed and dropped: a second signal there is held until the
    clean-up ends, then raised (it was a traceback on stderr, and the stop was lost)."""
    from fgcli.signals import Interrupted, StopSignals

    stop = StopSignals(installed=False)
    with stop.graceful():
        stop.handle(signal.SIGINT, None)  # the first signal only asks
        assert stop.requested
        finished = []
        with pytest.raises(Interrupted):
            with stop.deferred():
                stop.handle(signal.SIGINT, None)  # the second: not raised in here
                finished.append(True)
        assert finished == [True]
        with pytest.raises(Interrupted):  # outside deferred(): at once
            stop.handle(signal.SIGINT, None)
