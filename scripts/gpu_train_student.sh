#!/usr/bin/env bash
# Train the testbed student on one CUDA GPU (prepared for a session that has one; about 10 min on an H200).
#
#   bash scripts/gpu_train_student.sh [WORK]      # WORK defaults to runs/gpu-student
#
# Stage A/B reproduce the shipped student's two runs (qsched/testbed/train_student.py docstring) at batch 256;
# stage C is the multi-step fine-tune that produced the session-4 student on the CPU (experiments.md, session 4:
# LCD plus an auxiliary denoising loss on timesteps < 500, the mid/low-noise predictions that 2-8 LCM steps end
# on; 500 steps of 64 there), here 500 steps of 256 (4x the images: probe it against the shipped student before
# replacing anything; 1-step FD drifted up as that run went on); stage D continues it on t < 260 (session 7's
# shipped student, 400 steps of 64 as on the CPU). START=C INIT=<student.safetensors> runs stage C
# alone from INIT (about 1-2 min), e.g. from the stage-B student before session 4, which is in git history:
#   git show 37a53a2:qsched/testbed/weights/student.safetensors > runs/student-b.safetensors
# Every stage resumes from its own checkpoint folder, so a rerun after a cut-off lease continues where it
# stopped; each stage is capped with `timeout` so the whole script fits a 10-minute command.
# Afterwards, on any machine: python scripts/probe_student.py --weights WORK/D/student.safetensors --features2
# (and --prefix slow_ema --ckpt WORK/C/ckpt.safetensors for the slow average kept in the checkpoint).
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
  INIT=${INIT:?START=C needs INIT=<exported student .safetensors> to fine-tune}
fi
timeout 240 $T --steps 500 --lr 5e-5 --aux-denoise 1.0 --aux-t-max 500 --slow-ema 0.999 --init "$INIT" \
  --work "$WORK/C" --out "$WORK/C" | tail -n 3
# Stage D (session 7, the shipped student): the same fine-tune continued with the denoising loss on t < 260, the
# lowest timesteps of the 8-step LCM grid, at the CPU run's batch of 64 (experiments.md, session 7).
timeout 120 ${T/--batch-size 256/--batch-size 64} --steps 400 --lr 5e-5 --aux-denoise 1.0 --aux-t-max 260 \
  --init "$WORK/C/student.safetensors" --work "$WORK/D" --out "$WORK/D" | tail -n 3
ls -la "$WORK"/*/student.safetensors
