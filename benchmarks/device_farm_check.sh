#!/usr/bin/env bash
# The render farm on a lent multi-GPU machine (no internet there): Ray GPU actors forming NCCL render groups.
# Build what the machine lacks here first (shared/tools/device_carry.sh: .carry/wheels, .carry/ray_min.tar.xz,
# .carry/ffmpeg.xz), stamp the commit (`make stamp`), then on the machine, in two calls while it stays warm:
#   bash benchmarks/device_farm_check.sh setup-ffmpeg     # call 1 carries .carry/wheels and .carry/ffmpeg.xz
#   bash benchmarks/device_farm_check.sh farm             # call 2 carries .carry/ray_min.tar.xz (+ wheels)
# `farm` renders examples/previs.yaml with the tiny model on 2-GPU groups (ulysses2, NCCL), checks report.json
# (every shot done, GPU-seconds accounted), resubmits (nothing re-rendered), and writes what it saw under $OUT/farm.
set -u
what=${1:-farm}
out=${OUT:-out}/farm
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps .carry/wheels/*.whl 2>&1 | grep -v WARNING | tail -2
if [ "$what" = setup-ffmpeg ]; then
  mkdir -p .ffbin && xz -dc .carry/ffmpeg.xz > .ffbin/ffmpeg && chmod +x .ffbin/ffmpeg && .ffbin/ffmpeg -version | head -1
  exit $?
fi
if [ ! -d .raysite/ray ]; then
  mkdir -p .raysite && tar -C .raysite -xJf .carry/ray_min.tar.xz \
    && python3 -m pip install -q --no-index --no-deps --target .raysite .carry/wheels/ray-deps/*.whl 2>&1 | tail -1
fi
export PATH=$PWD/.ffbin:$PATH PYTHONPATH=$PWD/.raysite:$PWD RAY_AUTH_MODE=disabled
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpus.txt"
job=${FARM_JOB_DIR:-/tmp/wanrender_farm_job}  # the job's many files stay on the machine; $OUT gets the summary
rm -rf "$job"
run() { python3 -m renderer.cli render manifest=examples/previs.yaml parallel=ulysses2 cluster=local \
          render.device=cuda out="$job" "$@"; }
run > "$out/first.log" 2>&1; echo "first run rc=$?" | tee -a "$out/summary.txt"
run > "$out/resubmit.log" 2>&1; echo "resubmit rc=$?" | tee -a "$out/summary.txt"
cp "$job/report.json" "$out/report.json"
python3 - "$job" <<'PY' | tee -a "$out/summary.txt"
import json, sys, pathlib
job = pathlib.Path(sys.argv[1])
rep = json.loads((job / "report.json").read_text())
shots = rep.get("shots", [])
print("shots:", {s.get("id"): s.get("status") for s in shots})
print("gpu_seconds:", rep.get("accounting", rep.get("gpu_seconds")))
print("code_version:", rep.get("code_version") or rep.get("job", {}).get("code_version"))
print("mp4s:", sorted(p.name for p in job.glob("*.mp4")))
PY
tail -5 "$out/resubmit.log"
