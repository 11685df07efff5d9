"""SIGINT / SIGTERM: finished work is kept, one line, exit 130 / 143, a rerun resumes.

The runs are real processes in their own process group, signalled the way a terminal's
Ctrl-C is (the whole group, DataLoader workers included) or the way ``kill`` is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from faults import assert_tree_whole
from helpers import PHOTOS, ROOT, SQUEEZENET, SQUEEZENET_WEIGHTS, strict_lines

from fgcli import signals as fgsignals

PHOTO = PHOTOS / "chelsea.png"
IMAGES = 16
SMALL = [*SQUEEZENET, "-b", "2", "--workers", "1"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
       "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(IMAGES):
        shutil.copy(PHOTO, folder / f"cat{i:02d}.png")
    return folder


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fgcli", "dump", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def overlays(out: Path) -> int:
    folder = out / "overlays"
    return len(os.listdir(folder)) if folder.is_dir() else 0


def rerun(photos: Path, out: Path) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-m", "fgcli", "dump", str(photos), *SMALL,
                           "--out", str(out), "--json", "-q"], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return {json.loads(line)["key"]: json.loads(line)["status"]
            for line in done.stdout.splitlines()}


def check_stopped_tree(out: Path) -> set[str]:
    """Whole files, each with its ok line; returns the keys done."""
    files = set(assert_tree_whole(out))
    recs = strict_lines(out / "manifest.jsonl")
    listed = {p for r in recs if r["status"] == "ok" for p in r["outputs"].values()}
    assert files == listed, "an output file without its manifest line (or the reverse)"
    return {r["key"] for r in recs if r["status"] == "ok"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_keeps_finished_work_and_a_rerun_resumes(photos, tmp_path, name):
    out = tmp_path / "out"
    proc = start([str(photos), *SMALL, "--out", str(out), "-q"])
    wait_until(lambda: overlays(out) >= 1, proc)
    # SIGINT as a terminal sends it (the whole process group, workers too); SIGTERM to
    # the main process, as kill does
    if name == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == fgsignals.EXIT_CODES[name], err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fullgrad: interrupted by {name} after "), err
    run = json.loads((out / "run.json").read_text())
    assert run["interrupted"] == name
    done = check_stopped_tree(out)
    assert 0 < len(done) < IMAGES
    assert run["counts"]["ok"] == len(done)
    statuses = rerun(photos, out)
    assert len(statuses) == IMAGES
    assert {k for k, s in statuses.items() if s == "skipped"} == done  # nothing recomputed
    assert {s for k, s in statuses.items() if k not in done} == {"ok"}


@pytest.mark.slow
def test_a_second_signal_stops_at_once_with_the_manifest_whole(photos, tmp_path):
    out = tmp_path / "out"
    proc = start([str(photos), *SMALL, "--out", str(out), "-q"])
    wait_until(lambda: overlays(out) >= 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "interrupted by SIGINT" in err
    done = set()
    for rec in strict_lines(out / "manifest.jsonl"):
        done.add(rec["key"])
    assert_tree_whole(out)
    statuses = rerun(photos, out)
    assert len(statuses) == IMAGES
    assert {k for k, s in statuses.items() if s == "skipped"} == done


@pytest.mark.slow
def test_a_signal_while_the_model_loads_is_one_line(tmp_path):
    marker = tmp_path / "loading"
    model = tmp_path / "slow.py"
    model.write_text(
        "import pathlib, time\n"
        "import torchvision\n"
        "def build():\n"
        f"    pathlib.Path({str(marker)!r}).write_text('x')\n"
        "    time.sleep(60)\n"
        "    return torchvision.models.squeezenet1_1()\n")
    proc = start([str(PHOTO), "--model", f"{model}:build", "--weights", "random",
                  "--out", str(tmp_path / "out")])
    wait_until(marker.exists, proc)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - began < 20
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [
        "fullgrad: interrupted by SIGTERM; finished images are kept: rerun the same command "
        "to resume"]


# ---------------------------------------------------------------- handlers, in process

def test_handlers_are_restored_after_a_run(tmp_path):
    from fgcli.config import build_config
    from fgcli.dump.run import run

    before = {s: signal.getsignal(s) for s in fgsignals.STOP_SIGNALS}
    cfg = build_config({"inputs": (str(PHOTO),), "model": "squeezenet1_1",
                        "weights": str(SQUEEZENET_WEIGHTS), "size": 64, "workers": 0,
                        "out": str(tmp_path / "out")}, None)
    report = run(cfg)
    assert report.ok == 1 and report.interrupted is None and report.exit_code == 0
    assert {s: signal.getsignal(s) for s in fgsignals.STOP_SIGNALS} == before
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["interrupted"] is None


def test_first_signal_in_the_loop_asks_the_second_raises():
    with fgsignals.stop_signals() as stop:
        assert stop.installed
        with stop.graceful():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert stop.name == "SIGTERM"
            with pytest.raises(fgsignals.Interrupted) as caught:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            assert caught.value.name == "SIGTERM" and caught.value.exit_code == 143
    with fgsignals.stop_signals() as stop:  # outside the loop: at once
        with pytest.raises(fgsignals.Interrupted) as caught:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert caught.value.exit_code == 130


def test_nothing_is_installed_off_the_main_thread_or_over_an_ignored_signal():
    seen = []

    def worker() -> None:
        with fgsignals.stop_signals() as stop:
            seen.append(stop.installed)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [False]
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with fgsignals.stop_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, old)


def test_decoding_workers_ignore_stop_signals():
    code = ("import signal; from fgcli.signals import ignore_stop_signals; "
            "ignore_stop_signals(0); "
            "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "
            "signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.split() == ["True", "True"]


def test_the_run_loop_gives_decoding_workers_the_signal_guard(tmp_path, monkeypatch):
    import torch

    from fgcli.config import build_config
    from fgcli.dump.run import run

    seen = []
    real = torch.utils.data.DataLoader

    def loader(*args, **kwargs):
        seen.append(kwargs.get("worker_init_fn"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", loader)
    cfg = build_config({"inputs": (str(PHOTO),), "model": "squeezenet1_1",
                        "weights": str(SQUEEZENET_WEIGHTS), "size": 64, "workers": 1,
                        "out": str(tmp_path / "out")}, None)
    assert run(cfg).ok == 1
    from fgcli.dump import session

    assert seen == [session.background_worker]
    calls = []  # the worker's start: the signal guard, then the lowered priority
    monkeypatch.setattr(session, "ignore_stop_signals", lambda i: calls.append(("guard", i)))
    monkeypatch.setattr(session, "lower_priority", lambda: calls.append(("nice",)))
    seen[0](3)
    assert calls == [("guard", 3), ("nice",)]


@pytest.mark.slow
def test_torchrun_ranks_stop_without_waiting_and_a_rerun_finishes(photos, tmp_path):
    """SIGTERM to the whole job (as a batch scheduler sends it): every rank stops with
    its line and 143, nobody waits for the others; torchrun itself then reports the
    ranks' failure (its own exit code, 1). The same command finishes the run."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", "-m", "fgcli", "dump", str(photos), *SMALL,
           "--out", str(out), "-q", "--dist-timeout", "120"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    wait_until(lambda: overlays(out) >= 1, proc, timeout=300)
    os.killpg(proc.pid, signal.SIGTERM)
    began = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert time.monotonic() - began < 60  # far below --dist-timeout: nobody waited
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("fullgrad:")]
    assert sorted(line.split(":")[1] for line in ours) == [" shard 0/2", " shard 1/2"], err
    assert all("interrupted by SIGTERM after" in line for line in ours), err
    done = {r["key"] for p in sorted((out / "shards").glob("*/manifest.jsonl"))
            for r in strict_lines(p) if r["status"] == "ok"}
    assert_tree_whole(out)
    again = subprocess.run([c for c in cmd if c != "-q"] + ["--json", "-q"], env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    statuses = {json.loads(line)["key"]: json.loads(line)["status"]
                for line in again.stdout.splitlines() if line.startswith("{")}
    assert len(statuses) == IMAGES
    assert {k for k, s in statuses.items() if s == "skipped"} == done


@pytest.mark.slow
def test_ray_driver_stops_taking_results_and_a_rerun_finishes(photos, tmp_path):
    pytest.importorskip("ray.data")
    out = tmp_path / "out"
    args = [str(photos), *SMALL, "--out", str(out), "--ray", "--ray-actors", "1"]
    proc = start([*args, "-q"])
    wait_until(lambda: (out / "manifest.jsonl").is_file()
               and (out / "manifest.jsonl").stat().st_size > 0, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fullgrad: interrupted by SIGTERM after")
    assert json.loads((out / "run.json").read_text())["interrupted"] == "SIGTERM"
    recs = strict_lines(out / "manifest.jsonl")
    assert_tree_whole(out)  # files of images still in the actors may lack a line
    done = {r["key"] for r in recs if r["status"] == "ok"}
    again = subprocess.run([sys.executable, "-m", "fgcli", "dump", *args, "--json", "-q"],
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    statuses = {json.loads(line)["key"]: json.loads(line)["status"]
                for line in again.stdout.splitlines()}
    assert len(statuses) == IMAGES
    assert {k for k, s in statuses.items() if s == "skipped"} == done


def test_writes_in_flight_get_a_bounded_wait_after_a_stop(monkeypatch):
    from concurrent.futures import Future

    from fgcli.config import build_config
    from fgcli.dump import writeback as pipeline
    from fgcli.dump.ledger import CollectLedger
    from fgcli.tree.writer import OutputTree

    cfg = build_config({"inputs": (str(PHOTO),), "model": "squeezenet1_1"}, None)
    ledger = CollectLedger(cfg, "", None)
    state = pipeline.WriteBack(OutputTree(cfg.out), cfg, ledger, writers=2)
    done = Future()
    done.set_result({})
    assert state._finished(done)  # no stop: waits as long as it takes
    ledger.stop.name = "SIGTERM"
    monkeypatch.setattr(pipeline, "DRAIN_SECONDS", 0.3)
    began = time.monotonic()
    assert not state._finished(Future())  # a write that never ends is given up on
    assert 0.25 < time.monotonic() - began < 3
    assert state._finished(done)


def test_a_broken_pipe_in_a_background_thread_after_a_stop_is_not_printed(capsys):
    """Once a stop signal arrived, multiprocessing's descriptor sharer reporting a broken
    pipe (its DataLoader workers went away with the run) prints nothing; other errors,
    and the same error before a stop, still do."""
    import sys
    import threading

    from fgcli.signals import stop_signals

    def report(exc: BaseException) -> None:
        t = threading.Thread(target=lambda: sys.excepthook(type(exc), exc, None))
        t.start()
        t.join()

    before = sys.excepthook
    with stop_signals() as stop:
        report(BrokenPipeError(32, "Broken pipe"))
        assert "BrokenPipeError" in capsys.readouterr().err  # no stop yet: printed
        stop.name = "SIGINT"
        report(BrokenPipeError(32, "Broken pipe"))
        assert capsys.readouterr().err == ""
        report(ValueError("real"))
        assert "ValueError" in capsys.readouterr().err
    assert sys.excepthook is before  # restored after the run
