"""`torchrun --nproc-per-node 2 -m fgcli dump ...` with gloo ranks on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import one_thread
from test_shards import SMALL, assert_same_records, comparable, dump, hold

from fgcli.distributed.torchrun import RankEnv, _wait_for, rank_device, rank_env
from fgcli.errors import SetupError
from fgcli.tree.shards import shard_of

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "fgcli", *args],
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def ours(stderr: str) -> list[str]:
    """fgcli's lines (torchrun adds its own warnings and failure report)."""
    return [line for line in stderr.splitlines() if line.startswith("fullgrad:")]


@pytest.mark.slow
def test_two_gloo_ranks_equal_a_single_run_and_resume(tmp_path, images):
    out, single = tmp_path / "ranks", tmp_path / "single"
    run = torchrun("dump", str(images), *SMALL, "--out", str(out), "--gallery")
    assert run.returncode == 1, run.stderr  # broken.jpg fails; the rest is written
    # --gallery: rank 0 alone builds it, after the merge, over every rank's images
    gallery = [line for line in run.stderr.splitlines() if line.startswith("gallery: ")]
    assert gallery == [f"gallery: {out / 'index.html'} (7 images, 6 maps, 1 failed; "
                       "thumbnails made 6, kept 0" + gallery[0].split("kept 0")[1]]
    owner = shard_of("broken.jpg", 2)
    # the failure is reported once, by the rank that owns it, with its shard
    assert sorted(ours(run.stderr)) == sorted([  # two processes: any order
        "fullgrad: warning: --gallery without decomp in --save: the detail view will have "
        "no decomposition chart (--save heatmap,overlay,map,decomp)",  # once: rank 0
        f"fullgrad: shard {owner}/2: failed: {images / 'broken.jpg'}: not an image Pillow "
        "can read"])
    summary = [line.split() for line in run.stderr.splitlines()
               if line.split()[:1] in (["ok"], ["failed"], ["skipped"])]
    assert summary == [["ok", "6"], ["skipped", "0"], ["failed", "1"]]  # rank 0, totals
    assert not (out / "shards").exists()  # rank 0 merged after the barrier
    with one_thread():  # as each rank computes
        assert dump(images, single).exit_code == 1
    assert_same_records(comparable(out), comparable(single))
    for npy in (single / "maps").rglob("*.npy"):
        a, b = np.load(npy), np.load(out / npy.relative_to(single))
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(a).max()))
    runs = json.loads((out / "run.json").read_text())
    assert sorted(s["shard"] for s in runs["shards"]) == ["0/2", "1/2"]
    assert runs["counts"] == {"ok": 6, "skipped": 0, "failed": 1}

    again = torchrun("dump", str(images), *SMALL, "--out", str(out), "--quiet")
    assert again.returncode == 1
    statuses = {k: r["status"] for (k, _), r in comparable(out).items()}
    assert statuses.pop("broken.jpg") == "failed"
    assert set(statuses.values()) == {"skipped"} and len(statuses) == 6


@pytest.mark.slow
def test_a_rank_that_cannot_start_stops_the_job_cleanly(tmp_path, images):
    out = tmp_path / "out"
    holder = hold(out, "1-of-2")  # shard 1 is busy: rank 1 cannot take it
    try:
        started = time.monotonic()
        run = torchrun("dump", str(images), *SMALL, "--out", str(out), "--dist-timeout", "60")
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    # torchrun exits 1 for any failed rank; each rank's own code (2: setup) is in its report
    assert run.returncode == 1 and "exitcode  : 2" in run.stderr, run.stderr
    lines = ours(run.stderr)
    assert any(f"shard 1-of-2 of {out} is in use by pid {holder.pid}" in line for line in lines)
    assert any("1 rank(s) could not run" in line and "rerun the same command" in line
               for line in lines)
    assert took < 60  # nobody waited for the timeout
    # rank 0 finished its shard; nothing was merged, so the shard stays for a rerun
    kept = (out / "shards" / "0-of-2" / "manifest.jsonl").read_text().splitlines()
    assert kept and not (out / "manifest.jsonl").exists()
    rerun = torchrun("dump", str(images), *SMALL, "--out", str(out), "--quiet")
    assert rerun.returncode == 1
    statuses = {k: r["status"] for (k, _), r in comparable(out).items()}
    assert len(statuses) == 7 and list(statuses.values()).count("skipped") == len(
        [line for line in kept if '"status": "ok"' in line])


class FakeStore:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)


def test_waiting_gives_up_on_a_silent_rank_only():
    store = FakeStore()
    store.set("fgcli/done/0", "{}")
    started = time.monotonic()
    with pytest.raises(SetupError, match="rank 1 made no progress for 0 s.*rerun the same"):
        _wait_for(store, {0: "fgcli/done/0", 1: "fgcli/done/1"}, 0.4, "the shards")
    assert time.monotonic() - started < 5
    store.set("fgcli/done/1", "{}")
    _wait_for(store, {0: "fgcli/done/0", 1: "fgcli/done/1"}, 0.4, "the shards")  # returns
    # a rank that beats is waited for, however long it takes
    store.data.pop("fgcli/done/1")
    beats = iter(range(1000))
    real_get = store.get
    store.get = lambda key: str(next(beats)).encode() if key == "fgcli/beat/1" else real_get(key)
    store.set("fgcli/beat/1", "0")
    import threading

    threading.Timer(1.5, lambda: store.set("fgcli/done/1", "{}")).start()
    _wait_for(store, {0: "fgcli/done/0", 1: "fgcli/done/1"}, 0.4, "the shards")


def test_heartbeat_stops_when_the_main_thread_makes_no_progress(monkeypatch):
    import fgcli.distributed.torchrun as tr

    monkeypatch.setattr(tr, "BEAT_SECONDS", 0.05)
    store = FakeStore()
    beat = tr._Heartbeat(store, 1, "fgcli/", timeout=0.5)
    try:
        time.sleep(0.3)
        loading = int(store.get("fgcli/beat/1"))
        assert loading > 2  # before the run starts (model loading) it beats freely
        beat.gate()
        for _ in range(10):  # progress every 0.1 s keeps it beating
            time.sleep(0.1)
            beat.touch()
        busy = int(store.get("fgcli/beat/1"))
        assert busy > loading + 10
        time.sleep(1.0)  # a stuck main thread: beats stop after the timeout
        stuck = int(store.get("fgcli/beat/1"))
        time.sleep(0.5)
        assert int(store.get("fgcli/beat/1")) == stuck
        with pytest.raises(SetupError, match="rank 1 made no progress"):
            _wait_for(store, {1: "fgcli/done/1"}, 0.3, "the shards")
    finally:
        beat.close()


def test_under_torchrun_stdin_and_a_missing_master_are_clear_errors(tmp_path, monkeypatch):
    from helpers import cli

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    listed = cli("dump", "-", *SMALL, "--out", str(tmp_path / "o"), input="x.jpg\n")
    assert listed.exit_code == 2 and "--files-from FILE" in listed.stderr
    bare = cli("dump", str(Path(__file__)), *SMALL, "--out", str(tmp_path / "o"))
    assert bare.exit_code == 2
    assert "RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT not" in bare.stderr


def test_rank_environment():
    assert rank_env({}) is None
    assert rank_env({"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: a plain run
    assert rank_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                     "LOCAL_WORLD_SIZE": "4"}) == RankEnv(3, 8, 1)
    from fgcli.errors import UsageError

    with pytest.raises(UsageError, match="outside WORLD_SIZE"):
        rank_env({"RANK": "2", "WORLD_SIZE": "2"})
    import torch

    if not torch.cuda.is_available():
        assert rank_device("auto", RankEnv(1, 2, 1)) == "cpu"
        assert rank_device("cpu", RankEnv(1, 2, 1)) == "cpu"


def test_shard_option_is_refused_under_torchrun(tmp_path, monkeypatch):
    from helpers import cli

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = cli("dump", str(Path(__file__)), *SMALL, "--out", str(tmp_path / "o"),
                 "--shard", "0/2")
    assert result.exit_code == 2 and "under torchrun each rank takes shard" in result.stderr


def test_rank_zero_sums_every_ranks_annotation_counts():
    """--boxes under torchrun: one annotations line for the run, from every rank's counts."""
    from fgcli.distributed.torchrun import _total

    posted = {
        "p/done/0": {"ok": 3, "failed": 0, "skipped": 1, "seconds": 2.0,
                     "stopped_early": False, "error": None, "interrupted": None,
                     "objects": {"source": "boxes", "names": 5, "annotated": 3,
                                 "unannotated": 1, "matched": ["a", "b", "c"],
                                 "by_class": False}},
        "p/done/1": {"ok": 2, "failed": 1, "skipped": 0, "seconds": 3.0,
                     "stopped_early": False, "error": None, "interrupted": None,
                     "objects": {"source": "boxes", "names": 5, "annotated": 1,
                                 "unannotated": 1, "matched": ["d"], "by_class": False}}}

    class Store:
        def get(self, key: str) -> bytes:
            return json.dumps(posted[key]).encode()

    total = _total(Store(), "p/", [0, 1], "out", "cpu")
    assert (total.ok, total.failed, total.skipped) == (5, 1, 1)
    assert total.objects.line() == ("boxes: 4 of 6 images annotated; 2 without an annotation; "
                                    "1 annotation matches no image; labels are not all "
                                    "class names: every box counts")
