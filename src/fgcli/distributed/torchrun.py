"""``torchrun --nproc-per-node 8 -m fgcli dump ...``: one rank per GPU, one shard per rank.

Each rank reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (set by
torchrun), takes shard ``RANK/WORLD_SIZE`` of the images, runs on ``cuda:LOCAL_RANK``
when CUDA is there (``--device auto`` or ``cuda``) and on the CPU otherwise, and writes
into the shared output tree as ``--shard`` does. The process group is nccl on GPUs,
gloo on the CPU, set up from torchrun's store (``env://``); multi-node works the same,
given an output directory that every node sees (NFS, Lustre, ...).

Finishing: every rank posts its counts in the store and waits at a barrier; rank 0 then
merges the shard manifests and posts that it is done, and every rank exits with the
run-wide exit code (so torchrun's own status agrees). Waiting is bounded by liveness,
not by the run's length: each rank beats a heartbeat key every few seconds, and a rank
whose heartbeat stops for ``--dist-timeout`` seconds is given up on with one clear line;
what it finished is kept, and rerunning the same command resumes its shard. (torchrun
itself stops all ranks when one process dies; the heartbeat covers hung ranks and
nodes that vanish.)
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fgcli.config import RunConfig, UsageError, replace
from fgcli.distributed.shards import Shard, merge
from fgcli.errors import SetupError
from fgcli.pipeline import RunReport, run

BEAT_SECONDS = 2.0
PREFIX = "fgcli/"


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world: int
    local_rank: int
    local_world: int


def rank_env(environ: Any = None) -> RankEnv | None:
    """The torchrun rank of this process; None outside torchrun or with one process."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError as exc:
        raise UsageError(f"torchrun: RANK / WORLD_SIZE / LOCAL_RANK are not integers "
                         f"({exc})") from exc
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise UsageError(f"torchrun: RANK {rank} is outside WORLD_SIZE {world}")
    return RankEnv(rank, world, local_rank, max(1, local_world))


def rank_device(spec: str, env: RankEnv) -> str:
    """``auto``/``cuda`` -> ``cuda:LOCAL_RANK`` where CUDA exists; anything else as given."""
    import torch

    spec = spec.strip().lower()
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise SetupError(f"torchrun: LOCAL_RANK {env.local_rank} but only "
                             f"{torch.cuda.device_count()} CUDA device(s) here")
        return f"cuda:{env.local_rank}"
    return "cpu" if spec == "auto" else spec


class _Heartbeat:
    """A thread that stamps ``beat/<rank>`` in the store while this rank lives."""

    def __init__(self, store: Any, rank: int, prefix: str) -> None:
        self.store, self.rank, self.prefix = store, rank, prefix
        self.stop = threading.Event()
        self.count = 0
        self._beat()
        self.thread = threading.Thread(target=self._loop, name="fgcli-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        self.count += 1
        self.store.set(f"{self.prefix}beat/{self.rank}", str(self.count))

    def _loop(self) -> None:
        while not self.stop.wait(BEAT_SECONDS):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store went away: the job is ending
                return

    def close(self) -> None:
        self.stop.set()


def _wait_for(store: Any, posts: dict[int, str], timeout: float, what: str,
              prefix: str = PREFIX) -> None:
    """Wait until each rank has posted its key; SetupError once a rank that has not
    posted yet stops beating for ``timeout`` seconds."""
    last: dict[int, tuple[bytes, float]] = {}
    while True:
        pending = [rank for rank, key in posts.items() if not store.check([key])]
        if not pending:
            return
        now = time.monotonic()
        for rank in pending:
            beat_key = f"{prefix}beat/{rank}"
            beat = store.get(beat_key) if store.check([beat_key]) else b""
            seen = last.get(rank)
            if seen is None or seen[0] != beat:
                last[rank] = (beat, now)
            elif now - seen[1] > timeout:
                raise SetupError(f"rank {rank} stopped answering for {timeout:.0f} s while "
                                 f"waiting for {what}; the images it finished are kept: "
                                 "rerun the same command to finish its shard")
        time.sleep(0.2)


def run_rank(cfg: RunConfig, env: RankEnv, reporter_for: Any) -> RunReport:
    """This rank's shard, then the finish described in the module docstring."""
    import torch
    import torch.distributed as dist

    device = rank_device(cfg.device, env)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    store, rank, world = next(dist.rendezvous("env://", env.rank, env.world,
                                              timeout=timedelta(seconds=cfg.dist_timeout)))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg.dist_timeout))
    shard = Shard(env.rank, env.world)
    # keys per attempt: after a torchrun restart (--max-restarts) the store still holds
    # the failed attempt's keys
    prefix = f"{PREFIX}{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    beat = _Heartbeat(store, env.rank, prefix)
    lead = env.rank == 0
    reporter = reporter_for(f"shard {shard}: ", lead)
    summary = _Deferred(reporter) if lead else reporter
    # decoding workers and writer threads follow the rank's share of the node's cores
    # (pipeline.cores_per_process reads LOCAL_WORLD_SIZE)
    rank_cfg = replace(cfg, shard=str(shard), device=device)
    report = RunReport(out=cfg.out, device=device)
    error: str | None = None
    try:
        try:
            report = run(rank_cfg, summary)
        except (SetupError, UsageError) as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - posted to the other ranks, then raised
            error = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
            raise
        finally:
            store.set(f"{prefix}done/{env.rank}", json.dumps({
                "ok": report.ok, "failed": report.failed, "skipped": report.skipped,
                "seconds": report.seconds, "stopped_early": report.stopped_early,
                "error": error}))
        ranks = list(range(env.world))
        _wait_for(store, {r: f"{prefix}done/{r}" for r in ranks}, cfg.dist_timeout,
                  "every rank to finish its shard", prefix)
        dist.barrier()
        posted = [json.loads(store.get(f"{prefix}done/{r}")) for r in ranks]
        total = RunReport(out=cfg.out, device=device, seconds=max(p["seconds"] for p in posted))
        for p in posted:
            total.ok += p["ok"]
            total.failed += p["failed"]
            total.skipped += p["skipped"]
            total.stopped_early |= p["stopped_early"]
        errors = [f"rank {r}: {p['error']}" for r, p in zip(ranks, posted) if p["error"]]
        total.extra = {"ranks": env.world, "errors": errors}
        if lead:
            try:
                if not errors:
                    merge(cfg.out, list(cfg.command))
            finally:  # the others wait for this key, whatever happened
                store.set(f"{prefix}merged", "1")
            summary.release(total)
        else:
            _wait_for(store, {0: f"{prefix}merged"}, cfg.dist_timeout,
                      "rank 0 to merge the shards", prefix)
        if error is not None:
            raise SetupError(error)
        if errors:
            raise SetupError(f"{len(errors)} rank(s) could not run: {errors[0]}; finished "
                             "images are kept, unmerged: rerun the same command")
        return total
    finally:
        beat.close()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - tearing down after another error
            pass


class _Deferred:
    """Rank 0's reporter, with the summary held back until every rank's counts are in."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def finished(self, report: RunReport) -> None:
        pass

    def release(self, total: RunReport) -> None:
        self.inner.finished(total)
