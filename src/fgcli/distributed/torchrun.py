"""``torchrun --nproc-per-node 8 -m fgcli dump ...``: one rank per GPU, one shard per rank.

Each rank reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (set by
torchrun), takes shard ``RANK/WORLD_SIZE`` of the images, runs on ``cuda:LOCAL_RANK``
when CUDA is there (``--device auto`` or ``cuda``) and on the CPU otherwise, and writes
into the shared output tree as ``--shard`` does. The process group is nccl on GPUs,
gloo on the CPU, set up from torchrun's store (``env://``); multi-node works the same,
given an output directory that every node sees (NFS, Lustre, ...).

Finishing: every rank posts its counts (or its error) in the store. Rank 0 waits for all
of them, merges the shard manifests (unless a rank failed: its shard then stays for a
rerun) and posts the outcome; the other ranks wait for that one key, so the store's load
does not grow with the square of the ranks. Every rank then reads the totals and says
goodbye (a ``bye`` key; rank 0, which may host the store, leaves last, once every rank has
said it), and exits with the run-wide exit code (so torchrun's own status agrees). Waiting is bounded by progress,
not by the run's length: each rank beats a heartbeat key every few seconds while its
main thread finishes batches (or waits), and a rank whose heartbeat stops for
``--dist-timeout`` seconds is given up on with one clear line; what it finished is kept,
and rerunning the same command resumes its shard. (torchrun itself stops all ranks when
one process dies; the heartbeat covers hung ranks and nodes that vanish.) A rank that
cannot start (its shard locked, a bad option) posts its error at once, but the others
finish their shards before the job ends with that error.

Signals: a rank stopped by SIGINT / SIGTERM (torchrun forwards them, a terminal's Ctrl-C
reaches every rank) stops as a single run does (:mod:`fgcli.signals`), posts its counts
marked ``interrupted`` and leaves at once with 130 / 143, waiting for nobody; it says
goodbye even when stopped while waiting. Rank 0 then does not merge (the shards stay for
the rerun, which resumes each), and a rank 0 that is stopped posts that outcome, so no
rank waits for a merge that will not come.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fgcli.config import RunConfig, replace
from fgcli.dump.report import ObjectsTally, RunReport
from fgcli.dump.run import run
from fgcli.errors import SetupError, UsageError
from fgcli.signals import Interrupted
from fgcli.tree.shards import Shard, merge

BEAT_SECONDS = 2.0
PREFIX = "fgcli/"


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world: int
    local_rank: int


def rank_env(environ: Any = None) -> RankEnv | None:
    """The torchrun rank of this process; None outside torchrun or with one process.
    (``LOCAL_WORLD_SIZE``, the ranks on this node, is read where cores are shared out:
    :func:`fgcli.dump.session.cores_per_process`.)"""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise UsageError(f"torchrun: RANK / WORLD_SIZE / LOCAL_RANK are not integers "
                         f"({exc})") from exc
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise UsageError(f"torchrun: RANK {rank} is outside WORLD_SIZE {world}")
    return RankEnv(rank, world, local_rank)


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
    """A thread that bumps ``beat/<rank>`` in the store while this rank makes progress.

    Liveness alone is not enough (a rank whose main thread hangs in a stalled file
    system write or a deadlocked loader would keep a free-running thread beating), so
    once the run has started (:meth:`gate`), the thread beats only while the main
    thread reports progress (:meth:`touch`: each finished record, each poll while
    waiting) at least every ``timeout`` seconds. Before that (model loading, a weights
    download) it beats freely.
    """

    def __init__(self, store: Any, rank: int, prefix: str, timeout: float) -> None:
        self.store, self.rank, self.prefix, self.timeout = store, rank, prefix, timeout
        self.stop = threading.Event()
        self.count = 0
        self.gated = False
        self.last_progress = time.monotonic()
        self._beat()
        self.thread = threading.Thread(target=self._loop, name="fgcli-heartbeat", daemon=True)
        self.thread.start()

    def touch(self) -> None:
        self.last_progress = time.monotonic()

    def gate(self) -> None:
        self.touch()
        self.gated = True

    def _beat(self) -> None:
        self.count += 1
        self.store.set(f"{self.prefix}beat/{self.rank}", str(self.count))

    def _loop(self) -> None:
        while not self.stop.wait(BEAT_SECONDS):
            if self.gated and time.monotonic() - self.last_progress > self.timeout:
                continue  # the main thread is stuck: let the others see it
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store went away: the job is ending
                return

    def close(self) -> None:
        self.stop.set()


def _wait_for(store: Any, posts: dict[int, str], timeout: float, what: str,
              prefix: str = PREFIX, beat: _Heartbeat | None = None) -> None:
    """Wait until each rank has posted its key; SetupError once a rank that has not
    posted yet stops beating for ``timeout`` seconds. Waiting counts as progress."""
    last: dict[int, tuple[bytes, float]] = {}
    while True:
        if beat is not None:
            beat.touch()
        pending = [rank for rank, key in posts.items() if not store.check([key])]
        if not pending:
            return
        now = time.monotonic()
        for rank in pending:
            beat_key = f"{prefix}beat/{rank}"
            value = store.get(beat_key) if store.check([beat_key]) else b""
            seen = last.get(rank)
            if seen is None or seen[0] != value:
                last[rank] = (value, now)
            elif now - seen[1] > timeout:
                raise SetupError(f"rank {rank} made no progress for {timeout:.0f} s while "
                                 f"waiting for {what}; the images it finished are kept: "
                                 "rerun the same command to finish its shard")
        time.sleep(0.5)


def _connect(env: RankEnv, backend: str, timeout: float) -> Any:
    """torchrun's store and the process group; one SetupError line when they fail."""
    import torch.distributed as dist

    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise SetupError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: run "
                         "under torchrun (or unset RANK and WORLD_SIZE)")
    try:
        store, rank, world = next(dist.rendezvous("env://", env.rank, env.world,
                                                  timeout=timedelta(seconds=timeout)))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError, OSError) as exc:
        text = str(exc).strip().splitlines()
        raise SetupError(f"torchrun: cannot join the job at {os.environ['MASTER_ADDR']}:"
                         f"{os.environ['MASTER_PORT']} ({text[0] if text else exc})") from exc
    return store


def run_rank(cfg: RunConfig, env: RankEnv, reporter_for: Any) -> RunReport:
    """This rank's shard, then the finish described in the module docstring."""
    import torch
    import torch.distributed as dist

    if "-" in cfg.inputs:
        raise UsageError("under torchrun every rank would read the same stdin: give the "
                         "list as --files-from FILE on a file system all ranks see")
    device = rank_device(cfg.device, env)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    store = _connect(env, "nccl" if device.startswith("cuda") else "gloo", cfg.dist_timeout)
    shard = Shard(env.rank, env.world)
    # keys per attempt: after a torchrun restart (--max-restarts) the store still holds
    # the failed attempt's keys
    prefix = f"{PREFIX}{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    beat = _Heartbeat(store, env.rank, prefix, cfg.dist_timeout)
    lead = env.rank == 0
    reporter = _RankReporter(reporter_for(f"shard {shard}: ", lead), beat, lead)
    # decoding workers and writer threads follow the rank's share of the node's cores
    # (fgcli.dump.session.cores_per_process reads LOCAL_WORLD_SIZE)
    rank_cfg = replace(cfg, shard=str(shard), device=device)
    ranks = list(range(env.world))
    try:
        report, error, raised = _run_shard(rank_cfg, reporter, cfg.out, device)
        stopped = report.interrupted or (raised.name if isinstance(raised, Interrupted)
                                         else None)
        store.set(f"{prefix}done/{env.rank}", json.dumps({
            "ok": report.ok, "failed": report.failed, "skipped": report.skipped,
            "seconds": report.seconds, "stopped_early": report.stopped_early,
            "error": error, "interrupted": stopped,
            "objects": None if report.objects is None else report.objects.as_json()}))
        if stopped:  # a stop signal: leave at once, the others do not wait for this rank
            if raised is not None:
                raise raised
            return report
        total = _agree(store, prefix, ranks, cfg, device, beat, lead, reporter.warn)
        if lead:
            reporter.release(total)
        if raised is not None:
            raise raised
        if error is not None:
            raise SetupError(error)
        errors = _errors(store, prefix, ranks)
        if errors:
            raise SetupError(f"{len(errors)} rank(s) could not run ({errors[0]}); finished "
                             "images are kept in their shards: rerun the same command")
        outcome = store.get(f"{prefix}merged").decode()
        if outcome != "ok":
            raise SetupError(outcome)
        return total
    finally:
        _leave(store, prefix, env.rank, lead)
        beat.close()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - tearing down after another error
            pass


def _run_shard(cfg: RunConfig, reporter: Any, out: str, device: str
               ) -> tuple[RunReport, str | None, BaseException | None]:
    """This rank's shard: (report, error line to post, exception to raise after the
    finish); a stop signal before the loop or a second one comes back as ``raised``."""
    try:
        return run(cfg, reporter), None, None
    except (SetupError, UsageError) as exc:
        return RunReport(out=out, device=device), str(exc), None
    except BaseException as exc:  # noqa: BLE001 - posted, the protocol finished, raised
        if isinstance(exc, Interrupted):
            error = f"interrupted by {exc.name}"
        elif isinstance(exc, KeyboardInterrupt):
            error = "interrupted"
        else:
            error = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
        return RunReport(out=out, device=device), error, exc


def _agree(store: Any, prefix: str, ranks: list[int], cfg: RunConfig, device: str,
           beat: _Heartbeat, lead: bool, warn: Any) -> RunReport:
    """Rank 0 waits for every rank's counts, merges (unless a rank failed or stopped;
    the merge's warnings go to ``warn``) and posts the outcome; the others wait for
    that. Then every rank reads the totals; rank 0 leaves last (it may host the store),
    once each rank has said goodbye."""
    if lead:  # only rank 0 watches every rank (the others watch rank 0 alone)
        _wait_for(store, {r: f"{prefix}done/{r}" for r in ranks}, cfg.dist_timeout,
                  "every rank to finish its shard", prefix, beat)
        errors = _errors(store, prefix, ranks)
        outcome = "merge failed: rank 0 stopped while merging"
        try:
            if not errors:
                for line in merge(cfg.out, list(cfg.command)).warnings:
                    warn(line)
            outcome = "ok"
        except SetupError as exc:
            outcome = f"merge failed: {exc}"
        finally:  # the others wait for this key, whatever happened
            store.set(f"{prefix}merged", outcome)
    else:
        _wait_for(store, {0: f"{prefix}merged"}, cfg.dist_timeout,
                  "rank 0 to merge the shards", prefix, beat)
    total = _total(store, prefix, ranks, cfg.out, device)
    if lead:  # instead of a barrier: a rank that was stopped by a signal has said goodbye
        _wait_for(store, {r: f"{prefix}bye/{r}" for r in ranks[1:]}, cfg.dist_timeout,
                  "every rank to read the outcome", prefix, beat)
    return total


def _leave(store: Any, prefix: str, rank: int, lead: bool) -> None:
    """Say goodbye (rank 0 waits for it, not for a barrier a stopped rank never reaches);
    rank 0 leaving without an outcome (a stop signal) posts one, so nobody waits."""
    try:
        if lead and not store.check([f"{prefix}merged"]):
            store.set(f"{prefix}merged", "rank 0 was interrupted; finished images are kept "
                                         "in their shards: rerun the same command")
        store.set(f"{prefix}bye/{rank}", "1")
    except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
        pass


def _posted(store: Any, prefix: str, ranks: list[int]) -> list[dict[str, Any]]:
    return [json.loads(store.get(f"{prefix}done/{r}")) for r in ranks]


def _errors(store: Any, prefix: str, ranks: list[int]) -> list[str]:
    """Ranks that failed or were stopped by a signal (their shards are not merged)."""
    found = []
    for r, p in zip(ranks, _posted(store, prefix, ranks)):
        error = p["error"] or (f"interrupted by {p['interrupted']}"
                               if p.get("interrupted") else None)
        if error:
            found.append(f"rank {r}: {error}")
    return found


def _total(store: Any, prefix: str, ranks: list[int], out: str, device: str) -> RunReport:
    """Every rank's counts added up (what the summary and the exit code report)."""
    posted = _posted(store, prefix, ranks)
    total = RunReport(out=out, device=device, seconds=max(p["seconds"] for p in posted))
    for p in posted:
        total.ok += p["ok"]
        total.failed += p["failed"]
        total.skipped += p["skipped"]
        total.stopped_early |= p["stopped_early"]
    tallies = [p["objects"] for p in posted if p.get("objects")]
    if tallies:  # --boxes / --masks: one annotations line for the whole run
        total.objects = ObjectsTally.added(tallies)
    return total


class _RankReporter:
    """A rank's reporter: every record and the run's start count as progress for the
    heartbeat; rank 0's summary is held back until every rank's counts are in."""

    def __init__(self, inner: Any, beat: _Heartbeat, lead: bool) -> None:
        self.inner, self.beat, self.lead = inner, beat, lead

    def started(self, info: dict[str, Any]) -> None:
        self.beat.gate()
        self.inner.started(info)

    def warn(self, message: str) -> None:
        self.inner.warn(message)

    def alert(self, message: str) -> None:
        self.inner.alert(message)

    def progress(self) -> None:
        self.beat.touch()
        self.inner.progress()

    def record(self, record: dict[str, Any], line: str, image_done: bool) -> None:
        self.beat.touch()
        self.inner.record(record, line, image_done)

    def finished(self, report: RunReport) -> None:
        if not self.lead or report.interrupted:  # an interrupted rank 0 is not summed up
            self.inner.finished(report)  # quiet on other ranks: closes nothing but a bar

    def release(self, total: RunReport) -> None:
        self.inner.finished(total)
