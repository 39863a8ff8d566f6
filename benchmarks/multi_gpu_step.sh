#!/usr/bin/env bash
# Multi-GPU shots on one node (run on a 4-GPU machine): first the bf16 equality of each parallel layout against
# one process (tiny model, 300 tokens that no rank count divides evenly; every layout eager against an eager
# reference, then compiled against a compiled one), then the T2V-A14B denoising step at
# 1280×720×81 (75,600 tokens, CFG included, random bf16 weights) on 1, 2 and 4 GPUs per layout.
#   python3 -m renderer.provenance stamp           # first, where .git is: the JSON lines then name the commit
#   bash benchmarks/multi_gpu_step.sh equality    # ~5 min
#   bash benchmarks/multi_gpu_step.sh step        # ~7 min
# Every launch prints one JSON line (renderer.parallel.launch); they are collected in $OUT/*.jsonl.
set -u
OUT=${OUT:-out/multi_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
RUN="python3 -m torch.distributed.run --standalone"

equality() {  # compile mode, nproc, then launch flags
  # like with like: --check renders the reference the way the group ran (eager vs eager, compiled vs compiled;
  # the JSON's "compared" says which), with one pinned attention kernel on both sides, so the figure is the
  # layout's bf16 error and not compile's or an autotune choice's
  local mode=$1 n=$2; shift 2
  timeout 300 $RUN --nproc-per-node "$n" -m renderer.parallel.launch --dtype bfloat16 --check --steps 3 \
    --grid 5 12 20 --compile "$mode" --attention sdpa_flash "$@" > "$OUT/last.log" 2>&1
  grep '^{' "$OUT/last.log" | tee -a "$OUT/equality.jsonl" || { echo "FAILED: $mode $n $*"; tail -5 "$OUT/last.log"; }
}

equality_rows() {  # compile mode
  equality "$1" 2 --ulysses 2 --task t2v
  equality "$1" 2 --ulysses 2 --task i2v
  equality "$1" 2 --ulysses 2 --task ti2v
  equality "$1" 4 --ulysses 4 --task t2v
  equality "$1" 4 --cfg 2 --ulysses 2 --task t2v
  equality "$1" 2 --ring 2 --task t2v
  equality "$1" 4 --ulysses 2 --ring 2 --task ti2v
}

step() {  # nproc, then launch flags: one CFG step (2 forwards) of the high-noise expert, timed after a warm-up
  local n=$1; shift
  timeout 420 $RUN --nproc-per-node "$n" -m renderer.parallel.launch --model t2v_a14b --dtype bfloat16 \
    --grid 21 90 160 --steps 1 --repeat 3 "$@" > "$OUT/last.log" 2>&1
  grep '^{' "$OUT/last.log" | tee -a "$OUT/a14b_step.jsonl" || { echo "FAILED: $n $*"; tail -5 "$OUT/last.log"; }
}

case "${1:-all}" in
  equality|all)
    equality_rows off
    equality off 4 --ulysses 4 --fsdp true --task t2v
    equality_rows on  # FSDP-sharded blocks are not compiled (kernels/compile.py), so no compiled FSDP row
    ;;&
  step|all)
    step 1 --parallel single
    step 2 --parallel ulysses2
    step 2 --parallel gpus2
    step 4 --parallel ulysses4
    step 4 --parallel gpus4
    step 4 --parallel gpus4 --fsdp true
    ;;
esac
