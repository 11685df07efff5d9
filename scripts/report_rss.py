"""Peak memory of `fullgrad report` on a synthetic manifest of N lines.

    python scripts/report_rss.py 100000 1000000     # one tree and one fresh process each

Writes OUT/manifest.jsonl with N lines like a dump's with --boxes (stats and objects,
1,000 classes, no map files; 1 in 100 failed, 1 in 50 repeated by a later line as a
resumed dump leaves them), then runs ``write_report`` in a fresh Python process and
prints its peak RSS (``ru_maxrss``) next to the RSS after the imports alone, and its
wall and CPU time (the CPU time is the one to compare on a shared machine).
Results: docs/report.md.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASSES = 1000

MEASURE = """
import resource, sys, time
from fgcli.report import write_report
import fgcli.render, PIL.ImageDraw, numpy
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
cpu = time.process_time()
summary = write_report(sys.argv[1], top=50, grid=32)
seconds = time.perf_counter() - start
cpu = time.process_time() - cpu
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, peak, seconds, cpu, summary.records, summary.failed, summary.classes)
"""


def line(i: int, rng: random.Random, stamp: str) -> dict:
    """One manifest record (or a failed line, 1 in 100)."""
    key = f"set{i % 97:02d}/img_{i:08d}.jpg"
    if i % 100 == 99:
        return {"schema": 1, "input": key, "key": key, "status": "failed", "rank": None,
                "error": "corrupt image: synthetic", "outputs": {}, "time": stamp}
    target = rng.randrange(CLASSES)
    r = rng.random
    match = rng.choice(("class", "class", "any", "absent"))
    hit = match != "absent" and r() < 0.6
    return {
        "schema": 1, "input": key, "key": key, "settings": "0123456789abcdef",
        "status": "ok", "error": None, "rank": None, "target": target,
        "target_name": f"class {target:04d}", "logit": 10 + 20 * r(), "prob": r(),
        "residual": 1e-6 * r(), "seconds": 0.01, "outputs": {"heatmap": f"heatmaps/{key}.png"},
        "stats": {"peak_x": round(500 * r(), 1), "peak_y": round(375 * r(), 1),
                  "com_x": round(500 * r(), 2), "com_y": round(375 * r(), 2),
                  "concentration": round(r(), 6), "entropy": round(r(), 6),
                  "border": round(r() * 0.3, 6), "centre": round(r(), 6)},
        "objects": {"source": "boxes", "match": match, "boxes": 1, "hit": hit,
                    "energy": 0.0 if match == "absent" else round(r(), 6),
                    "box": 0 if hit else None, "label": None, "tolerance": 15.0},
        "time": stamp}


def write_tree(out: Path, n: int) -> float:
    """OUT/manifest.jsonl with n records (and the repeats); seconds taken."""
    start = time.perf_counter()
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(line(i, rng, "2026-01-01T00:00:00.000+00:00")) + "\n"
                      for i in range(n))
        # a resumed run's later lines for the same images
        fh.writelines(json.dumps(line(i, rng, "2026-01-02T00:00:00.000+00:00")) + "\n"
                      for i in range(0, n, 50))
    return time.perf_counter() - start


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [100_000, 1_000_000]
    src = str(Path(__file__).resolve().parent.parent / "src")
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="report-rss-") as tmp:
            out = Path(tmp) / "out"
            made = write_tree(out, n)
            size = (out / "manifest.jsonl").stat().st_size
            run = subprocess.run([sys.executable, "-c", MEASURE, str(out)], check=True,
                                 capture_output=True, text=True,
                                 env={"PYTHONPATH": src, "OMP_WAIT_POLICY": "PASSIVE",
                                      "PATH": "/usr/bin:/bin"})
            before, peak, seconds, cpu, records, failed, classes = run.stdout.split()
            print(f"{n} records ({size / 1e6:.0f} MB manifest, written in {made:.0f} s): "
                  f"report {float(seconds):.1f} s ({float(cpu):.1f} s CPU), peak RSS {int(peak) / 1024:.0f} MiB "
                  f"(after imports {int(before) / 1024:.0f} MiB); {records} records, "
                  f"{failed} failed, {classes} classes", flush=True)


if __name__ == "__main__":
    main()
