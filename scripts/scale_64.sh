#!/usr/bin/env bash
# Issue #11's acceptance run: a 64-image dump as one process, as torchrun with 2 ranks and
# on Ray (local, 2 actors); wall times side by side and the trees compared.
#   bash scripts/scale_64.sh [WORKDIR]        (needs `pip install -e ".[ray]"`)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/fgcli-scale64}
rm -rf "$work" && mkdir -p "$work"
export OMP_WAIT_POLICY=PASSIVE
python - "$work/imgs" <<'PY'
import sys
from pathlib import Path
from PIL import Image
out = Path(sys.argv[1]); out.mkdir(parents=True)
photos = sorted(Path("examples/photos").iterdir())
for i in range(64):  # the six photos at eight scales: 64 distinct JPEGs
    im = Image.open(photos[i % len(photos)]).convert("RGB")
    s = 0.5 + (i % 8) / 10
    im.resize((max(32, int(im.width * s)), max(32, int(im.height * s)))).save(
        out / f"img{i:03d}.jpg", quality=90)
PY
args=(-m squeezenet1_1 --weights examples/weights/squeezenet1_1_imagenet.pth -q)
wall() { local t0 t1; t0=$(date +%s.%N); "$@"; t1=$(date +%s.%N); python -c "print(f'{$t1 - $t0:.1f}')"; }
# -q: nothing but failures on stderr; each timing line is the whole command, set-up included
t_plain=$(wall fullgrad dump "$work/imgs" "${args[@]}" -o "$work/plain")
t_plain1=$(OMP_NUM_THREADS=1 wall fullgrad dump "$work/imgs" "${args[@]}" -o "$work/plain-1thread")
t_torchrun=$(wall torchrun --standalone --nproc-per-node 2 -m fgcli dump "$work/imgs" "${args[@]}" \
    -o "$work/torchrun" 2>/dev/null)
t_ray=$(wall fullgrad dump "$work/imgs" "${args[@]}" -o "$work/ray" --ray --ray-actors 2)
echo "wall seconds, 64 images, squeezenet1_1, whole command incl. start-up:"
echo "  1 process (2 threads)          $t_plain"
echo "  1 process (1 thread)           $t_plain1"
echo "  torchrun --nproc-per-node 2    $t_torchrun"
echo "  --ray --ray-actors 2           $t_ray"
# ranks and actors compute with one thread each: compare them with the one-thread run
python scripts/compare_trees.py "$work/plain-1thread" "$work/torchrun"
python scripts/compare_trees.py "$work/plain-1thread" "$work/ray"
