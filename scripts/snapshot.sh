#!/bin/bash
# A refactoring's proof that nothing changed: run a fixed set of dumps (four methods and
# option sets, a user model, two shards and their merge), an eval, check, models, every
# --help and three bad commands with the code of checkout SRC_DIR, into OUT_DIR.
#
#   scripts/snapshot.sh CHECKOUT OUT_BEFORE      # at the old commit
#   git -C CHECKOUT checkout NEW && scripts/snapshot.sh CHECKOUT OUT_AFTER
#   for t in a b c d e; do python scripts/compare_trees.py OUT_BEFORE/$t OUT_AFTER/$t; done
#   diff -r -x manifest.jsonl -x run.json OUT_BEFORE OUT_AFTER   # files, exit codes, help
#
# Use the same CHECKOUT path for both runs: the settings fingerprint includes the weights
# file's resolved path and mtime. PYTHON defaults to python3 on PATH.
set -u
SRC=$(cd "$1" && pwd); OUT=$(mkdir -p "$2" && cd "$2" && pwd); rm -rf "$OUT"; mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$SRC/src OMP_NUM_THREADS=2 COLUMNS=100 OMP_WAIT_POLICY=PASSIVE
cd $SRC
W="--model squeezenet1_1 --weights examples/weights/squeezenet1_1_imagenet.pth"
run() { name=$1; shift; $PY -m fgcli "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr"; echo $? > "$OUT/$name.rc"; }
run a dump examples/photos $W -o $OUT/a --save heatmap,overlay,map,decomp -q
run b dump examples/photos $W -o $OUT/b --method simple --topk 2 --crop --overlay heat --psi signed --save heatmap,overlay,map -q
run c dump examples/photos $W -o $OUT/c --method smooth --samples 2 --seed 3 --save map -q
run d dump examples/photos --model examples/models/tinynet.py:build --weights random -o $OUT/d --save map,heatmap -q
run e dump examples/photos $W -o $OUT/e --shard 1/2 --save map -q
run e2 dump examples/photos $W -o $OUT/e --shard 2/2 --save map -q
run e3 merge $OUT/e
run f eval examples/photos $W --out $OUT/f -q
run g check $W
run h models
for c in "" dump eval check merge gallery models; do $PY -m fgcli $c --help > "$OUT/help-$c.txt" 2>&1; done
run bad dump /nonexistent $W -o $OUT/bad
run bad2 dump examples/photos --model nosuchmodel -o $OUT/bad2
run bad3 dump examples/photos $W -o $OUT/bad3 --std nan,1,1
