#!/usr/bin/env bash
# Issue 14's GPU rows (quality tiers) on a lent 2×H200 machine, in two calls while it stays warm (one call may run
# 10 minutes; the fast row on one H200 runs about as long, so it runs detached on GPU 0 from call 1 into call 2).
#   make stamp                                     # here: SOURCE_STAMP.json names the commit the rows ran
#   run: bash benchmarks/device_tiers.sh call1     # carry .carry/wheels and SOURCE_STAMP.json
#   run: bash benchmarks/device_tiers.sh call2     # then call3, each right after the last (warm ~30 s)
# call1  GPU0: the FP8 kernel sweep (then set kernels/fp8_attention.py HOPPER_CONFIG from it, commit, stamp), the
#              GPU-only tests; GPU1: T2V-A14B 1280×720×81 exact on one H200 (4 timed steps of 40, median × 40);
#              then both: a gpus2 group switching layout with the shot's guidance (NCCL)
# call2  GPU0 (detached, into call3): A14B fast on one H200, every step timed, the published MagCache schedule
#        GPU1: TI2V-5B draft; Animate draft clip; the deviation figures at 832×480×33 (exact vs fast / draft)
# call3  collects the fast row, then the 2-GPU rows: A14B fast (cfg 2), TI2V-5B draft and Animate draft (Ulysses 2)
# Everything lands under $OUT/tiers; raw JSON carries the commit (renderer/provenance.py).
set -u
phase=${1:?usage: device_tiers.sh call1|call2|call3}
T0=$(date +%s)
LIMIT=${TIERS_CALL_LIMIT_S:-575}
O=/tmp/tier_out/$phase    # everything lands here, then one archive in $OUT (a call returns a limited number of files)
R=/tmp/tier_runs            # survives between calls while the machine is warm
mkdir -p "$O" "$R"
if [ ! -d /tmp/site/hydra ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl 2>&1 | tail -1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
step() {  # step NAME CMD...: run with what is left of the call, log under $O, one status line
  local name=$1; shift
  local t=$(left)
  if [ "$t" -lt 30 ]; then echo "skip $name: ${t}s left" | tee -a "$O/summary.txt"; return; fi
  local s=$(date +%s)
  timeout -k 10 "$t" "$@" > "$O/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - s ))s" | tee -a "$O/summary.txt"
}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader >> "$O/gpus.txt"
case $phase in
call1)
  ( export CUDA_VISIBLE_DEVICES=0
    step fp8_sweep python3 -m benchmarks.fp8_micro sweep=true out=$O/fp8_sweep.json
    step gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_fp8.py tests/test_fp8_triton.py \
      tests/test_attention.py tests/test_kernels.py ) &
  CUDA_VISIBLE_DEVICES=1 step exact_1gpu python3 -m benchmarks.scaling bench=a14b_720p_tiers qualities=[exact] \
    gpus=[1] out=$O/exact_1gpu
  wait
  # the layout follows the tier on NCCL: one gpus2 group renders guidance 1, 5, 1 as ulysses2, cfg2, ulysses2
  step layout_switch torchrun --standalone --nproc-per-node 2 -m renderer.parallel.launch --parallel gpus2 \
    --guidance 1 5 1 --check --compile on
  ;;
call2)
  python3 -m renderer.cache_schedules model=t2v_a14b out=$R/t2v_a14b_magcache_40.json
  python3 -m renderer.cache_schedules model=t2v_a14b steps=12 out=$R/t2v_a14b_magcache_12.json
  cp $R/*.json "$O/"
  CUDA_VISIBLE_DEVICES=0 setsid nohup python3 -m benchmarks.scaling bench=a14b_720p_tiers qualities=[fast] gpus=[1] \
    "+quality_overrides.cache={method:schedule,schedule:$R/t2v_a14b_magcache_40.json}" out=$R/fast_1gpu \
    > $R/fast_1gpu.log 2>&1 < /dev/null &
  export CUDA_VISIBLE_DEVICES=1
  step ti2v_draft_1gpu python3 -m benchmarks.scaling bench=ti2v_5b_720p_draft qualities=[draft] gpus=[1] \
    out=$O/ti2v_draft_1gpu
  step animate_draft_1gpu python3 -m benchmarks.animate bench=animate_14b_720p_draft out=$O/animate_draft_1gpu
  step quality_fast python3 -m benchmarks.quality model=t2v_a14b random_weights=true quality=fast size=832*480 \
    frames=33 steps=12 quality.cache.method=schedule quality.cache.schedule=$R/t2v_a14b_magcache_12.json \
    out=$O/quality_fast
  step quality_draft python3 -m benchmarks.quality model=t2v_a14b random_weights=true quality=draft size=832*480 \
    frames=33 steps=12 out=$O/quality_draft
  cp $R/fast_1gpu.log "$O/fast_1gpu.partial.log"
  ;;
call3)
  export CUDA_VISIBLE_DEVICES=1
  step ti2v_draft_1gpu python3 -m benchmarks.scaling bench=ti2v_5b_720p_draft qualities=[draft] gpus=[1] \
    out=$O/ti2v_draft_1gpu
  step quality_fast python3 -m benchmarks.quality model=t2v_a14b random_weights=true quality=fast size=832*480 \
    frames=33 steps=12 quality.cache.method=schedule quality.cache.schedule=$R/t2v_a14b_magcache_12.json \
    out=$O/quality_fast
  step quality_draft python3 -m benchmarks.quality model=t2v_a14b random_weights=true quality=draft size=832*480 \
    frames=33 steps=12 out=$O/quality_draft
  while pgrep -f "out=$R/fast_1gpu" > /dev/null && [ "$(left)" -gt 20 ]; do sleep 5; done
  cp -r $R/fast_1gpu $R/fast_1gpu.log "$O/" 2>/dev/null
  ;;
call4)
  step fast_2gpu python3 -m benchmarks.scaling bench=a14b_720p_tiers qualities=[fast] gpus=[2] \
    "+quality_overrides.cache={method:schedule,schedule:$R/t2v_a14b_magcache_40.json}" out=$O/fast_2gpu
  step ti2v_draft_2gpu python3 -m benchmarks.scaling bench=ti2v_5b_720p_draft qualities=[draft] gpus=[2] \
    out=$O/ti2v_draft_2gpu
  step animate_draft_2gpu torchrun --standalone --nproc-per-node 2 -m benchmarks.animate \
    bench=animate_14b_720p_draft layout=ulysses2 out=$O/animate_draft_2gpu
  ;;
esac
echo "call $phase done in $(( $(date +%s) - T0 ))s" | tee -a "$O/summary.txt"
find "$O" -name "*.mp4" -size +20M -delete  # videos of random weights: noise, and large
tar -C /tmp/tier_out -czf "${OUT:-out}/tiers_$phase.tgz" "$phase" && ls -la "${OUT:-out}"
