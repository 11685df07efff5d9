"""`fullgrad` as a real process: kill and resume, the lock, pipes, exit codes, the TTY bar."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PHOTOS, SQUEEZENET


def fullgrad() -> list[str]:
    script = Path(sys.executable).with_name("fullgrad")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fgcli.cli"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def make_inputs(root: Path, n: int) -> Path:
    root.mkdir()
    data = [(PHOTOS / name).read_bytes() for name in ("coffee.png", "chelsea.png")]
    for i in range(n):
        (root / f"img{i:03d}.png").write_bytes(data[i % 2])
    return root


def manifest_lines(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def tree_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_matches_a_clean_run(tmp_path):
    inputs = make_inputs(tmp_path / "in", 40)
    args = [*fullgrad(), "dump", str(inputs), *SQUEEZENET, "--batch-size", "1", "--workers", "1",
            "--quiet"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert subprocess.run([*args, "--out", str(clean)], env=env()).returncode == 0

    proc = subprocess.Popen([*args, "--out", str(killed)], env=env())
    try:
        wait_for(lambda: len(manifest_lines(killed)) >= 5 or proc.poll() is not None)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = len(manifest_lines(killed))
    assert 5 <= partial < 40

    rerun = subprocess.run([*args, "--out", str(killed)], env=env())
    assert rerun.returncode == 0
    records = manifest_lines(killed)
    assert len(records) == 40
    statuses = [r["status"] for r in records]
    assert statuses.count("skipped") >= 5 and set(statuses) <= {"ok", "skipped"}
    assert not (killed / ".tmp").exists()
    files = [f for f in tree_files(clean) if f.split("/")[0] in ("heatmaps", "overlays", "maps")]
    assert files == [f for f in tree_files(killed)
                     if f.split("/")[0] in ("heatmaps", "overlays", "maps")]
    assert len(files) == 120
    mismatch = [f for f in files if not filecmp.cmp(clean / f, killed / f, shallow=False)]
    assert mismatch == []


@pytest.mark.slow
def test_second_concurrent_run_is_refused(tmp_path):
    inputs = make_inputs(tmp_path / "in", 60)
    out = tmp_path / "out"
    slow = ["--model", "vgg11", "--weights", "none", "--size", "224"]  # long enough to overlap
    first = subprocess.Popen([*fullgrad(), "dump", str(inputs), *slow, "--batch-size", "1",
                              "--workers", "0", "--quiet", "--out", str(out)], env=env())
    try:
        wait_for(lambda: (out / ".fullgrad.lock").exists()
                 and (out / ".fullgrad.lock").read_text().strip() != "")
        second = subprocess.run([*fullgrad(), "dump", str(PHOTOS / "coffee.png"), *SQUEEZENET,
                                 "--out", str(out)], env=env(), capture_output=True, text=True)
        assert first.poll() is None, "the first run ended too early to test the lock"
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "in use" in second.stderr
    finally:
        first.kill()
        first.wait()
    # a killed holder does not leave the directory locked
    third = subprocess.run([*fullgrad(), "dump", str(PHOTOS / "coffee.png"), *SQUEEZENET, "--out",
                            str(out), "--quiet"], env=env())
    assert third.returncode == 0


@pytest.mark.slow
def test_pipeline_stdin_json_and_exit_codes(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    listing = f"{PHOTOS / 'coffee.png'}\n{tmp_path / 'broken.jpg'}\n"
    result = subprocess.run([*fullgrad(), "dump", "-", *SQUEEZENET, "--json", "--quiet", "--out",
                             str(tmp_path / "out")], input=listing, env=env(),
                            capture_output=True, text=True)
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["status"] for r in lines) == ["failed", "ok"]
    # --quiet: no progress or summary, but the failed image's one line (cron mails stderr)
    assert result.stderr == (f"fullgrad: failed: {tmp_path / 'broken.jpg'}: "
                             "not an image Pillow can read\n")
    usage = subprocess.run([*fullgrad(), "dump", str(PHOTOS), "--model", "vgg17"],
                           env=env(), capture_output=True, text=True)
    assert usage.returncode == 2 and "vgg16" in usage.stderr and "Traceback" not in usage.stderr


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_progress_bar_only_on_a_terminal(tmp_path):
    master, slave = os.openpty()
    proc = subprocess.Popen([*fullgrad(), "dump", str(PHOTOS / "coffee.png"), *SQUEEZENET, "--out",
                             str(tmp_path / "out")], stderr=slave, stdout=subprocess.DEVNULL,
                            env=env())
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait()
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "img/s" in text and "1img" in text.replace(" ", "")  # tqdm's count and rate
    piped = subprocess.run([*fullgrad(), "dump", str(PHOTOS / "coffee.png"), *SQUEEZENET, "--out",
                            str(tmp_path / "out2")], env=env(), capture_output=True, text=True)
    assert "img/s]" not in piped.stderr and "ok" in piped.stderr


def test_help_is_fast_and_lists_every_option():
    start = time.perf_counter()
    result = subprocess.run([*fullgrad(), "dump", "--help"], env={**env(), "COLUMNS": "200"},
                            capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--model", "--weights", "--method", "--device", "--out", "--save",
                   "--target", "--topk", "--batch-size", "--workers", "--size", "--crop",
                   "--mean", "--std", "--labels", "--colormap", "--alpha", "--files-from",
                   "--overwrite", "--quiet", "--json", "--debug", "--config", "--fail-fast"):
        assert option in result.stdout, option
    assert time.perf_counter() - start < 10


@pytest.mark.slow
def test_json_into_a_pipe_that_closes_early(tmp_path):
    """`fullgrad dump --json | head -1`: the run finishes and writes every result."""
    script = (f"{' '.join(fullgrad())} dump {PHOTOS} {' '.join(SQUEEZENET)} --json --quiet "
              f"--out {tmp_path / 'out'} | head -n 1")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", script], env=env(),
                            capture_output=True, text=True)
    assert len(result.stdout.splitlines()) == 1 and json.loads(result.stdout)["status"] == "ok"
    assert "Traceback" not in result.stderr and "error" not in result.stderr
    assert len(manifest_lines(tmp_path / "out")) == 6
    assert result.returncode == 0
