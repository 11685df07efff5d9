#!/usr/bin/env bash
# Issue #11's crash acceptance: kill one torchrun rank (or one Ray actor) mid-run, rerun the
# same command, and count every image's lines in the merged manifest.
#   bash scripts/scale_64.sh            # makes /tmp/fgcli-scale64/imgs
#   bash scripts/kill_one.sh torchrun   # or: bash scripts/kill_one.sh ray
set -uo pipefail
cd "$(dirname "$0")/.."
engine=${1:-torchrun}
imgs=${2:-/tmp/fgcli-scale64/imgs}
out=/tmp/fgcli-kill-$engine
rm -rf "$out"
export OMP_WAIT_POLICY=PASSIVE
# SmoothFullGrad with 4 samples at batch 2: slow enough to be killed in the middle
args=(dump "$imgs" -m squeezenet1_1 --weights examples/weights/squeezenet1_1_imagenet.pth
      --method smooth --samples 4 -b 2 -o "$out" -q)
if [ "$engine" = torchrun ]; then
    cmd=(torchrun --standalone --nproc-per-node 2 -m fgcli "${args[@]}")
    lines() { cat "$out"/shards/*/manifest.jsonl 2>/dev/null | wc -l; }
    victim() { pgrep -P "$(pgrep -f bin/torchrun | head -1)" | tail -1; }
else
    cmd=(fullgrad "${args[@]}" --ray --ray-actors 2)
    lines() { cat "$out"/manifest.jsonl 2>/dev/null | wc -l; }
    victim() { pgrep -f "MapBatches\(EngineActor\)" | head -1; }
fi
"${cmd[@]}" > "$out.first.log" 2>&1 &
first=$!
n=0
for _ in $(seq 1 300); do n=$(lines); [ "$n" -ge 16 ] && break; sleep 1; done
pid=$(victim)
echo "$engine: $n manifest lines written; kill -9 $pid"
kill -9 "$pid"
wait "$first"; echo "first run exit $?"
t0=$(date +%s.%N); "${cmd[@]}" > "$out.rerun.log" 2>&1; rc=$?; t1=$(date +%s.%N)
echo "rerun exit $rc after $(python -c "print(f'{$t1 - $t0:.1f}')") s"
python - "$out/manifest.jsonl" <<'PY'
import collections, json, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
per_key = collections.Counter(r["key"] for r in recs)
print(f"merged manifest: {len(recs)} lines, {len(per_key)} keys, at most "
      f"{max(per_key.values())} line per key; statuses {dict(collections.Counter(r['status'] for r in recs))}")
PY
