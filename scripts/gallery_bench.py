"""How the static gallery (``fgcli.gallery``) scales: build time, sizes, and the page in
headless Chromium, on a synthetic output tree of ``--images`` images.

The tree is made without a model: the 6 overlays and heatmaps of one real dump of
``examples/photos`` (run once into ``--cache``) are copied to N images under ~100
folders (``class_017/img_00042.jpg`` keys), with manifest lines in the real schema
(seeded random classes over the 1000 ImageNet names, prob, logit, residual; ~0.5 %
failed lines with a real error string and no outputs; 1 image in 100 also has the real
``decomp/*.npz``, and its record the real numbers that go with it), a run.json adapted
from the real one, and the inputs as hard links to the example photos (so the detail
view finds an original, as it would after a real dump). With ``--audit`` the ok records
also carry the map statistics (``stats``) and, 3 in 4, a pointing game (``objects``), as
a dump with ``--boxes`` writes them (values drawn from a second seeded generator, so the
tree is otherwise the same), and the interactions add a sort and a range filter by a
statistic.

Measured:

* ``build_gallery(out)`` in a fresh Python process, cold (no thumbs/, gallery/ or
  index.html) and warm (a rebuild: every thumbnail kept), ``--runs`` times each: seconds,
  peak RSS, files written; the sizes of data.js, records/ and thumbs/ (du);
* ``file://OUT/index.html`` in headless Chromium 1400x1000, a fresh browser per run:
  ``window.fgcliTiming`` (ms since app.js started) and the same events from navigation
  start (app.js starts at ``fgcliTiming.script``), DOMContentLoaded and load; JS heap
  (CDP ``Performance.getMetrics``, before and after a forced GC, and
  ``performance.memory``), DOM nodes, and the PSS of all the browser's processes (the
  chromedriver's process tree, from /proc/<pid>/smaps_rollup) after the first page;
* interactions, timed in the page: ``performance.now()`` around dispatching the event
  (the handler runs synchronously: "js") and until the frame after it ("frame": style,
  layout and paint of the new cards); opening a detail view is timed until its record
  chunk has loaded and the decomposition chart is in the DOM.

Prints a Markdown table of medians and ranges and writes it into ``--doc`` (a section
per image count, replaced on a rerun). The source files have just been written, so
they are in the page cache: the cold build measures decoding and encoding, not a cold
disk.

    OMP_WAIT_POLICY=PASSIVE python scripts/gallery_bench.py --images 20000 --runs 3
    OMP_WAIT_POLICY=PASSIVE python scripts/gallery_bench.py --images 100000 --runs 1
    OMP_WAIT_POLICY=PASSIVE python scripts/gallery_bench.py --images 20000 --runs 1 --audit
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "photos"
WEIGHTS = ROOT / "examples" / "weights" / "squeezenet1_1_imagenet.pth"
FOLDERS = 100
FAIL_RATE = 0.005
DECOMP_EVERY = 100
ERRORS = ("not an image Pillow can read", "empty file (0 bytes)",
          "corrupt image: image file is truncated (37 bytes not processed)",
          ("decompression bomb: 30000x20000 pixels is over the --max-pixels limit of "
           "178956970"))
SEARCH = "img_0123"  # matches 10 keys in 20,000 (img_01230 .. img_01239)


# ---------------------------------------------------------------------------- the tree
def real_dump(cache: Path) -> Path:
    """A real dump of examples/photos (heatmap, overlay, decomp), made once."""
    out = cache / "real"
    if (out / "run.json").is_file() and (out / "manifest.jsonl").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("fullgrad")), "dump", str(PHOTOS),
           "-m", "squeezenet1_1", "--weights", str(WEIGHTS), "--out", str(out),
           "--save", "heatmap,overlay,decomp"]
    print("real dump:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return out


def class_names(cache: Path) -> list[str]:
    """The 1000 ImageNet class names (from torchvision's weights metadata, read in a
    child process so that this one stays small while the browser runs)."""
    path = cache / "classes.json"
    if not path.is_file():
        code = ("import json, torchvision; print(json.dumps(torchvision.models."
                "SqueezeNet1_1_Weights.IMAGENET1K_V1.meta['categories']))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=False)
        names = json.loads(proc.stdout) if proc.returncode == 0 else []
        if len(names) != 1000:
            names = [f"class {i}" for i in range(1000)]
        path.write_text(json.dumps(names), encoding="utf-8")
    return json.loads(path.read_text(encoding="utf-8"))


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        os.symlink(src, dest)


def audit_fields(rng: random.Random, names: list[str]) -> dict[str, Any]:
    """A record's ``stats`` and (3 in 4) ``objects`` as the dump writes them: a 500x375
    image seen at 224x224, 6 significant digits."""
    def six(x: float) -> float:
        return float(f"{x:.6g}")

    w, h = 500, 375
    stats = {"peak_x": six((rng.randrange(224) + 0.5) * w / 224),
             "peak_y": six((rng.randrange(224) + 0.5) * h / 224),
             "com_x": six(rng.uniform(0.2, 0.8) * w), "com_y": six(rng.uniform(0.2, 0.8) * h),
             "concentration": six(rng.uniform(0.02, 0.4)), "entropy": six(rng.uniform(0.5, 1)),
             "border": six(rng.betavariate(2, 8)), "centre": six(rng.betavariate(5, 3))}
    out: dict[str, Any] = {"stats": stats}
    if rng.random() < 0.75:
        hit = rng.random() < 0.6
        out["objects"] = {"source": "boxes", "match": "class", "boxes": rng.randrange(1, 4),
                          "hit": hit, "energy": six(rng.random()), "box": 0 if hit else None,
                          "label": rng.choice(names) if hit else None, "tolerance": 15.0}
    return out


def build_tree(out: Path, n: int, cache: Path, seed: int = 0,
               audit: bool = False) -> dict[str, Any]:
    """Write the synthetic tree of ``n`` images to ``out`` (replacing it) and its inputs
    to ``out.photos``; returns counts. ``audit``: records with statistics and objects."""
    real = cache / "real"
    records = [json.loads(line) for line in
               (real / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if line]
    records.sort(key=lambda r: r["key"])
    blobs = [{kind: (real / rec["outputs"][kind]).read_bytes()
              for kind in ("overlay", "heatmap")} for rec in records]
    npz = [real / rec["outputs"]["decomp"] for rec in records]
    originals = [Path(rec["input"]).resolve() if os.path.isabs(rec["input"])
                 else (ROOT / rec["input"]).resolve() for rec in records]
    run = json.loads((real / "run.json").read_text(encoding="utf-8"))
    names = class_names(cache)
    rng = random.Random(seed)
    audit_rng = random.Random(seed + 1)  # the rest of the tree stays the same

    inputs = Path(str(out) + ".photos")
    for path in (out, inputs):
        shutil.rmtree(path, ignore_errors=True)
    out.mkdir(parents=True)
    per_folder = math.ceil(n / FOLDERS)
    width = max(5, len(str(n - 1)))
    folder_class = [rng.randrange(1000) for _ in range(FOLDERS)]
    start = datetime.datetime(2026, 11, 27, 9, 0, 0, tzinfo=datetime.timezone.utc)
    counts = {"ok": 0, "failed": 0, "skipped": 0, "decomp": 0}
    made_dirs: set[str] = set()
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as manifest:
        for i in range(n):
            folder = f"class_{i // per_folder:03d}"
            key = f"{folder}/img_{i:0{width}d}.jpg"
            src = rng.randrange(len(records))
            if folder not in made_dirs:
                made_dirs.add(folder)
                for sub in ("overlays", "heatmaps", "decomp"):
                    (out / sub / folder).mkdir(parents=True, exist_ok=True)
                (inputs / folder).mkdir(parents=True, exist_ok=True)
            photo = inputs / key
            _link(originals[src], photo)
            stamp = (start + datetime.timedelta(milliseconds=50 * i + rng.randrange(40)))
            rec: dict[str, Any] = {"schema": 1, "input": str(photo), "key": key,
                                   "settings": run.get("settings")}
            if rng.random() < FAIL_RATE:
                rec.update(status="failed", error=rng.choice(ERRORS), outputs={}, rank=None)
                counts["failed"] += 1
            else:
                decomp = i % DECOMP_EVERY == 0
                if decomp:  # the real numbers that go with the real npz
                    base = records[src]
                    target, logit, prob, residual = (base["target"], base["logit"],
                                                     base["prob"], base["residual"])
                else:
                    hit = rng.random() < 0.7
                    target = folder_class[i // per_folder] if hit else rng.randrange(1000)
                    prob = rng.betavariate(5, 2) if hit else rng.betavariate(1.5, 5)
                    logit = 8 + 25 * prob + rng.gauss(0, 3)
                    residual = rng.gauss(0, 1) * 10 ** rng.uniform(-7, -5)
                outputs = {"heatmap": f"heatmaps/{key}.png", "overlay": f"overlays/{key}.jpg"}
                for kind, rel in outputs.items():
                    (out / rel).write_bytes(blobs[src][kind])
                if decomp:
                    outputs["decomp"] = f"decomp/{key}.npz"
                    shutil.copyfile(npz[src], out / outputs["decomp"])
                    counts["decomp"] += 1
                rec.update(status="ok", error=None, rank=None, target=target,
                           target_name=names[target], logit=logit, prob=prob,
                           residual=residual, seconds=round(rng.uniform(0.08, 0.3), 6),
                           outputs=outputs)
                if audit:
                    rec.update(audit_fields(audit_rng, names))
                counts["ok"] += 1
            rec["time"] = stamp.isoformat(timespec="milliseconds")
            manifest.write(json.dumps(rec, ensure_ascii=False) + "\n")
    for sub in ("decomp",):  # folders that got no file
        for d in (out / sub).iterdir():
            if not any(d.iterdir()):
                d.rmdir()
    run["command"] = ["fullgrad", "dump", str(inputs), "-m", run.get("model", "squeezenet1_1"),
                      "--weights", str(WEIGHTS), "--out", str(out), "--save",
                      "heatmap,overlay"]
    run["save"] = ["heatmap", "overlay"]
    end = start + datetime.timedelta(milliseconds=50 * n)
    run["started"] = start.strftime("%Y-%m-%dT%H:%M:%S%z")
    run["finished"] = end.strftime("%Y-%m-%dT%H:%M:%S%z")
    run["seconds"] = 0.05 * n
    run["counts"] = {k: counts[k] for k in ("ok", "failed", "skipped")}
    run["synthetic"] = (f"gallery_bench.py: {n} images copied from a real dump of "
                        f"examples/photos; decomp for 1 in {DECOMP_EVERY}"
                        + ("; with statistics and objects" if audit else ""))
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    return counts


# ----------------------------------------------------------------------------- build
BUILD = r"""
import json, re, sys, time
from fgcli.gallery import build_gallery
t = time.perf_counter()
r = build_gallery(sys.argv[1])
wall = time.perf_counter() - t
# VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork and exec
hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"seconds": wall, "images": r.images, "maps": r.maps, "failed": r.failed,
                  "made": r.thumbs.made, "kept": r.thumbs.kept,
                  "thumb_failed": len(r.thumbs.failed), "decomp_read": r.decomp_read,
                  "maxrss_mb": hwm / 1024}))
"""


def files_since(root: Path, since_ns: int) -> int:
    count = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.stat(follow_symlinks=False).st_mtime_ns >= since_ns:
                    count += 1
    return count


def du_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) * 1024


def time_build(out: Path, cold: bool) -> dict[str, Any]:
    if cold:
        for name in ("thumbs", "gallery"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "index.html").unlink(missing_ok=True)
    since = time.time_ns()  # the kernel's coarse file clock is a tick behind, never ahead
    time.sleep(0.05)
    wall = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", BUILD, str(out)], capture_output=True,
                          text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                          check=False)
    wall = time.perf_counter() - wall
    if proc.returncode:
        raise SystemExit(f"build_gallery failed:\n{proc.stderr}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_seconds"] = wall
    res["files_written"] = files_since(out, since)
    return res


# --------------------------------------------------------------------------- browser
def chromium_version() -> str:
    try:
        out = subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True,
                             text=True, timeout=30, check=False).stdout
        m = re.search(r"Chromium [\d.]+", out)
        return m.group(0) if m else out.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def process_tree(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(parents.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def memory_kb(pid: int) -> tuple[int, str]:
    """PSS of a process in kB (RSS when smaps_rollup cannot be read)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]), "pss"
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]), "rss"
    except OSError:
        pass
    return 0, "none"


# An interaction's latency: from dispatching the event until the grid's children were
# replaced ("dom": the page filters and renders in a timer task, search after a pause in
# typing) and until the frame after that ("frame": style, layout and paint of the cards).
MEASURE = r"""
const done = arguments[arguments.length - 1];
const $ = (s) => document.querySelector(s);
const grid = $('#grid');
let t0 = 0, handler = 0, dom = null;
const result = (timedOut) => ({
  handler, dom, frame: timedOut ? null : performance.now() - t0,
  cards: document.querySelectorAll('.card').length,
  first: ($('.card') || {dataset: {}}).dataset.key || null,
  status: $('#status-line').textContent});
const timer = setTimeout(() => { obs.disconnect(); done(result(true)); }, %d);
const obs = new MutationObserver(() => {
  if (dom !== null) return;
  dom = performance.now() - t0;
  obs.disconnect();
  clearTimeout(timer);
  requestAnimationFrame(() => setTimeout(() => done(result(false)), 0));
});
obs.observe(grid, {childList: true});
t0 = performance.now();
%s
handler = performance.now() - t0;
"""

SET = ("const e = $('%s'); e.value = %s; "
       "e.dispatchEvent(new Event('%s', {bubbles: true}));")

# Typing SEARCH one character every GAP ms: the slowest keystroke's handler, how many
# times the grid was rebuilt, and the latency from the last keystroke to the grid and to
# the frame after it.
TYPE = r"""
const done = arguments[arguments.length - 1];
const box = document.querySelector('#search');
const grid = document.querySelector('#grid');
const text = %s, gap = %d;
const per = [];
let updates = 0, last = null;
const obs = new MutationObserver(() => {
  updates++;
  if (last === null || box.value !== text) return;
  const dom = performance.now() - last;
  obs.disconnect();
  requestAnimationFrame(() => setTimeout(() => done({
    max: Math.max(...per), updates, dom, frame: performance.now() - last,
    status: document.querySelector('#status-line').textContent}), 0));
});
obs.observe(grid, {childList: true});
const key = (k) => {
  box.value = text.slice(0, k);
  const t = performance.now();
  box.dispatchEvent(new Event('input', {bubbles: true}));
  per.push(performance.now() - t);
  if (k < text.length) setTimeout(() => key(k + 1), gap);
  else last = t;
};
key(1);
"""
TYPE_GAP = 80  # ms between keystrokes: a fast typist

DETAIL = r"""
const done = arguments[arguments.length - 1];
const card = document.querySelector('.card');
const t0 = performance.now();
card.click();
const t1 = performance.now();
const finished = () => {
  const rec = document.querySelector('#detail-record');
  return rec && rec.textContent !== 'loading…';
};
const end = () => requestAnimationFrame(() => setTimeout(() => done({
  js: t1 - t0, frame: performance.now() - t0, key: card.dataset.key,
  chart: !!document.querySelector('#decomp-chart'),
  open: !document.querySelector('#detail').hidden}), 0));
if (finished()) end();
else {
  const obs = new MutationObserver(() => { if (finished()) { obs.disconnect(); end(); } });
  obs.observe(document.querySelector('#detail-body'), {subtree: true, childList: true,
                                                        characterData: true});
}
"""

RESET = r"""
const done = arguments[arguments.length - 1];
const $ = (s) => document.querySelector(s);
if (!$('#detail').hidden) $('#detail-close').click();
$('#search').value = ''; $('#class-filter').value = ''; $('#status-filter').value = '';
for (const id of ['#range-stat', '#range-min', '#range-max', '#pointing-filter'])
  if ($(id)) $(id).value = '';
$('#sort').value = 'path'; $('#descending').checked = false; $('#page-size').value = '100';
const finish = () => requestAnimationFrame(() => setTimeout(() => done(
  document.querySelectorAll('.card').length), 0));
const timer = setTimeout(finish, 10000);
const obs = new MutationObserver(() => { obs.disconnect(); clearTimeout(timer); finish(); });
obs.observe($('#grid'), {childList: true});
$('#sort').dispatchEvent(new Event('change', {bubbles: true}));
"""


def wait_js(driver: Any, expr: str, timeout: float) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return {expr};")
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {expr}")
        time.sleep(0.01)


def browser_run(index: Path, timeout: float, audit: bool = False) -> dict[str, Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--enable-precise-memory-info"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    r: dict[str, Any] = {}
    try:
        driver.set_script_timeout(timeout)
        driver.set_page_load_timeout(timeout)
        pids = process_tree(driver.service.process.pid)
        r["browser_kb_blank"] = sum(memory_kb(p)[0] for p in pids)  # before the page
        t = time.perf_counter()
        driver.get(index.resolve().as_uri())  # returns after the load event
        r["wall_get"] = (time.perf_counter() - t) * 1000
        wait_js(driver, "document.body && document.body.dataset.ready === '1'", timeout)
        r["wall_ready"] = (time.perf_counter() - t) * 1000
        wait_js(driver, "window.fgcliTiming && window.fgcliTiming.thumbs !== undefined",
                timeout)
        r["wall_thumbs"] = (time.perf_counter() - t) * 1000
        timing = driver.execute_script("return window.fgcliTiming;")
        nav = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "return n ? n.toJSON() : null;") or {}
        for k in ("data", "grid", "thumbs"):
            r[k] = timing[k]
            r["nav_" + k] = timing["script"] + timing[k]
        r["nav_script"] = timing["script"]
        r["nav_dcl"] = nav.get("domContentLoadedEventEnd")
        r["nav_load"] = nav.get("loadEventEnd")
        r["viewport"] = driver.execute_script("return [innerWidth, innerHeight];")
        r["cards"] = driver.execute_script("return document.querySelectorAll('.card').length;")
        r["dom_nodes"] = driver.execute_script(
            "return document.getElementsByTagName('*').length;")
        r["perf_memory"] = driver.execute_script(
            "return performance.memory ? performance.memory.usedJSHeapSize : null;")
        driver.execute_cdp_cmd("Performance.enable", {})
        metrics = {m["name"]: m["value"] for m in
                   driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]}
        r["heap"] = metrics.get("JSHeapUsedSize")
        r["heap_total"] = metrics.get("JSHeapTotalSize")
        pids = process_tree(driver.service.process.pid)
        mem = [memory_kb(p) for p in pids]
        r["browser_kb"] = sum(kb for kb, _ in mem)
        r["browser_procs"] = len(pids)
        r["browser_mem_kind"] = "pss" if all(k == "pss" for _, k in mem) else "mixed/rss"
        driver.execute_cdp_cmd("HeapProfiler.enable", {})
        driver.execute_cdp_cmd("HeapProfiler.collectGarbage", {})
        metrics = {m["name"]: m["value"] for m in
                   driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]}
        r["heap_gc"] = metrics.get("JSHeapUsedSize")

        # interactions: each from the default view (path order, no filter), reset after
        first_option = driver.execute_script(
            "const o = document.querySelector('#class-filter').options;"
            "let best = null, n = -1;"
            "for (const x of o) { const m = /\\((\\d+)\\)$/.exec(x.text);"
            "  if (m && +m[1] > n) { n = +m[1]; best = x.value; } }"
            "return [best, n, o.length - 1];")
        r["class_option"] = first_option
        actions = {
            "sort_prob": SET % ("#sort", "'prob'", "change"),
            "sort_prob_desc": (SET % ("#sort", "'prob'", "change")).replace(
                "e.value = 'prob';", "e.value = 'prob'; $('#descending').checked = true;"),
            "sort_residual": SET % ("#sort", "'residual'", "change"),
            "filter_class": SET % ("#class-filter", json.dumps(first_option[0]), "change"),
            "filter_failed": SET % ("#status-filter", "'failed'", "change"),
            "search": SET % ("#search", json.dumps(SEARCH), "input"),
            "next_page": "$('#pager-top .next').click();",
            "page_size_500": SET % ("#page-size", "'500'", "change"),
        }
        if audit:  # border: the 7th statistic; 0.1-0.2 holds about a third of the images
            actions["sort_border_desc"] = (SET % ("#sort", "'stat:6'", "change")).replace(
                "e.value = 'stat:6';", "e.value = 'stat:6'; $('#descending').checked = true;")
            actions["range_border"] = (SET % ("#range-stat", "'stat:6'", "change")).replace(
                "e.value = 'stat:6';",
                "e.value = 'stat:6'; $('#range-min').value = '0.1'; "
                "$('#range-max').value = '0.2';")
            actions["filter_miss"] = SET % ("#pointing-filter", "'miss'", "change")
        for name, code in actions.items():
            driver.execute_async_script(RESET)
            time.sleep(0.3)  # the reset's own render, and its thumbnails start loading
            res = driver.execute_async_script(MEASURE % (int(timeout * 900), code))
            r[name] = res["dom"]
            r[name + "_handler"] = res["handler"]
            r[name + "_frame"] = res["frame"]
            r[name + "_cards"] = res["cards"]
            r[name + "_status"] = res["status"]
        driver.execute_async_script(RESET)
        time.sleep(0.3)
        res = driver.execute_async_script(TYPE % (json.dumps(SEARCH), TYPE_GAP))
        r["type_search_max"] = res["max"]
        r["type_search_updates"] = res["updates"]
        r["type_search"] = res["dom"]
        r["type_search_frame"] = res["frame"]
        r["type_search_status"] = res["status"]
        driver.execute_async_script(RESET)
        time.sleep(0.3)
        driver.execute_async_script(RESET)
        res = driver.execute_async_script(DETAIL)
        r["detail"] = res["js"]
        r["detail_frame"] = res["frame"]
        r["detail_chart"] = res["chart"]
        r["detail_open"] = res["open"]
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        r["console_errors"] = [e.get("message", "")[:300] for e in errors]
    finally:
        driver.quit()
    return r


# ---------------------------------------------------------------------------- report
def gallery_version() -> str:
    """The last commit that changed src/fgcli/gallery (HEAD too when that is later), and
    whether the working tree's src/fgcli/gallery differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True, check=True).stdout.strip()
    try:
        code = git("log", "-1", "--format=%h %s", "--", "src/fgcli/gallery")
        head = git("log", "-1", "--format=%h")
        dirty = git("status", "--porcelain", "--", "src/fgcli/gallery")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if len(code) > 90:  # a long subject: cut at a word, marked
        code = code[:90].rsplit(" ", 1)[0].rstrip(",;:") + " …"
    if head and not code.startswith(head):
        code += f" (HEAD {head})"
    return code + (" (src/fgcli/gallery modified)" if dirty else "")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 1024 ** 2:.0f} GB RAM"
    except (OSError, AttributeError):
        pass
    return (f"{cpu}, {cores} cores{mem}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; {chromium_version()}")


def stat(values: list[Any], fmt: str) -> tuple[str, str]:
    vals = [v for v in values if isinstance(v, (int, float))]
    if not vals:
        return "–", ""
    med = statistics.median(vals)
    rng = f"{fmt.format(min(vals))} – {fmt.format(max(vals))}" if len(vals) > 1 else ""
    return fmt.format(med), rng


def table(rows: list[tuple[str, list[Any], str]]) -> list[str]:
    lines = ["| measure | median | range (min – max) |", "| --- | ---: | ---: |"]
    for label, values, fmt in rows:
        med, rng = stat(values, fmt)
        lines.append(f"| {label} | {med} | {rng} |")
    return lines


def report(n: int, runs: int, command: str, version: str, tree: dict[str, Any],
           cold: list[dict], warm: list[dict], sizes: dict[str, Any], pages: list[dict]) -> str:
    mb = 1024 ** 2
    first = pages[0] if pages else {}
    out = [f"## {n:,} images", "",
           f"Machine: {machine()}.", "",
           f"Command: `{command}`", "",
           f"Gallery code: commit {version}.", "",
           (f"Synthetic tree: {tree['ok']:,} ok, {tree['failed']:,} failed "
            f"({tree['decomp']:,} with decomp/*.npz), {FOLDERS} folders; built in "
            f"{tree['seconds']:.1f} s (not measured below). "
            + (f"{runs} runs each: median and range." if runs > 1 else
               "One run each (no range).")), ""]
    out.append("### build_gallery (a fresh Python process each; cold = no thumbs/, "
               "gallery/, index.html; warm = rebuild, every thumbnail kept)")
    out.append("")
    out += table([
        ("cold build, s", [c["seconds"] for c in cold], "{:.1f}"),
        ("cold: images/s", [n / c["seconds"] for c in cold], "{:.0f}"),
        ("cold: peak RSS, MB", [c["maxrss_mb"] for c in cold], "{:.0f}"),
        ("cold: files written", [c["files_written"] for c in cold], "{:,}"),
        ("cold: thumbnails made", [c["made"] for c in cold], "{:,}"),
        ("warm rebuild, s", [w["seconds"] for w in warm], "{:.2f}"),
        ("warm: peak RSS, MB", [w["maxrss_mb"] for w in warm], "{:.0f}"),
        ("warm: files written", [w["files_written"] for w in warm], "{:,}"),
        ("warm: thumbnails kept", [w["kept"] for w in warm], "{:,}"),
    ])
    out += ["", (f"Sizes: data.js {sizes['data_js'] / mb:.1f} MB "
             f"({sizes['data_js'] / n:.0f} bytes an image), gallery/records/ "
             f"{sizes['records'] / mb:.1f} MB in {sizes['record_files']} files, thumbs/ "
             f"{sizes['thumbs'] / mb:.0f} MB (du) in {sizes['thumb_files']:,} files, "
             f"index.html {sizes['index'] / 1024:.1f} kB; the tree's overlays+heatmaps "
             f"{sizes['sources'] / mb:,.0f} MB."), ""]
    if pages:
        out.append(f"### The page in headless Chromium (window 1400x1000, viewport "
                   f"{first['viewport'][0]}x"
                   f"{first['viewport'][1]}, a fresh browser each run; file://)")
        out.append("")

        def col(k: str) -> list[Any]:
            return [p.get(k) for p in pages]

        def mbs(k: str) -> list[Any]:
            return [p[k] / mb if p.get(k) else None for p in pages]

        out += table([
            ("fgcliTiming.data (data.js parsed), ms after app.js", col("data"), "{:.0f}"),
            ("fgcliTiming.grid (first page in the DOM), ms after app.js", col("grid"),
             "{:.0f}"),
            ("fgcliTiming.thumbs (12 thumbnails loaded), ms after app.js", col("thumbs"),
             "{:.0f}"),
            ("app.js starts, ms from navigation start", col("nav_script"), "{:.0f}"),
            ("data.js parsed, ms from navigation start", col("nav_data"), "{:.0f}"),
            ("first grid, ms from navigation start", col("nav_grid"), "{:.0f}"),
            ("DOMContentLoaded end, ms from navigation start", col("nav_dcl"), "{:.0f}"),
            ("load event end, ms from navigation start", col("nav_load"), "{:.0f}"),
            ("**first thumbnails, ms from navigation start**", col("nav_thumbs"), "{:.0f}"),
            ("wall: driver.get() until thumbs shown, ms", col("wall_thumbs"), "{:.0f}"),
            ("JS heap used (CDP JSHeapUsedSize), MB", mbs("heap"), "{:.1f}"),
            ("JS heap used after a forced GC, MB", mbs("heap_gc"), "{:.1f}"),
            ("performance.memory.usedJSHeapSize, MB", mbs("perf_memory"), "{:.1f}"),
            ("DOM elements", col("dom_nodes"), "{:,}"),
            ("cards on the page", col("cards"), "{:,}"),
            ((f"browser processes' memory ({first.get('browser_mem_kind', 'pss').upper()}, "
              f"{first.get('browser_procs', '?')} processes), MB"),
             [p["browser_kb"] / 1024 for p in pages], "{:.0f}"),
            ("the same, of the fresh browser before it opened the page, MB",
             [p["browser_kb_blank"] / 1024 for p in pages], "{:.0f}"),
        ])
        out += ["", ("### Interactions (ms, from dispatching the event; \"grid\": until the "
                 "grid's cards were replaced (the page filters and renders in a timer task; "
                 "search waits for a pause in typing); \"frame\": until the frame after "
                 "that, with style, layout and paint)"), ""]
        _, cls_n, n_classes = first["class_option"]
        inter = [
            ("sort by probability", "sort_prob"),
            ("sort by probability, descending", "sort_prob_desc"),
            ("sort by \\|residual\\|", "sort_residual"),
            (f"filter by a class (the largest: {cls_n:,} images of {n_classes:,} classes)",
             "filter_class"),
            ("filter status = failed", "filter_failed"),
            (f"search \"{SEARCH}\" (one input event)", "search"),
            ("next page", "next_page"),
            ("page size 500", "page_size_500"),
            ("sort by border, descending (--audit)", "sort_border_desc"),
            ("filter border in [0.1, 0.2] (--audit)", "range_border"),
            ("filter pointing = miss (--audit)", "filter_miss"),
        ]
        inter = [(label, key) for label, key in inter if first.get(key) is not None]
        rows = []
        for label, key in inter:
            rows.append((label + ": grid", col(key), "{:.0f}"))
            rows.append((label + ": frame", col(key + "_frame"), "{:.0f}"))
        rows += [
            (f"typing \"{SEARCH}\", a key every {TYPE_GAP} ms: last key to grid",
             col("type_search"), "{:.0f}"),
            (f"typing \"{SEARCH}\": last key to frame", col("type_search_frame"), "{:.0f}"),
            (f"typing \"{SEARCH}\": slowest keystroke's handler", col("type_search_max"),
             "{:.1f}"),
            (f"typing \"{SEARCH}\": grid rebuilds for {len(SEARCH)} keys",
             col("type_search_updates"), "{:.0f}"),
            (("open the detail view of the first card (loads a records chunk, draws the "
              "decomposition): until drawn"), col("detail_frame"), "{:.0f}"),
        ]
        out += table(rows)
        out += ["", "Results of the interactions (first run): " + "; ".join(
            f"{label.split(' (')[0]} → {first[key + '_status']}" for label, key in inter
            if key + "_status" in first) + f"; detail: decomposition chart shown = "
            f"{first['detail_chart']}.", ""]
        errors = sorted({e for p in pages for e in p.get("console_errors", [])})
        if errors:
            out += ["Console errors:", ""] + [f"* `{e}`" for e in errors] + [""]
    return "\n".join(out).rstrip() + "\n"


HEADER = """# Gallery benchmark

`scripts/gallery_bench.py`: how `fgcli.gallery.build_gallery` and the page it writes
scale with the number of images. The tree is synthetic (copies of the overlays and
heatmaps of a real dump of `examples/photos`, manifest lines in the real schema: see
the script's docstring); the build runs in a fresh process and the page in headless
Chromium opened from `file://`. Medians and ranges (min – max) over the runs; the
machine is shared and noisy.

"""


def write_doc(doc: Path, n: int, section: str) -> None:
    begin, end = f"<!-- bench:{n} -->", f"<!-- /bench:{n} -->"
    block = f"{begin}\n{section}{end}\n"
    text = doc.read_text(encoding="utf-8") if doc.is_file() else HEADER
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end) + 1:]
    else:
        # keep the sections in order of image count
        found = [(int(m.group(1)), m.start()) for m in re.finditer(r"<!-- bench:(\d+) -->",
                                                                    text)]
        later = [pos for count, pos in found if count > n]
        if not later:  # hand-written notes (a "## " heading after the sections) stay last
            last = max((text.index(f"<!-- /bench:{count} -->", pos) for count, pos in found
                        if f"<!-- /bench:{count} -->" in text[pos:]), default=0)
            notes = re.search(r"^## ", text[last:], re.MULTILINE)
            later = [last + notes.start()] if notes else []
        if later:
            text = text[:min(later)] + block + "\n" + text[min(later):]
        else:
            text = text.rstrip("\n") + "\n\n" + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000, help="images in the tree (20000)")
    ap.add_argument("--out", type=Path, default=None,
                    help="the tree (default /tmp/fgcli-gallery-bench-<images>); its inputs "
                         "go to OUT.photos")
    ap.add_argument("--runs", type=int, default=3, help="runs of each measurement (3)")
    ap.add_argument("--keep", action="store_true", help="keep the tree afterwards")
    ap.add_argument("--reuse", action="store_true",
                    help="use OUT as it is when it holds a tree of --images images")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/fgcli-gallery-bench-cache"),
                    help="where the real dump of examples/photos is kept")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "gallery-bench.md"),
                    help="Markdown file to write the table into ('' for none)")
    ap.add_argument("--timeout", type=float, default=600, help="page timeout, s")
    ap.add_argument("--no-browser", action="store_true", help="time the build only")
    ap.add_argument("--audit", action="store_true",
                    help="records with map statistics and pointing-game fields")
    args = ap.parse_args()
    n = args.images
    out = args.out or Path(f"/tmp/fgcli-gallery-bench-{n}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = "OMP_WAIT_POLICY=PASSIVE python " + shlex.join(
        ["scripts/gallery_bench.py", *sys.argv[1:]])

    free = shutil.disk_usage(out.parent if out.parent.exists() else "/").free
    need = n * 220_000 + 2 * 1024 ** 3
    if not (args.reuse and (out / "manifest.jsonl").is_file()) and free - need < 20 * 1024 ** 3:
        raise SystemExit(f"not enough disk: {free / 1024 ** 3:.0f} GB free, the tree needs "
                         f"~{need / 1024 ** 3:.0f} GB and 20 GB must stay free")

    reuse = False
    if args.reuse and (out / "run.json").is_file():
        meta = json.loads((out / "run.json").read_text(encoding="utf-8"))
        made = str(meta.get("synthetic", ""))
        reuse = f"{n} images" in made and ("with statistics" in made) == args.audit
    if reuse:
        counts = {"ok": 0, "failed": 0, "decomp": 0, "seconds": float("nan")}
        for line in (out / "manifest.jsonl").open(encoding="utf-8"):
            rec = json.loads(line)
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
            counts["decomp"] += "decomp" in rec["outputs"]
        print(f"reusing {out}", flush=True)
    else:
        real_dump(args.cache)
        class_names(args.cache)
        t = time.perf_counter()
        counts = build_tree(out, n, args.cache, audit=args.audit)
        counts["seconds"] = time.perf_counter() - t
        print(f"tree: {n} images in {counts['seconds']:.1f} s at {out}", flush=True)

    version = gallery_version()
    try:
        cold, warm = [], []
        for k in range(args.runs):
            cold.append(time_build(out, cold=True))
            print(f"cold build {k + 1}: {json.dumps(cold[-1])}", flush=True)
        for k in range(args.runs):
            warm.append(time_build(out, cold=False))
            print(f"warm build {k + 1}: {json.dumps(warm[-1])}", flush=True)
        records = out / "gallery" / "records"
        sizes = {
            "data_js": (out / "gallery" / "data.js").stat().st_size,
            "records": du_bytes(records), "record_files": len(list(records.iterdir())),
            "thumbs": du_bytes(out / "thumbs"),
            "thumb_files": sum(len(f) for _, _, f in os.walk(out / "thumbs")),
            "index": (out / "index.html").stat().st_size,
            "sources": du_bytes(out / "overlays") + du_bytes(out / "heatmaps"),
        }
        print(f"sizes: {json.dumps(sizes)}", flush=True)
        pages = []
        if not args.no_browser:
            for k in range(args.runs):
                pages.append(browser_run(out / "index.html", args.timeout, args.audit))
                print(f"page {k + 1}: {json.dumps(pages[-1])}", flush=True)
        after = gallery_version()
        if after != version:
            version = f"{version}, then {after} (the code changed during the run)"
        text = report(n, args.runs, command, version, counts, cold, warm, sizes, pages)
        raw = Path(f"/tmp/gallery-bench-{n}.json")
        raw.write_text(json.dumps({"tree": counts, "cold": cold, "warm": warm, "sizes": sizes,
                                   "pages": pages}, indent=1), encoding="utf-8")
        print()
        print(text)
        if args.doc:
            write_doc(Path(args.doc), n, text)
            print(f"written to {args.doc} (raw numbers: {raw})")
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(Path(str(out) + ".photos"), ignore_errors=True)


if __name__ == "__main__":
    main()
