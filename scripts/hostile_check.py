"""Try fgcli as a hostile or careless user would, and print one table row per case.

Each case builds its own inputs under a scratch folder, runs the real ``fullgrad`` command
(a subprocess, so exit codes and stderr are the user's) and checks the promises a cron job
relies on: one line on stderr, the documented exit code, no partial file in the tree, a
manifest that parses as strict JSON, every image done once, and a rerun that finishes.

    python scripts/hostile_check.py [--only 1,3b] [--keep DIR]

Issue #17's closing note has the before/after table made with it. Case 2 mounts a 1 MiB
tmpfs (needs root; skipped otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "photos"
WEIGHTS = ROOT / "examples" / "weights" / "squeezenet1_1_imagenet.pth"
SQUEEZE = ["--model", "squeezenet1_1", "--weights", str(WEIGHTS), "--size", "64",
           "--workers", "0", "-q"]
MEDIA = (".png", ".jpg", ".npy", ".npz")


def fullgrad(args: list[str], cwd: Path, stdin: bytes | None = None, timeout: float = 300
             ) -> tuple[int, str, str]:
    """Run ``fullgrad ARGS``; (exit code, stdout, stderr) as text (raw bytes escaped)."""
    proc = subprocess.run([sys.executable, "-m", "fgcli", *args], cwd=cwd, input=stdin,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"),
                               "OMP_NUM_THREADS": "1"})
    return (proc.returncode, proc.stdout.decode("utf-8", "backslashreplace"),
            proc.stderr.decode("utf-8", "backslashreplace"))


def strict_lines(path: Path) -> tuple[int, str | None]:
    """(parsed lines, first problem): RFC 8259 JSON, valid UTF-8, no lone surrogates."""
    if not path.exists():
        return 0, "no manifest"
    count = 0
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            text = raw.decode("utf-8")
            rec = json.loads(text, parse_constant=_reject)
            json.dumps(rec).encode("utf-8", "strict")
            _no_surrogates(rec)
        except (ValueError, UnicodeError) as exc:
            return count, f"line {n}: {str(exc)[:60]}"
        count += 1
    return count, None


def _reject(token: str) -> None:
    raise ValueError(f"non-JSON token {token}")


def _no_surrogates(value: object) -> None:
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_surrogates(k)
            _no_surrogates(v)
    elif isinstance(value, list):
        for v in value:
            _no_surrogates(v)


def broken_files(out: Path) -> list[str]:
    """Output files that do not load whole."""
    import numpy as np
    from PIL import Image

    bad = []
    for p in out.rglob("*"):
        if not p.is_file() or p.suffix not in MEDIA or ".tmp" in p.parts:
            continue
        try:
            if p.suffix in (".png", ".jpg"):
                with Image.open(p) as im:
                    im.load()
            elif p.suffix == ".npy":
                np.load(p)
            else:
                with np.load(p) as z:
                    [z[k] for k in z.files]
        except Exception:  # noqa: BLE001 - any failure to load is a broken file
            bad.append(os.fsdecode(p.relative_to(out)))
    return bad


def first_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "(nothing on stderr)"
    more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
    return lines[0][:150] + more


def photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sorted(PHOTOS.iterdir())[:n]):
        shutil.copy(p, folder / p.name)
    return folder


def tree_state(out: Path, expect: int) -> str:
    lines, problem = strict_lines(out / "manifest.jsonl")
    bad = broken_files(out) if out.exists() else []
    parts = [f"{lines}/{expect} lines"]
    parts.append(f"manifest {'strict' if problem is None else 'NOT strict: ' + problem}")
    if bad:
        parts.append(f"broken files: {bad[:2]}")
    return ", ".join(parts)


# -- the cases --------------------------------------------------------------------------
def case_1(w: Path) -> str:
    imgs = photos(w / "imgs")
    shutil.copy(PHOTOS / "chelsea.png", os.fsencode(imgs) + b"/bad\xff.png")
    shutil.copy(PHOTOS / "coffee.png", imgs / "zz_after.png")
    code, _, err = fullgrad(["dump", "imgs", "-o", "out", *SQUEEZE, "--save", "heatmap"], w)
    code2, _, err2 = fullgrad(["dump", "imgs", "-o", "out", *SQUEEZE, "--save", "heatmap"], w)
    return (f"exit {code}: {first_line(err)}; {tree_state(w / 'out', 5)}; "
            f"rerun exit {code2}: {first_line(err2)}")


def case_1b(w: Path) -> str:
    imgs = photos(w / "imgs", 2)
    odd = os.fsencode(imgs) + b"/odd\x80\nname.png"
    shutil.copy(PHOTOS / "chelsea.png", odd)
    listing = b"\0".join([odd, os.fsencode(imgs / "astronaut.png")]) + b"\0"
    (w / "list").write_bytes(listing)
    code, _, err = fullgrad(["dump", "--files-from", "list", "-0", "-o", "out", *SQUEEZE,
                             "--save", "heatmap"], w)
    return f"exit {code}: {first_line(err)}; {tree_state(w / 'out', 2)}"


def case_2(w: Path) -> str:
    if os.geteuid() != 0:
        return "skipped (needs root to mount a tmpfs)"
    imgs = w / "imgs"
    imgs.mkdir()
    for i in range(12):
        shutil.copy(PHOTOS / "astronaut.png", imgs / f"a{i:02d}.png")
    out = w / "small"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], check=True)
    try:
        code, _, err = fullgrad(["dump", "imgs", "-o", "small/out", *SQUEEZE, "-b", "2",
                                 "--save", "heatmap,overlay,map"], w)
        state = tree_state(out / "out", 12)
        subprocess.run(["mount", "-o", "remount,size=16m", str(out)], check=True)  # space
        code2, _, err2 = fullgrad(["dump", "imgs", "-o", "small/out", *SQUEEZE, "-b", "2",
                                   "--save", "heatmap,overlay,map"], w)
        state2 = tree_state(out / "out", 12)
    finally:
        subprocess.run(["umount", str(out)], check=False)
    return (f"exit {code}: {first_line(err)}; {state}; after growing it to 16 MiB, "
            f"rerun: exit {code2}: {first_line(err2)}; {state2}")


def _nan_model(w: Path) -> None:
    (w / "nanmodel.py").write_text(
        "import torch\nfrom torch import nn\nINPUT_SIZE = 32\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 3)\n"
        "        self.fc = nn.Linear(4, 3)\n"
        "    def forward(self, x):\n"
        "        y = self.fc(self.conv(x).relu().mean((2, 3)))\n"
        "        odd = (torch.arange(len(x)) % 2 == 1)[:, None]\n"
        "        factor = torch.where(odd, torch.full_like(y, float('inf')), torch.ones_like(y))\n"
        "        return y * factor\n"
        "def build():\n    torch.manual_seed(0)\n    return M()\n")


def case_3(w: Path) -> str:
    photos(w / "imgs", 4)
    _nan_model(w)
    code, _, err = fullgrad(["dump", "imgs", "-o", "out", "--model", "nanmodel.py:build",
                             "--workers", "0", "-q", "--save", "map"], w)
    code2, _, err2 = fullgrad(["dump", "imgs", "-o", "out2", *SQUEEZE, "--std", "nan,1,1",
                               "--save", "map"], w)
    return (f"inf logits for every other image: exit {code}: {first_line(err)}; "
            f"{tree_state(w / 'out', 4)} | --std nan,1,1: exit {code2}: {first_line(err2)}; "
            f"{tree_state(w / 'out2', 4)}")


def case_4(w: Path) -> str:
    photos(w / "imgs", 1)
    (w / "exits.py").write_text("import sys\nsys.exit(0)\n")
    (w / "argp.py").write_text(
        "import argparse\np = argparse.ArgumentParser()\np.add_argument('--lr', required=True)\n"
        "p.parse_args()\n")
    rows = []
    for spec in ("exits.py:build", "argp.py:build"):
        code, out, err = fullgrad(["dump", "imgs", "-o", "o", "--model", spec], w)
        made = (w / "o").exists()
        rows.append(f"{spec}: exit {code}: {first_line(err + out)}; tree made: {made}")
    return " | ".join(rows)


def case_5(w: Path) -> str:
    photos(w / "imgs", 2)
    (w / "taken").write_text("a file\n")
    start = time.perf_counter()
    code, _, err = fullgrad(["eval", "imgs", *SQUEEZE[:4], "--size", "64", "--out", "taken",
                             "--methods", "fullgrad,random", "--metrics", "perturbation"], w)
    return f"exit {code} after {time.perf_counter() - start:.1f} s: {first_line(err)}"


def case_6(w: Path) -> str:
    photos(w / "imgs", 1)
    code, _, err = fullgrad(["dump", "imgs", "-o", "", *SQUEEZE], w)
    return f"exit {code}: {first_line(err)}; heatmaps/ in cwd: {(w / 'heatmaps').exists()}"


def case_7(w: Path) -> str:
    photos(w / "imgs", 1)
    names = [f"class{i}" for i in range(1000)]
    names[0] = "sky"
    rows = []
    for label, blob in (("BOM", b"\xef\xbb\xbf" + "\n".join(names).encode()),
                        ("UTF-16", "\n".join(names).encode("utf-16")),
                        ("Latin-1", ("caf\xe9\n" + "\n".join(names[1:])).encode("latin-1"))):
        (w / "labels.txt").write_bytes(blob)
        code, _, err = fullgrad(["dump", "imgs", "-o", f"o{label}", *SQUEEZE, "--labels",
                                 "labels.txt", "--target", "sky", "--save", "map"], w)
        rows.append(f"{label}: exit {code}: {first_line(err)}")
    return " | ".join(rows)


def case_8(w: Path) -> str:
    photos(w / "imgs", 2)
    fullgrad(["dump", "imgs", "-o", "out", *SQUEEZE, "--save", "heatmap"], w)
    man = w / "out" / "manifest.jsonl"
    lines = man.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["rank"] = "x"
    evil = json.loads(lines[1])
    evil["outputs"] = {"heatmap": "../../../../etc/passwd"}
    man.write_text("\n".join([json.dumps(rec), json.dumps(evil)]) + "\n")
    g, _, gerr = fullgrad(["gallery", "out"], w)
    leak = "etc/passwd" in "".join(p.read_text(errors="replace")
                                   for p in (w / "out" / "gallery").rglob("*.js")
                                   ) if (w / "out" / "gallery").exists() else False
    shutil.copytree(w / "out", w / "out2")
    (w / "out2" / "shards" / "0-of-2").mkdir(parents=True)
    shutil.copy(man, w / "out2" / "shards" / "0-of-2" / "manifest.jsonl")
    m, _, merr = fullgrad(["merge", "out2"], w)
    d, _, derr = fullgrad(["dump", "imgs", "-o", "out", *SQUEEZE, "--save", "heatmap"], w)
    g2, _, gerr2 = fullgrad(["gallery", "out"], w)
    return (f"gallery exit {g}: {first_line(gerr)}; outside path in gallery data: {leak} | "
            f"merge exit {m}: {first_line(merr)} | resumed dump exit {d}: {first_line(derr)}"
            f" | gallery again exit {g2}: {first_line(gerr2)}")


def _model_file(w: Path, name: str, forward: str, classes: str = "n") -> None:
    (w / name).write_text(
        "import torch\nfrom torch import nn\nINPUT_SIZE = 32\n"
        "class M(nn.Module):\n"
        "    def __init__(self, n):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 3)\n"
        f"        self.fc = nn.Linear(4, {classes})\n"
        "    def forward(self, x):\n"
        f"{forward}"
        "def build(n=3):\n    torch.manual_seed(0)\n    return M(n)\n")


def case_9(w: Path) -> str:
    photos(w / "imgs", 2)
    plain = "        return self.fc(self.conv(x).relu().mean((2, 3)))\n"
    _model_file(w, "plain.py", plain)
    _model_file(w, "inplace.py", "        x.mul_(2)\n" + plain)
    _model_file(w, "intlogits.py",
                "        return self.fc(self.conv(x).relu().mean((2, 3))).long()\n")
    rows = []
    for label, extra in (("zero classes", ["--model", "plain.py:build", "--model-arg", "n=0"]),
                         ("in-place input", ["--model", "inplace.py:build"]),
                         ("integer logits", ["--model", "intlogits.py:build"])):
        code, _, err = fullgrad(["dump", "imgs", "-o", f"o{len(rows)}", "--workers", "0", "-q",
                                 "--save", "map", *extra], w)
        rows.append(f"{label}: exit {code}: {first_line(err)}")
    return " | ".join(rows)


def case_10(w: Path) -> str:
    photos(w / "imgs", 1)
    code_py = ("import sys, fgcli.engine.saliency as s\n"
               "def boom(*a, **k):\n    raise RuntimeError('injected internal error')\n"
               "s.FullGrad.explain = boom\n"
               "from fgcli.cli import main\nsys.argv = ['fullgrad'] + sys.argv[1:]\nmain()\n")
    (w / "inject.py").write_text(code_py)
    rows = []
    for flag in ([], ["--debug"]):
        proc = subprocess.run([sys.executable, "inject.py", "dump", "imgs", "-o", "o", *SQUEEZE,
                               *flag], cwd=w, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        tb = "Traceback" in proc.stderr
        rows.append(f"{' '.join(flag) or 'plain'}: exit {proc.returncode}, traceback: {tb}")
    return " | ".join(rows)


def case_11(w: Path) -> str:
    imgs = w / "imgs"
    imgs.mkdir()
    for i in range(16):
        shutil.copy(PHOTOS / "astronaut.png", imgs / f"a{i:02d}.png")
    rows = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = f"o{int(sig)}"
        args = [sys.executable, "-m", "fgcli", "dump", "imgs", "-o", out, *SQUEEZE[:-3],
                "--workers", "1", "-b", "2", "-q", "--save", "heatmap,overlay,map"]
        proc = subprocess.Popen(args, cwd=w, stderr=subprocess.PIPE,  # SIGINT not ignored
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                                env={**os.environ, "PYTHONPATH": str(ROOT / "src"),
                                     "OMP_NUM_THREADS": "1"})
        man = w / out / "manifest.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and (not man.exists() or
                                          man.read_bytes().count(b"\n") < 4):
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        done = len(list((w / out / "maps").glob("*.npy")))
        lines, problem = strict_lines(man)
        run_json = json.loads((w / out / "run.json").read_text()) \
            if (w / out / "run.json").exists() else None
        interrupted = run_json.get("interrupted") if run_json else "no run.json"
        code2, _, _ = fullgrad(["dump", "imgs", "-o", out, *SQUEEZE, "-b", "2",
                                "--save", "heatmap,overlay,map", "--json"], w)
        rerun = [json.loads(x) for x in (w / out / "manifest.jsonl").read_text().splitlines()]
        recomputed = sum(1 for r in rerun if r["status"] == "ok") - (16 - done)
        rows.append(f"{sig.name}: exit {proc.returncode}: "
                    f"{first_line(err.decode(errors='replace'))}; {done} maps on disk, "
                    f"{lines} manifest lines, run.json interrupted={interrupted}; "
                    f"rerun exit {code2}, recomputed {max(recomputed, 0)} already whole")
    return " | ".join(rows)


def case_12(w: Path) -> str:
    photos(w / "imgs", 6)
    (w / "one").mkdir()
    (w / "one" / "notes.txt").write_text("not an image")
    e, _, eerr = fullgrad(["eval", "one/notes.txt", *SQUEEZE[:4], "--size", "64", "--out", "ev"], w)
    fullgrad(["dump", "imgs", "-o", "t", *SQUEEZE, "--shard", "0/2", "--save", "map"], w)
    fullgrad(["dump", "imgs", "-o", "t", *SQUEEZE, "--shard", "1/2", "--save", "map"], w)
    stale = w / "t" / "shards" / "1-of-3"
    stale.mkdir()
    shutil.copy(next((w / "t" / "shards").glob("*-of-2/manifest.jsonl")),
                stale / "manifest.jsonl")
    m, _, merr = fullgrad(["merge", "t"], w)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from fgcli.tree.writer import OutputTree; "
         "t = OutputTree('locked'); t.acquire(['holder']); print('held', flush=True); time.sleep(60)"],
        cwd=w, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    holder.stdout.readline()
    start = time.perf_counter()
    code, _, err = fullgrad(["dump", "imgs", "-o", "locked", "--model", "vgg16",
                             "--weights", "random", "-q"], w)
    took = time.perf_counter() - start
    holder.kill()
    return (f"eval on one non-image: exit {e}: {first_line(eerr)} | merge with a stale "
            f"1-of-3: exit {m}: {first_line(merr)} | locked --out (vgg16): exit {code} "
            f"after {took:.1f} s: {first_line(err)}")


CASES = {"1": case_1, "1b": case_1b, "2": case_2, "3": case_3, "4": case_4, "5": case_5,
         "6": case_6, "7": case_7, "8": case_8, "9": case_9, "10": case_10, "11": case_11,
         "12": case_12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--keep", help="keep the scratch folders here")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CASES)
    base = Path(args.keep or tempfile.mkdtemp(prefix="fgcli-hostile-"))
    print("| case | result |\n|---|---|")
    for name in names:
        work = base / f"case{name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            row = CASES[name](work)
        except Exception as exc:  # noqa: BLE001 - a case that breaks is a row too
            row = f"case broke: {type(exc).__name__}: {exc}"
        print(f"| {name} | {row} |", flush=True)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
