"""`fullgrad dump --ray`: Ray Data decoding tasks and engine actors, on the CPU.

One local Ray (two CPUs) serves the whole module; ``run_ray`` uses a session that is
already open and leaves it open.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import PHOTOS, SQUEEZENET, cli, manifest, one_thread

from fgcli.config import ModelSpec, RunConfig
from fgcli.errors import SetupError

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from fgcli.distributed import ray_data  # noqa: E402 - after the guard

BASE = [*SQUEEZENET, "--workers", "0"]
TIMING = ("seconds", "time")


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


def dump(args: list[str]):
    return cli("dump", *BASE, *args)


def untimed(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING}


def files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*")
            if p.is_file() and p.name != ".fullgrad.lock"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The six photos (different sizes: ragged originals) and one broken file."""
    root = tmp_path_factory.mktemp("photos") / "in"
    shutil.copytree(PHOTOS, root)
    (root / "broken.jpg").write_bytes(b"this is not a JPEG\n")
    return root


@pytest.fixture(scope="module")
def ray_run(local_ray, images, tmp_path_factory):
    """The same dump twice: one process, then Ray with two CPU actors."""
    base = tmp_path_factory.mktemp("runs")
    plain, on_ray = base / "plain", base / "ray"
    with one_thread():  # as each CPU actor computes
        first = dump([str(images), "--out", str(plain)])
    second = dump([str(images), "--out", str(on_ray), "--ray", "--ray-actors", "2"])
    return plain, on_ray, first, second


@pytest.mark.slow
def test_ray_matches_a_single_process_run(ray_run):
    plain, on_ray, first, second = ray_run
    assert first.exit_code == second.exit_code == 1  # the broken image
    assert files(plain) - {"run.json"} == files(on_ray) - {"run.json"}
    mine = sorted((untimed(r) for r in manifest(on_ray)), key=lambda r: r["key"])
    theirs = sorted((untimed(r) for r in manifest(plain)), key=lambda r: r["key"])
    assert [r["key"] for r in mine] == [r["key"] for r in theirs]  # each key once
    for a, b in zip(mine, theirs):
        if b["status"] == "ok":  # scores: float rounding of other batch compositions
            scale = max(1.0, abs(b["logit"]))
            for name in ("logit", "prob", "residual"):
                assert a.pop(name) == pytest.approx(b.pop(name), rel=1e-4, abs=1e-4 * scale)
        assert a == b
    for rec in manifest(plain):
        if rec["status"] == "ok":
            want = np.load(plain / rec["outputs"]["map"])
            got = np.load(on_ray / rec["outputs"]["map"])
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    run = json.loads((on_ray / "run.json").read_text())
    assert run["engine"] == "ray" and run["ray"]["actors"] == 2
    assert run["device"] == "cpu"
    assert run["counts"] == {"ok": 6, "failed": 1, "skipped": 0}
    assert not (on_ray / ".tmp").exists()


@pytest.mark.slow
def test_broken_image_fails_alone_with_one_line(ray_run):
    _, on_ray, _, result = ray_run
    records = {r["key"]: r for r in manifest(on_ray)}
    bad = records.pop("broken.jpg")
    assert bad["status"] == "failed" and bad["outputs"] == {}
    assert bad["error"] == "not an image Pillow can read"
    assert all(r["status"] == "ok" for r in records.values()) and len(records) == 6
    line = f"failed: {bad['input']}: not an image Pillow can read"
    assert line in result.stderr
    assert "Traceback" not in result.stderr and "ray::" not in result.stderr


@pytest.mark.slow
def test_second_run_resumes(ray_run, images):
    _, on_ray, _, _ = ray_run
    (on_ray / "maps" / "coffee.png.npy").unlink()  # an output lost: that image again
    again = dump([str(images), "--out", str(on_ray), "--ray", "--ray-actors", "2"])
    assert again.exit_code == 1
    records = manifest(on_ray)
    assert len(records) == len({r["key"] for r in records}) == 7
    status = {r["key"]: r["status"] for r in records}
    assert status.pop("broken.jpg") == "failed"
    assert status.pop("coffee.png") == "ok"
    assert set(status.values()) == {"skipped"}
    assert (on_ray / "maps" / "coffee.png.npy").is_file()

@pytest.mark.slow
def test_a_plain_runs_output_resumes_on_ray_without_work(local_ray, tmp_path):
    """Nothing left to compute: every line is skipped on the driver, no actor starts."""
    good = tmp_path / "good"
    shutil.copytree(PHOTOS, good)
    out = tmp_path / "out"
    assert dump([str(good), "--out", str(out)]).exit_code == 0
    third = dump([str(good), "--out", str(out), "--ray", "--ray-actors", "2"])
    assert third.exit_code == 0
    assert {r["status"] for r in manifest(out)} == {"skipped"} and len(manifest(out)) == 6


# ---------------------------------------------------------------------- units, no Ray

class _FakeState:
    def __init__(self, fail_fast: bool = False) -> None:
        from fgcli.dump.report import RunReport
        from fgcli.signals import StopSignals

        self.cfg = RunConfig(inputs=("x",), spec=ModelSpec("m"), fail_fast=fail_fast)
        self.report = RunReport()
        self.stop = StopSignals(installed=False)  # as the ledger has
        self.halted = None
        self.written: list[dict] = []

    def write_record(self, rec: dict) -> None:
        self.written.append(rec)


def _rec(key: str, rank=None, status="ok") -> dict:
    return {"key": key, "rank": rank, "status": status}


def test_repeated_records_from_a_retried_batch_are_dropped():
    state = _FakeState()
    records = [_rec("a"), _rec("b"), _rec("a"), _rec("c", 1), _rec("c", 2), _rec("c", 1),
               _rec("b", status="failed")]
    assert ray_data.write_records(state, records) == 3
    assert [(r["key"], r["rank"]) for r in state.written] == [
        ("a", None), ("b", None), ("c", 1), ("c", 2)]
    seen: set = set()
    assert ray_data.fresh(_rec("z"), seen) and not ray_data.fresh(_rec("z"), seen)


def test_fail_fast_stops_at_the_first_failed_record():
    state = _FakeState(fail_fast=True)
    ray_data.write_records(state, [_rec("a"), _rec("b", status="failed"), _rec("c")])
    assert [r["key"] for r in state.written] == ["a", "b"]
    assert state.report.stopped_early


@pytest.mark.parametrize("resources, actors, want", [
    ({"CPU": 2.0}, None, (1, "cpu", 0.0, 1.0, 1)),
    ({"CPU": 2.0}, 2, (2, "cpu", 0.0, 0.5, 1)),
    ({"CPU": 16.0}, 3, (3, "cpu", 0.0, 5.0, 5)),
    ({"CPU": 32.0, "GPU": 4.0}, None, (4, "cuda", 1.0, 1.0, None)),
    ({"CPU": 32.0, "GPU": 4.0}, 2, (2, "cuda", 1.0, 1.0, None)),
])
def test_plan(resources, actors, want):
    cfg = RunConfig(inputs=("x",), spec=ModelSpec("m"), ray=True, ray_actors=actors)
    how = ray_data.plan(cfg, resources)
    assert (how.actors, how.device, how.num_gpus, how.actor_cpus, how.threads) == want
    total = how.actors * how.actor_cpus + how.decode_cpus
    assert total <= resources["CPU"]  # decoding always has a core to run on


def test_plan_cuda_without_gpus_is_a_setup_error():
    cfg = RunConfig(inputs=("x",), spec=ModelSpec("m"), ray=True, device="cuda")
    with pytest.raises(SetupError, match="no GPUs"):
        ray_data.plan(cfg, {"CPU": 8.0})


def test_missing_ray_is_a_setup_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SetupError, match=r'pip install "fgcli\[ray\]"'):
        ray_data._import_ray()


def test_ray_errors_become_one_line():
    class Wrapped(Exception):
        def __init__(self, cause):
            super().__init__("ray::MapWorker.__call__() (pid=1, ip=x)\n  long traceback")
            self.cause = cause

    line = ray_data._ray_error_line(Wrapped(ValueError("bad shape\nmore")))
    assert line == "ValueError: bad shape"


def test_unreachable_address_is_one_setup_line():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SetupError, match=rf"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        ray_data._probe(f"127.0.0.1:{port}")
    ray_data._probe("auto")  # nothing to probe: Ray finds the cluster itself
