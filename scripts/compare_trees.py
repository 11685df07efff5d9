"""Do two fgcli output trees hold the same results?

Same files (heatmaps, overlays, maps, decomp), the same manifest records apart from the
fields that time a run (`seconds`, `time`) and line order, scores (`logit`, `prob`,
`residual`) within 1e-4 * max(1, |logit|), and `.npy` maps within 1e-5 of each map's
largest magnitude (batches composed differently change the last float bits).

Compare runs made with the same number of compute threads per process: another thread
count changes the order of float sums inside convolutions, which can flip near-tied ReLU
and max-pool decisions (seen: 6 of 64 squeezenet maps differing by up to 4.7e-3 of their
max between 1 and 2 threads, with equal completeness residuals).

    python scripts/compare_trees.py OUT_A OUT_B      # exit 0: same; 1: differences listed
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SKIP = {"manifest.jsonl", "run.json", ".fullgrad.lock"}
TIMING = ("seconds", "time")
FLOATS = ("logit", "prob", "residual")


def _records(root: Path) -> dict[tuple[str, object], dict]:
    out: dict[tuple[str, object], dict] = {}
    if not (root / "manifest.jsonl").is_file():
        raise SystemExit(f"{root}: no manifest.jsonl (unmerged shards? run `fullgrad merge`)")
    for line in (root / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        key = (rec["key"], rec.get("rank"))
        if key in out:
            raise SystemExit(f"{root}: {key} appears twice in the manifest")
        out[key] = rec
    return out


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.name not in SKIP and ".tmp" not in p.parts
            and "shards" not in p.parts}


def compare(a: Path, b: Path) -> list[str]:
    problems: list[str] = []
    fa, fb = _files(a), _files(b)
    problems += [f"only in {a}: {f}" for f in sorted(fa - fb)]
    problems += [f"only in {b}: {f}" for f in sorted(fb - fa)]
    ra, rb = _records(a), _records(b)
    problems += [f"manifest: only in {a}: {k}" for k in sorted(set(ra) - set(rb), key=str)]
    problems += [f"manifest: only in {b}: {k}" for k in sorted(set(rb) - set(ra), key=str)]
    for key in sorted(set(ra) & set(rb), key=str):
        x = {k: v for k, v in ra[key].items() if k not in TIMING}
        y = {k: v for k, v in rb[key].items() if k not in TIMING}
        scale = max(1.0, abs(x.get("logit") or 0.0))
        for name in FLOATS:
            u, v = x.pop(name, None), y.pop(name, None)
            if (u is None) != (v is None) or (u is not None and abs(u - v) > 1e-4 * scale):
                problems.append(f"{key}: {name} {u} vs {v}")
        if x != y:
            diff = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            problems.append(f"{key}: fields differ: {', '.join(diff)}")
    for name in sorted(f for f in fa & fb if f.endswith(".npy")):
        m, n = np.load(a / name), np.load(b / name)
        bound = 1e-5 * max(1.0, float(np.abs(m).max()))
        if m.shape != n.shape or float(np.abs(m - n).max()) > bound:
            problems.append(f"{name}: maps differ beyond float rounding")
    return problems


def main() -> int:
    if len(sys.argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    problems = compare(a, b)
    for line in problems:
        sys.stdout.write(line + "\n")
    n = len(_records(a))
    sys.stdout.write(f"{'same' if not problems else 'DIFFERENT'}: {a} vs {b} "
                     f"({n} manifest lines, {len(_files(a))} files)\n")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
