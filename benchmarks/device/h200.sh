#!/usr/bin/env bash
# One prepared run on the lent GPU machine (H200; its own python3 with torch, no network):
#  * the CPU side: bench_layers.py natively and restricted to AVX2, 2 threads pinned to 2 cores
#    (a quiet machine: the development VM is shared);
#  * the GPU side: bench_pipeline.py --device cuda model-only + accuracy (fp32, tf32, bf16, fp16 at
#    batch 128 against the CPU's float32 engine on the held images), on the other cores.
# Results land in $OUT (JSON + logs). Run from the repository root.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/synthetic_weights
# no install there: the model specs (models/*.json, installed as cxr_lung_risk.specs) by a link
[ -e src/cxr_lung_risk/specs ] || ln -s ../../models src/cxr_lung_risk/specs
(lscpu; nvidia-smi -L; python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))') > "$OUT/machine.txt" 2>&1
python3 benchmarks/device/write_fixture_weights.py $W > "$OUT/prep.log" 2>&1 || { cat "$OUT/prep.log"; exit 1; }
(
  for isa in native avx2; do
    OMP_NUM_THREADS=2 taskset -c 0,1 python3 benchmarks/bench_layers.py --weights $W --isa $isa \
      --batch-size 8 --runs 3 --out "$OUT/layers_${isa}.json"
  done
) > "$OUT/cpu.log" 2>&1 &
cpu=$!
taskset -c 4-15 python3 benchmarks/bench_pipeline.py --weights $W --device cuda --batch-size 128 \
  --precisions fp32,tf32,bf16,fp16 --skip-original --skip-e2e --no-compile-check --runs 3 \
  --out "$OUT/gpu.json" > "$OUT/gpu.log" 2>&1
echo "gpu rc $?"
wait $cpu; echo "cpu rc $?"
tail -5 "$OUT/cpu.log" "$OUT/gpu.log"
