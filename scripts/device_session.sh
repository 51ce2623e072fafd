#!/usr/bin/env bash
# A whole GPU lease in one device call: the prepared check, then the learning comparison with nnU-Net.
#
# Here, once:  scripts/device_site.sh                       (.whl/site.tar.xz, ~40 MB)
#              mkdir -p .devdata && cp -r ../shared/data/Dataset004_Hippocampus .devdata/
#              printf '/.whl/\n/.devdata/\n' >> .git/info/exclude
# The call:    command "bash scripts/device_session.sh", carry [".whl", ".devdata"], timeout_s 590
#
# About 8 minutes on an H200, estimated from the first lease's parts (not yet run as one call: device_check's
# three architectures ~4 min, bench_accuracy's two 5-epoch trainings ~1 min each plus planning and
# prediction): device_check.py for the architectures whose memory model last changed
# (all of them were measured on 2026-12-04, README) and bench_accuracy.py with nnU-Net's 5-epoch trainer.
# Everything lands in $OUT: both JSON/logs and autoseg's training_log.jsonl (its data_wait_seconds say
# whether the loader or the GPU set the pace).
set -uo pipefail
out=${OUT:-/tmp/device_out}
mkdir -p "$out" /tmp/site
tar -xJf .whl/site.tar.xz -C /tmp/site || { echo "no .whl/site.tar.xz: run scripts/device_site.sh here first"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 300 python3 scripts/device_check.py --json "$out/device_check.json" --data .devdata \
  --architectures ${DEVICE_ARCHITECTURES:-unet resenc_unet xlstm_unet} > "$out/device_check.log" 2>&1
sed -n '/^device:/,$p' "$out/device_check.log"
# Stopped by the timeout before its table: the checks that finished are in the JSON (written as each ends).
grep -q '^device:' "$out/device_check.log" || { echo "device_check did not finish; its finished checks:"; \
  cat "$out/device_check.json" 2>/dev/null; tail -n 5 "$out/device_check.log"; }
# nnUNet_compile=f: nnU-Net compiles its network on CUDA by default, a minute that pays off over its 1000
# epochs but would double the wall-clock budget autoseg gets from a 5-epoch run (a flattering ratio).
nnUNet_compile=f timeout 270 python3 scripts/bench_accuracy.py --data .devdata --trainer nnUNetTrainer_5epochs \
  --work /tmp/bench_accuracy > "$out/bench_accuracy.log" 2>&1
tail -n 12 "$out/bench_accuracy.log"
cp /tmp/bench_accuracy/res_autoseg/*/*/fold_0/training_log.jsonl "$out/" 2>/dev/null
cp /tmp/bench_accuracy/nnunet_train.log "$out/" 2>/dev/null
exit 0
