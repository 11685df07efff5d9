"""``fullgrad dump ... --ray``: the same dump on a Ray cluster, through Ray Data.

Who does what:

* **The driver** (the process that runs ``fullgrad``) loads the model once on the CPU, so
  a bad ``--model`` or ``--weights`` ends with exit code 2 before Ray starts; takes the
  output tree's exclusive lock, as a plain run does (a Ray run, a plain run and shards
  exclude each other); walks the inputs and writes, as a plain run does, the failed lines
  of inputs that cannot be read and the skipped lines of images already done with these
  settings. What is left, paths (as bytes: any name the OS allows) and keys only,
  becomes a Ray dataset (``ray.data.from_items``).
* **Decoding** runs as Ray tasks (``flat_map``; a fan-out step Ray Data never fuses into
  the actors), with the very code of a local run (:class:`fgcli.data.decode.ImageDataset`):
  each row leaves as the preprocessed tensor (float32, 3 x h x w), the region of the
  original the model saw (uint8, H x W x 3, ragged; empty unless overlays are saved), its
  box, or the one-line error of an image that does not decode.
* **The engine** runs in a fixed pool of actors (``map_batches`` with
  ``ActorPoolStrategy``), one GPU each when the cluster has GPUs (Ray sets
  ``CUDA_VISIBLE_DEVICES``; the actor uses ``cuda``), otherwise on the CPU with the
  cluster's cores shared among the actors (one core is left to decoding). Default count:
  one actor per GPU, else one per CPU but one; ``--ray-actors N`` sets it. Each actor
  builds its own run state (model, engine, batch size) and writes the batch's files into
  the shared output tree with the same atomic writes (a unique name in ``.tmp/``, then
  ``os.replace``), then returns the batch's manifest records as JSON strings.
* **The driver** appends those records to ``manifest.jsonl`` (it is the only writer of
  the manifest), counts them, shows progress, and at the end writes ``run.json`` (with
  ``"engine": "ray"``, the actor count and device) and compacts the manifest.

Failures: Ray restarts an actor that dies and retries its batch elsewhere (Ray Data's
actor pools default to ``max_restarts=-1`` and ``max_task_retries=-1``). Output files
are whole either way (atomic writes), and a batch Ray runs twice could deliver its
records twice, so the driver keeps the (key, rank) pairs written in this run and drops
repeats: the manifest gets exactly one line per image (per rank). When the driver itself
dies, finished lines are on disk and rerunning the same command resumes (done keys are
skipped on the driver before anything reaches Ray). Under ``--fail-fast`` the driver
stops reading at the first failed record (actors never stop on their own).

Clusters: every node needs fgcli and the model's files at the same paths, and the
output tree must be on a file system all nodes share (NFS, Lustre, ...). Relative paths
are resolved against the driver's working directory (actors change to it when it exists
on their node); an actor whose model does not match the driver's (different weights
file on its node) refuses to start. ``--ray-address`` (or ``$RAY_ADDRESS``) joins a
cluster; without one a local Ray is started for the run and stopped after it. A Ray
session already open in the process (``ray.init`` called by the caller) is used as it
is and left open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fgcli.config import RunConfig, replace
from fgcli.data.decode import Box, Failure, ImageDataset, Sample, collate
from fgcli.data.discover import Item
from fgcli.dump.ledger import CollectLedger, Ledger
from fgcli.dump.report import Reporter, RunReport, SilentReporter
from fgcli.dump.run import Compute, Dump, check_options, run
from fgcli.dump.session import Session
from fgcli.dump.step import step
from fgcli.dump.writeback import WriteBack
from fgcli.errors import SetupError
from fgcli.signals import stop_signals
from fgcli.tree.atomic import TreeWriteError
from fgcli.tree.manifest import check_record, parse_line
from fgcli.tree.writer import OutputTree

MAX_BLOCKS = 10_000  # input blocks (one decoding task each) for very long lists


class RayRunError(SetupError):
    """Ray stopped the run (a batch failed in the engine, the cluster went away); one line,
    exit code 2 like other set-up failures. Lines written before it are kept: rerunning
    the same command resumes."""


@dataclass(frozen=True)
class Plan:
    """How the engine is spread over the cluster."""

    actors: int
    device: str  # what each actor passes to --device: cuda, cpu (or mps)
    num_gpus: float
    actor_cpus: float
    decode_cpus: float
    threads: int | None  # torch threads per CPU actor


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - needs the [data] extra (pyarrow, pandas)
    except ImportError as exc:
        raise SetupError('--ray needs Ray: pip install "fgcli[ray]"') from exc
    return ray


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _ray_error_line(exc: BaseException) -> str:
    """The first line of the error at the root of Ray's wrapped exceptions."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # Ray's task errors start with "ray::EngineActor.__call__() (pid=..., ip=...)"
    text = [line for line in text if not line.startswith("ray::")] or text
    first = text[0] if text else ""
    name = type(exc).__name__
    return f"{name}: {first}" if first and not first.startswith(name) else (first or name)


def _tree_error(exc: BaseException) -> TreeWriteError | None:
    """The TreeWriteError at the root of Ray's wrapped exceptions, if that is the cause."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TreeWriteError):
            return TreeWriteError(str(exc), exc.path)
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return None


def _quiet_ray(cfg: RunConfig) -> None:
    """Ray's chatter (cluster start, token notices, dataset plans, its C++ core's
    notices about restartable actors, hints about block counts) never reaches stderr
    unless --debug; failures still come back as exceptions, and fgcli reports them."""
    import warnings

    if cfg.debug:
        return
    # read when Ray's C++ core starts: otherwise it prints a notice about restartable
    # actors at every run (the actors of Ray Data pools always are)
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")


@contextlib.contextmanager
def _muted_stderr(active: bool) -> Iterator[None]:
    """File descriptor 2 to /dev/null for a moment: Ray's C++ core announces its log level
    there while ``ray.init`` runs (and a local cluster's daemons, started meanwhile, keep
    /dev/null as their stderr; their logs are under /tmp/ray/session_latest/logs)."""
    if not active:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def _ray_notices_to(reporter: Reporter, debug: bool) -> Iterator[None]:
    """Ray's driver prints the cluster's notices ("A worker died ...", "... will be
    retried") on stdout, where --json lines go. They become one warning line each, once
    (so --quiet hides them; the run's outcome is in the manifest). A private hook of Ray:
    without it, Ray prints as it always does."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        ray_worker = None
    original = getattr(ray_worker, "print_to_stdstream", None)
    if debug or original is None:
        yield
        return
    shown: set[str] = set()

    def notice(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":  # worker output (only with log_to_driver)
            original(data, ignore_prefix)
            return
        for text in data.get("lines", []):
            first = (str(text).strip().splitlines() or [""])[0]
            first = first.split(". ")[0].rstrip(".")
            if first and first not in shown:
                shown.add(first)
                reporter.warn(f"Ray: {first}")

    ray_worker.print_to_stdstream = notice
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = original


def _probe(address: str | None, timeout: float = 5.0) -> None:
    """A host:port (or ray://host:port) that does not accept connections fails in one
    line within seconds (``ray.init`` keeps retrying for minutes)."""
    import socket

    if not address or address in ("auto", "local"):
        return
    where = address.split("://", 1)[-1]
    host, sep, port = where.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)),
                                 timeout=timeout).close()
    except OSError as exc:
        raise SetupError(f"--ray: cannot reach the Ray cluster at {address}: "
                         f"{exc.strerror or exc}") from exc


def _explicit_address(cfg: RunConfig) -> str | None:
    return cfg.ray_address or os.environ.get("RAY_ADDRESS") or None


def connect(cfg: RunConfig) -> bool:
    """Join (or start) Ray; True when this call started the session (and must stop it)."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    address = cfg.ray_address or None  # None: Ray honours $RAY_ADDRESS, else starts one
    _probe(_explicit_address(cfg))
    try:
        with _muted_stderr(not cfg.debug):
            ray.init(address=address, include_dashboard=False, log_to_driver=cfg.debug,
                     logging_level=logging.INFO if cfg.debug else logging.ERROR,
                     configure_logging=True)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError...
        where = _explicit_address(cfg)
        what = f"cannot reach the Ray cluster at {where}" if where else "cannot start Ray"
        raise SetupError(f"--ray: {what}: {_one_line(exc)}") from exc
    _quiet_ray(cfg)  # ray.init configures its loggers again
    return True


def plan(cfg: RunConfig, resources: dict[str, float]) -> Plan:
    """Actor count, device and resources per actor from the cluster's resources."""
    cpus = float(resources.get("CPU", 0.0)) or float(os.cpu_count() or 1)
    gpus = int(resources.get("GPU", 0.0))
    spec = cfg.device.strip().lower()
    if spec == "auto":
        device = "cuda" if gpus else "cpu"
    elif spec.startswith("cuda"):
        if not gpus:
            raise SetupError(f"--device {cfg.device}: the Ray cluster has no GPUs")
        device = "cuda"  # Ray gives each actor its own GPU as cuda:0
    else:
        device = spec
    use_gpus = device == "cuda"
    actors = cfg.ray_actors or (gpus if use_gpus else max(1, int(cpus) - 1))
    decode_cpus = 1.0 if cpus >= 2 else cpus / 2
    share = max(cpus - decode_cpus, 0.01 * actors) / actors
    if use_gpus:
        return Plan(actors, device, 1.0, min(1.0, share), decode_cpus, None)
    actor_cpus = math.floor(share) if share >= 1 else round(share, 4)
    return Plan(actors, device, 0.0, float(actor_cpus), decode_cpus, max(1, math.floor(share)))


# --------------------------------------------------------------------------- decoding

def decode_row(row: dict[str, Any], *, params: dict[str, Any]) -> list[dict[str, Any]]:
    """One input row -> one decoded row (a Ray task; the local run's decoding code)."""
    item = Item(os.fsdecode(bytes(row["src"])), row["key"])
    dataset = ImageDataset([item], params["size"], params["crop"], params["resize"],
                           params["mean"], params["std"], params["keep_original"],
                           params["max_pixels"], params["interpolation"])
    result = dataset[0]
    h, w = params["size"]
    out = {"path": row["path"], "key": row["key"]}
    if isinstance(result, Failure):
        out.update(x=np.zeros((3, h, w), np.float32), original=np.zeros((0, 0, 3), np.uint8),
                   box=np.zeros(4, np.int64), error=result.error)
        return [out]
    original = (result.original.numpy() if result.original is not None
                else np.zeros((0, 0, 3), np.uint8))
    box = result.box
    out.update(x=result.x.numpy().astype(np.float32, copy=False), original=original,
               box=np.array([box.left, box.top, box.right, box.bottom], np.int64), error="")
    return [out]


def batch_of(rows: dict[str, Any], keep_original: bool) -> tuple[list[Item], Any]:
    """A Ray Data batch (dict of columns) -> the todo items and :class:`fgcli.data.decode.Batch`
    that :func:`fgcli.dump.step.step` takes (item j of the batch is todo[j])."""
    import torch

    todo: list[Item] = []
    results: list[Sample | Failure] = []
    for j in range(len(rows["key"])):
        todo.append(Item(os.fsdecode(bytes(rows["path"][j])), str(rows["key"][j])))
        error = str(rows["error"][j])
        if error:
            results.append(Failure(j, error))
            continue
        left, top, right, bottom = (int(v) for v in rows["box"][j])
        original = None
        if keep_original:
            original = torch.from_numpy(np.array(rows["original"][j], dtype=np.uint8))
        x = torch.from_numpy(np.array(rows["x"][j], dtype=np.float32))
        results.append(Sample(j, x, original, Box(left, top, right, bottom)))
    return todo, collate(results)


class EngineActor:
    """One engine in the actor pool: its own model, writing files, returning records."""

    def __init__(self, cfg: RunConfig, cwd: str, device: str, threads: int | None,
                 fingerprint: str) -> None:
        import torch

        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative --out, --weights, model files: as the driver sees them
        if threads is not None:
            torch.set_num_threads(threads)
        # the driver writes the manifest and handles --fail-fast; the input list is its too
        actor_cfg = replace(cfg, device=device, fail_fast=False, files_from=None,
                            inputs=cfg.inputs or ("-",), workers=0)
        check_options(actor_cfg)
        self.session = Session(actor_cfg, SilentReporter())
        self.session.load()  # no lock, no index: the driver holds the tree
        if self.session.fingerprint != fingerprint:
            import platform

            raise SetupError(f"the model on {platform.node()} differs from the driver's "
                             f"(settings {self.session.fingerprint} != {fingerprint}): every "
                             "node needs the same model and weights files")
        self.keep_original = "overlay" in actor_cfg.save
        self.ledger = CollectLedger(actor_cfg, fingerprint, self.session.ranks[0])
        self.writeback: WriteBack | None = None  # made at the first batch

    def __call__(self, rows: dict[str, Any]) -> dict[str, Any]:
        todo, batch = batch_of(rows, self.keep_original)
        return {"record": np.array([json.dumps(r, ensure_ascii=False)
                                    for r in self.compute(todo, batch)], dtype=object)}

    def compute(self, todo: list[Item], batch: Any) -> list[dict[str, Any]]:
        """One batch through the engine with its files written, returning its records
        (the driver writes them); a full disk raises (the driver stops the run)."""
        if self.writeback is None:
            self.writeback = WriteBack(OutputTree(self.session.cfg.out), self.session.cfg,
                                       self.ledger, self.session.writers)
        try:
            step(self.session, self.ledger, self.writeback, todo, batch)
            self.writeback.drain(0)
            if self.ledger.halted is not None:
                raise self.ledger.halted
            return self.ledger.records
        finally:
            self.ledger.take()  # the next batch starts with none


# --------------------------------------------------------------------------- driver

def fresh(record: dict[str, Any], seen: set[tuple[str, int | None]]) -> bool:
    """True the first time a (key, rank) comes back in this run; False for a repeat
    (a batch Ray ran twice). Marks it seen."""
    ident = (record["key"], record.get("rank"))
    if ident in seen:
        return False
    seen.add(ident)
    return True


def _todo(dump: Dump) -> list[Item]:
    items: list[Item] = []
    for chunk in dump.plan.chunks(dump.session.batch_size):
        items.extend(chunk)
    return items


def build_dataset(session: Session, items: list[Item], how: Plan, cwd: str) -> Any:
    """The Ray Data pipeline: items -> decoding tasks -> engine actors -> record rows."""
    import ray.data

    proc = session.loaded.config
    keep = "overlay" in session.cfg.save
    params = {"size": tuple(proc.size), "crop": proc.crop, "resize": proc.resize,
              "mean": tuple(proc.mean), "std": tuple(proc.std), "keep_original": keep,
              "max_pixels": session.cfg.spec.max_pixels, "interpolation": proc.interpolation}
    # paths travel as bytes (Arrow strings must be valid UTF-8; any name the OS allows is
    # not); keys are valid text (fgcli.names)
    rows = [{"path": os.fsencode(it.path), "key": it.key,
             "src": os.fsencode(os.path.join(cwd, it.path))} for it in items]
    batch = session.batch_size
    # a short list still reaches every actor (smaller batches rather than idle actors)
    batch = max(1, min(batch, math.ceil(len(rows) / how.actors)))
    blocks = max(1, min(MAX_BLOCKS, math.ceil(len(rows) / batch)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.flat_map(decode_row, fn_kwargs={"params": params}, num_cpus=how.decode_cpus)
    kwargs: dict[str, Any] = {"num_cpus": how.actor_cpus}
    if how.num_gpus:
        kwargs["num_gpus"] = how.num_gpus
    return ds.map_batches(
        EngineActor, batch_size=batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=how.actors),
        fn_constructor_kwargs={"cfg": session.cfg, "cwd": cwd, "device": how.device,
                               "threads": how.threads, "fingerprint": session.fingerprint},
        **kwargs)


class NotStrict(str):
    """A record line from an actor that is not strict JSON: why (never written)."""


def _records(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any] | NotStrict]:
    """Parsed records of the output rows; Ray's own errors become one RayRunError line."""
    it = iter(rows)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - every Ray failure ends here, one line
            full = _tree_error(exc)
            if full is not None:  # an actor could not write the tree (a full disk)
                raise full from exc
            raise RayRunError(f"Ray: {_ray_error_line(exc)} (finished images are kept: "
                              "rerun the same command to resume)") from exc
        try:
            rec = parse_line(row["record"])  # strict, as every manifest line
        except ValueError as exc:  # NaN, bad UTF-8: an actor of another version
            rec = NotStrict(f"not strict JSON ({_one_line(exc)})")
        yield rec


def write_records(state: Ledger, records: Iterable[dict[str, Any] | NotStrict]) -> int:
    """Append each record once (see :func:`fresh`); stop at a failure under --fail-fast.
    Returns the number of repeats dropped. A malformed record (:func:`check_record`: an
    actor of another version, a non-finite score) is not written: one warning line, and
    the next run computes its image again. A tree that cannot be written (the manifest
    here, or an actor's output files: a full disk) sets ``state.halted`` and takes no
    more records, as a plain run does: ``run.json`` is still written. ``state``: the
    driver's ledger (:class:`fgcli.dump.ledger.ManifestLedger`)."""
    seen: set[tuple[str, int | None]] = set()
    dropped = 0
    bad: list[str] = []
    it = iter(records)
    while True:
        try:
            rec = next(it)
        except StopIteration:
            break
        except TreeWriteError as exc:  # an actor could not write the tree
            state.halted = state.halted or exc
            break
        if state.stop.requested:  # a stop signal: take no more (Ray stops its actors
            break  # at shutdown)
        reason = str(rec) if isinstance(rec, NotStrict) else check_record(rec)
        if reason is not None:
            bad.append(reason)
            continue
        if not fresh(rec, seen):
            dropped += 1
            continue
        try:
            state.write_record(rec)
        except TreeWriteError as exc:  # the manifest cannot be written: stop, keep it whole
            state.halted = state.halted or exc
            break
        if rec["status"] == "failed" and state.cfg.fail_fast:
            state.report.stopped_early = True
            break
    if bad:
        state.reporter.warn(f"Ray returned {len(bad)} malformed record(s), not written "
                            f"(first: {bad[0]}); a rerun computes those images again")
    return dropped


def _configure_data_context(cfg: RunConfig) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    bars = not cfg.quiet and sys.stderr.isatty()
    ctx.enable_progress_bars = bars
    ctx.enable_operator_progress_bars = bars
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


def run_ray(cfg: RunConfig, reporter: Reporter) -> RunReport:
    """A dump on Ray (see the module docstring). Raises SetupError before Ray starts when
    the model, the output tree or the cluster address is wrong. A first SIGINT / SIGTERM
    stops taking records: those already back are written, ``run.json`` says
    ``interrupted``, and the images still in the actors are done again by a rerun.
    The driver runs the plain lifecycle (:func:`fgcli.dump.run.run`) on the CPU with
    :class:`RayCompute` as its compute step."""
    with stop_signals():  # shared by run(): Ray's start and shutdown are inside it too
        ray = _import_ray()
        _quiet_ray(cfg)
        compute = RayCompute(cfg, reporter, ray)
        with _ray_notices_to(reporter, cfg.debug):
            # the driver only checks the model and writes
            return run(replace(cfg, device="cpu"), reporter, sys.stdin, compute=compute)


class RayCompute(Compute):
    """The driver's compute step: the images left to do through Ray Data, their records
    appended as they come back; Ray joined (or started, then stopped) for the run."""

    def __init__(self, cfg: RunConfig, reporter: Reporter, ray: Any) -> None:
        self.cfg, self.reporter, self.ray = cfg, reporter, ray
        self.cwd = os.getcwd()
        self.owned = False  # this run started Ray (and stops it)
        self.how: Plan | None = None

    def prepared(self, dump: Dump) -> None:
        if _explicit_address(self.cfg) is not None:  # a wrong address fails before any line
            self.owned = connect(self.cfg)
            dump.stop.reclaim()  # ray.init installs its own SIGTERM handler

    def started(self, dump: Dump, info: dict[str, Any]) -> dict[str, Any]:
        return {**info, "device": "ray", "workers": 0}

    def execute(self, dump: Dump) -> None:
        items = _todo(dump)
        if items and not dump.ledger.halting():  # else Ray is not needed
            if not self.ray.is_initialized():
                self.owned = connect(self.cfg)
                dump.stop.reclaim()
            self.how = _compute(dump, items, self.cfg, self.cwd, self.reporter)
        how = self.how
        dump.report.device = how.device if how else dump.report.device
        dump.report.extra = {"engine": "ray", "actors": how.actors if how else 0}

    def describe(self, dump: Dump, info: dict[str, Any]) -> dict[str, Any]:
        """The Ray side of the run in run.json."""
        how = self.how
        info["engine"] = "ray"
        info["ray"] = {"actors": how.actors if how else 0,
                       "actor_device": how.device if how else None,
                       "actor_cpus": how.actor_cpus if how else None,
                       "actor_gpus": how.num_gpus if how else None,
                       "address": self.cfg.ray_address or os.environ.get("RAY_ADDRESS")
                       or "local"}
        if how is not None:
            info["device"] = how.device
            info["workers"] = 0
        return info

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


def _compute(dump: Dump, items: list[Item], cfg: RunConfig, cwd: str,
             reporter: Reporter) -> Plan:
    """The images left to do, through Ray; their records appended on the way."""
    import ray

    _configure_data_context(cfg)
    resources = ray.cluster_resources()
    how = plan(cfg, resources)
    gpus = int(resources.get("GPU", 0))
    if how.num_gpus and how.actors > gpus:
        reporter.warn(f"--ray-actors {how.actors} with {gpus} GPU(s) in the cluster: "
                      "Ray waits until that many GPUs are free")
    dump.session.batch_size = cfg.batch_size or (32 if how.device == "cuda" else 8)
    ds = build_dataset(dump.session, items, how, cwd)
    dropped = write_records(dump.ledger, _records(ds.iter_rows()))
    if dropped:
        reporter.warn(f"Ray delivered {dropped} record(s) twice (a retried batch); each "
                      "image is in the manifest once")
    return how
