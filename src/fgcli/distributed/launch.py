"""Which engine runs a dump: one process, a ``--shard`` of one, torchrun ranks, or Ray.

The CLI calls :func:`run_dump`; everything below it is a
:class:`fgcli.dump.report.RunReport`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fgcli.config import RunConfig
from fgcli.dump.report import Reporter, RunReport
from fgcli.dump.run import run
from fgcli.errors import UsageError

# (failure-line prefix, leads: shows progress and the summary) -> a reporter
ReporterFactory = Callable[[str, bool], Reporter]


def run_dump(cfg: RunConfig, reporter_for: ReporterFactory, stdin: Any = None) -> RunReport:
    """Run the dump on its engine; with ``--gallery`` the process that leads (the only
    one, a shard, torchrun's rank 0 after the merge, Ray's driver) then builds the
    gallery: ``report.extra["gallery"]`` (a GalleryReport) or ``["gallery_error"]``
    (exit 1); a full disk while building it raises TreeWriteError (exit 2)."""
    from fgcli.distributed.torchrun import rank_env

    env = rank_env()
    leads = env is None or env.rank == 0
    if cfg.gallery and leads and "decomp" not in cfg.save:
        reporter_for("", True).warn(
            "--gallery without decomp in --save: the detail view will have no "
            "decomposition chart (--save heatmap,overlay,map,decomp)")
    report = _engine(cfg, reporter_for, stdin, env)
    if cfg.gallery and leads and not report.interrupted:
        from fgcli.gallery import GalleryError, build_gallery
        from fgcli.tree.atomic import DiskFullError, TreeWriteError

        try:
            report.extra["gallery"] = build_gallery(cfg.out)
        except DiskFullError as exc:  # exit 2, one line (the summary is already out)
            raise TreeWriteError(f"{exc}; the gallery is incomplete, the dump's results "
                                 "are whole and kept", exc.path) from exc
        except (GalleryError, OSError) as exc:  # the dump's results stand: exit 1
            report.extra["gallery_error"] = str(exc)
    return report


def _engine(cfg: RunConfig, reporter_for: ReporterFactory, stdin: Any, env: Any
            ) -> RunReport:
    if cfg.ray_address is not None and not cfg.ray:
        raise UsageError("--ray-address needs --ray")
    if cfg.ray:
        if env is not None:
            raise UsageError("--ray runs its own workers: do not start it under torchrun")
        if cfg.shard:
            raise UsageError("--ray and --shard exclude each other (Ray spreads the images)")
        if cfg.device_jpeg:
            raise UsageError("--device-jpeg is not used with --ray: Ray tasks decode with "
                             "Pillow")
        from fgcli.distributed.ray_data import run_ray

        return run_ray(cfg, reporter_for("", True))
    if env is not None:
        if cfg.shard:
            raise UsageError("--shard: under torchrun each rank takes shard RANK/WORLD_SIZE; "
                             "drop --shard")
        from fgcli.distributed.torchrun import run_rank

        return run_rank(cfg, env, reporter_for)
    return run(cfg, reporter_for(f"shard {cfg.shard}: " if cfg.shard else "", True), stdin)
