#!/usr/bin/env bash
# Issue 7 on one GPU, in order: the GPU-marked tests (kernels vs the PyTorch reference), the kernel
# benchmark against FLA / mlstm_kernels, then the student vs the teacher on real weights.
#
#   TEACHER=/tmp/xm/SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR=/tmp/k7 benchmarks/h100_kernels.sh
#
# Needs torch+triton with CUDA, the teacher file, and fla-core / mlstm_kernels importable for their
# anchor rows (missing anchors are recorded as errors, not fatal). Each step writes into OUT_DIR as it
# goes, so a run cut short keeps what it finished; a failing test stops the run before any timing.
set -euo pipefail

TEACHER=${TEACHER:?set TEACHER to the teacher spec (alias, HF dir or .gguf)}
OUT_DIR=${OUT_DIR:-benchmarks/h100-kernels-out}
STUDENT_BUDGET_S=${STUDENT_BUDGET_S:-420}
mkdir -p "$OUT_DIR"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu_decode.py tests/test_gpu_student.py \
  tests/test_gpu_evals.py 2>&1 | tee "$OUT_DIR/gpu-tests.txt"
python3 benchmarks/kernels_mlstm.py --out "$OUT_DIR/kernels.json" 2>&1 | tee "$OUT_DIR/kernels.log"
python3 benchmarks/gpu_student.py --teacher "$TEACHER" --budget-s "$STUDENT_BUDGET_S" \
  --out "$OUT_DIR/student.json" 2>&1 | tee "$OUT_DIR/student.log"
echo "== done; results in $OUT_DIR"
