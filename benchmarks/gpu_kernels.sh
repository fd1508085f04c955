#!/usr/bin/env bash
# Issue 7 on one GPU, one step per device call (each fits the 10-minute limit of one call):
#
#   benchmarks/gpu_kernels.sh tests      # GPU-marked tests: kernels vs the PyTorch reference (8 workers),
#                                        # except those that autotune (143 passed in 167 s on 2026-12-02):
#   benchmarks/gpu_kernels.sh autotune   # those alone (SWA in fp32 now at D=64: ~2 min of compiling)
#   benchmarks/gpu_kernels.sh launches   # the fused decode step's launch shapes, unsplit (100 s) and split
#                                        # over 1-8 window programs a head (about as many launches again)
#   benchmarks/gpu_kernels.sh floor      # B=1 step floor: persistent kernel vs a graph of launches
#   benchmarks/gpu_kernels.sh kernels    # mLSTM and SWA kernels vs FLA / mlstm_kernels / Flex / SDPA (>7.5 min:
#                                        # PARTS=ours,fla SHAPES="8,9,8192,64 1,9,65536,64" splits it)
#   TEACHER=/tmp/xm/SmolLM2-135M-Instruct.Q4_1.gguf benchmarks/gpu_kernels.sh student
#                                        # vs the teacher (336 s on 2026-12-02; PREFILL="" and DECODE=... narrow it)
#                                        # (timings alone: TEACHER=/tmp/rand after benchmarks/random_teacher.py /tmp/rand,
#                                        # random weights of the same shape, no teacher file to bring)
#
# The times are those of the H200 runs of 2026-12-01/02 (benchmarks/RESULTS-*.md), most of them Triton
# autotuning and compiling on first use. The tests pin one launch per kernel (tests/conftest.py); with
# that, test_kernels.py, test_gpu_decode.py, test_gpu_student.py and test_gpu_evals.py took 125 s with 8
# workers, and the SWA kernel's tests (autotune test aside) ran within a 230 s call beside a part of them.
# Needs torch+triton with CUDA, pytest-xdist for `tests`, the teacher file for `student`, fla-core /
# mlstm_kernels importable for their anchor rows (missing anchors are recorded as errors, not fatal;
# PARTS=profile gives the per-kernel times of ours and FLA, PARTS=headline the goal's ratios alone).
# Results go to OUT_DIR as each part finishes.
set -euo pipefail

OUT_DIR=${OUT_DIR:-benchmarks/gpu-kernels-out}
HBM_TB_S=${HBM_TB_S:-4.8}   # the B=1 decode bound: H200 4.8, H100 SXM 3.35
mkdir -p "$OUT_DIR"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1

case ${1:-} in
  tests|autotune)
    marker=$([ "$1" = tests ] && echo "not autotune" || echo autotune)
    python3 -m pytest -v -p no:cacheprovider -n "${WORKERS:-8}" --durations=15 -m "$marker" tests/test_kernels.py \
      tests/test_kernels_swa.py tests/test_gpu_decode.py tests/test_gpu_student.py tests/test_gpu_evals.py 2>&1 \
      | tee "$OUT_DIR/gpu-$1.txt" ;;
  launches)
    python3 benchmarks/decode_step_launch.py --splits 1,2,4,8 --out "$OUT_DIR/decode_step_launch.json" 2>&1 \
      | tee "$OUT_DIR/decode_step_launch.log" ;;
  floor)
    timeout "${FLOOR_TIMEOUT_S:-120}" python3 benchmarks/decode_floor.py --hbm-tb-s "$HBM_TB_S" \
      --out "$OUT_DIR/decode_floor.json" 2>&1 | tee "$OUT_DIR/decode_floor.log" ;;  # timeout: a barrier that hangs
  kernels)
    shapes=()
    for shape in ${SHAPES:-}; do shapes+=(--shape "$shape"); done
    python3 benchmarks/kernels_mlstm.py --parts "${PARTS:-ours,fla,xl,attention}" ${shapes[@]+"${shapes[@]}"} \
      --out "$OUT_DIR/kernels.json" 2>&1 | tee "$OUT_DIR/kernels.log" ;;
  student)
    python3 benchmarks/gpu_student.py --teacher "${TEACHER:?set TEACHER to the teacher spec}" --hbm-tb-s "$HBM_TB_S" \
      --prefill "${PREFILL-4096,16384,65536,131072}" --decode "${DECODE:-8x32768,1x4096,8x4096,32x32768}" \
      --teacher-compiled 8x32768,1x4096 --memory-steps 256 \
      --profile-decode 1x4096 \
      --budget-s "${STUDENT_BUDGET_S:-360}" --out "$OUT_DIR/student.json" 2>&1 | tee "$OUT_DIR/student.log" ;;
  *)
    echo "usage: $0 tests|autotune|kernels|launches|floor|student" >&2; exit 2 ;;
esac
