#!/bin/bash
# One device call: issue 10's GPU targets, the CUDA correctness checks, and issue 12's CIFAR-10
# large-cnn penalty experiment (train several runs at once, then the float64 analyses on the GPU).
#
#   bash bench/gpu_session.sh            # on the GPU machine, repo root; writes into $OUT
#   SMOKE=1 bash bench/gpu_session.sh    # the same steps at toy sizes on the CPU (minutes)
#
# Each stage has its own time limit, so the results of the finished stages always come back:
# $OUT/session.log, $OUT/results.tgz (run records, analysis tables, bench outputs) and the seed-0
# checkpoints in pieces of 15 MB ($OUT/ckpt.tar.part-*; `cat` them and untar).
set -u
OUT=${OUT:-/tmp/gpu-session}; mkdir -p "$OUT"
DATA=${DATA:-gpu-carry/cifar10-jpeg.tar.xz}   # the archive from ../shared/data
RUNS=${RUNS:-runs/gpu-large}; RES=$RUNS/results
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SPLINELENS_CACHE=${SPLINELENS_CACHE:-/tmp/sl-cache}
if [ "${SMOKE:-0}" = 1 ]; then
  TRAIN=200 TEST=200 EPOCHS=1 SEEDS=2 WORKERS=2 TRAIN_S=300 BF16=--no-bf16 DEV=cpu
  N=20 GAP_N=5 GAP_M=10 BENCH="--device cpu --small --repeats 1"
else
  TRAIN=${TRAIN:-8000} TEST=${TEST:-5000} EPOCHS=${EPOCHS:-15} SEEDS=${SEEDS:-5}
  WORKERS=${WORKERS:-7} TRAIN_S=${TRAIN_S:-200} BF16=--bf16 DEV=cuda
  N=200 GAP_N=100 GAP_M=200 BENCH="--device cuda --repeats 5"
fi
mkdir -p "$RES"
exec > >(tee "$OUT/session.log") 2>&1
stage() { echo "== $(date +%T) $*"; }

stage "device"; nvidia-smi -L 2>/dev/null; python -c "import torch; print(torch.__version__)"
stage "issue 10: bench_gpu"
(cd bench && timeout 100 python bench_gpu.py $BENCH) | tee "$RES/bench_gpu.txt"
if [ "$DEV" = cuda ]; then
  stage "CUDA correctness: gpu_check"
  (cd bench && timeout 60 python gpu_check.py) | tee "$RES/gpu_check.txt"
fi

stage "decode CIFAR-10 once"
timeout 90 python -c "from splinelens.paper.data import load_dataset as l; l('cifar10', '$DATA')"
worker() {  # seed-major: every arm gets seed 0 before any gets seed 1
  for s in $(seq 1 "$SEEDS"); do
    for kind in eq13 reference row-norm; do
      lams=0.22,2; [ $kind = eq13 ] && lams=0,0.22,2
      python -m splinelens.cli sweep --dataset cifar10 --data-dir "$DATA" --arch large-cnn \
        --seeds "$s" --epochs "$EPOCHS" --batch-size 128 --train-subset "$TRAIN" \
        --test-subset "$TEST" $BF16 --device "$DEV" --checkpoints --penalty $kind \
        --lambdas $lams --no-progress --out "$RUNS/$kind" > /dev/null
    done
  done
}
export -f worker; export DATA SEEDS EPOCHS TRAIN TEST BF16 DEV RUNS
stage "issue 12: large-cnn, $WORKERS workers for at most $TRAIN_S s"
pids=""  # (a bare `wait` would also wait for the log's tee)
for w in $(seq "$WORKERS"); do timeout "$TRAIN_S" bash -c worker & pids="$pids $!"; sleep 2; done
wait $pids
ls "$RUNS"/*/runs/*.json 2>/dev/null | wc -l

stage "issue 12: analyses (float64)"
timeout 120 python bench/exp_penalty_kinds.py --runs "$RUNS" --out "$RES/analysis" --n $N \
  --gap-n $GAP_N --gap-m $GAP_M --lam 2 --kind eq13 --threads 4 --device $DEV

stage "pack"
tar czf "$OUT/results.tgz" "$RES" "$RUNS"/*/sweep.json "$RUNS"/*/runs/*.json
python - "$RUNS" <<'PY' | tar cf - -T - | split -b 15M - "$OUT/ckpt.tar.part-"
import json, pathlib, sys
for rec in pathlib.Path(sys.argv[1]).glob("*/runs/*.json"):
    if json.loads(rec.read_text())["config"]["seed"] == 0:
        ckpt = rec.with_suffix(".safetensors")
        print(ckpt) if ckpt.exists() else None
PY
ls -la "$OUT"; stage "done"
