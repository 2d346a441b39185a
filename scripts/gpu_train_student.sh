#!/usr/bin/env bash
# Train the testbed student on one CUDA GPU (prepared for a session that has one; about 10 min on an H200).
#
#   bash scripts/gpu_train_student.sh [WORK]      # WORK defaults to runs/gpu-student
#
# Stage A/B reproduce the shipped student's two runs (qsched/testbed/train_student.py docstring) at batch 256;
# stage C is the multi-step fine-tune tried on the CPU in session 4 (experiments.md: an auxiliary denoising loss
# on timesteps < 500, i.e. the mid/low-noise predictions 2-8 LCM steps end on, and an exported slow EMA),
# here at batch 256 for 3,000 steps. START=C begins at stage C from the shipped student (about 3 min).
# Every stage resumes from its own checkpoint folder, so a rerun after a cut-off lease continues where it
# stopped; each stage is capped with `timeout` so the whole script fits a 10-minute command.
# Afterwards, on any machine: python scripts/probe_student.py --weights WORK/C/student.safetensors --features2
set -euo pipefail
WORK=${1:-runs/gpu-student}
START=${START:-A}
DEV=${DEV:-cuda}
export PYTHONPATH=${PYTHONPATH:-$PWD}
T="python -m qsched.testbed.train_student --device $DEV --batch-size 256 --prediction-type v_prediction --threads 4"
mkdir -p "$WORK"
if [ "$START" = A ]; then
  timeout 330 $T --steps 4000 --convert-steps 1000 --work "$WORK/A" --out "$WORK/A" | tail -n 3
  timeout 120 $T --steps 1300 --lr 1e-4 --convert-steps 400 --init "$WORK/A/student.safetensors" \
    --work "$WORK/B" --out "$WORK/B" | tail -n 3
  INIT="$WORK/B/student.safetensors"
else
  INIT=qsched/testbed/weights/student.safetensors
fi
timeout 240 $T --steps 3000 --lr 5e-5 --aux-denoise 1.0 --aux-t-max 500 --slow-ema 0.999 --init "$INIT" \
  --work "$WORK/C" --out "$WORK/C" | tail -n 3
ls -la "$WORK"/*/student.safetensors
