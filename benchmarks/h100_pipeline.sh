#!/usr/bin/env bash
# Issue 8: the real pipeline through the CLI on one GPU — seed, three experts, uniform and searched
# compositions, a second code expert through the gated replace, and the full suite of every model.
#
#   TEACHER=/path/SmolLM2-135M-Instruct.Q4_1.gguf benchmarks/h100_pipeline.sh
#
# Every step is skipped when its marker exists, so re-running continues where a run stopped.
# Output: $REPORT_DIR (eval reports, command log with timings, the registry database) for
# benchmarks/pipeline_report.py, which writes REPORT.md, summary.json and recovery.png.
set -euo pipefail

export XMERGE_HOME=${XMERGE_HOME:-.xmerge-h100}
REPORT_DIR=${REPORT_DIR:-reports/h100-smollm2/raw}
TEACHER=${TEACHER:-smollm2-135m-instruct}
WINDOW=${WINDOW:-256}     # at 2K blocks the window leaves 7/8 of each block's context to the mLSTM
SEQ=${SEQ:-2048}
BATCH=${BATCH:-8}
S1=${S1:-1048576}         # Stage I tokens per expert
S2=${S2:-4194304}         # Stage II tokens per expert
LR2=${LR2:-1e-4}
LR2_V2=${LR2_V2:-3e-4}    # the second code expert: the one change offered through the gated replace
DEVICE=${DEVICE:-cuda}
TOPK=${TOPK:-64}
SEARCH_BUDGET=${SEARCH_BUDGET:-12}
XMERGE=(python3 -m xmerge.cli)

mkdir -p "$REPORT_DIR" "$XMERGE_HOME/pipeline"
LOG="$REPORT_DIR/commands.tsv"
[ -f "$LOG" ] || printf 'step\tseconds\texit\tcommand\n' > "$LOG"

# step NAME [ok-codes] -- ARGS: run `xmerge ARGS` once, logging the command, its wall time and exit code.
step() {
  local name=$1 ok=$2; shift 3
  local marker="$XMERGE_HOME/pipeline/$name.done"
  [ -f "$marker" ] && { echo "== $name: done earlier"; return 0; }
  echo "== $name: xmerge $*"
  local t0=$SECONDS rc=0
  "${XMERGE[@]}" "$@" > >(tee "$REPORT_DIR/$name.log") 2>&1 || rc=$?
  printf '%s\t%s\t%s\txmerge %s\n' "$name" $((SECONDS - t0)) "$rc" "$*" >> "$LOG"
  case " $ok " in *" $rc "*) touch "$marker";; *) echo "== $name failed with exit $rc"; return "$rc";; esac
}

TRAIN=(--seq-len "$SEQ" --batch-size "$BATCH" --stage1-tokens "$S1" --stage2-tokens "$S2" --top-k "$TOPK"
       --device "$DEVICE" --resume --checkpoint-every 100)
FULL=(--suite full --device "$DEVICE" --domains math,code,chat --json)

step init 0 -- init
step seed 0 -- seed create base --teacher "$TEACHER" --window "$WINDOW"
for domain in math code chat; do
  step "train-$domain" 0 -- train-expert "$domain" "${TRAIN[@]}" --lr2 "$LR2"
done
# Uniform weights, gated at the default τ = 0.02; a rejection (exit 2) is recorded and the merge is then
# registered with --force so that it can still be measured (the report shows the gate's decision).
step compose-uniform "0 2" -- compose mix --weights math=1,code=1,chat=1 --device "$DEVICE" --json
if ! "${XMERGE[@]}" compositions list --json | grep -q '"name": "mix"'; then
  step compose-uniform-forced 0 -- compose mix --weights math=1,code=1,chat=1 --device "$DEVICE" --force --json
fi
step compose-search "0 2" -- compose mix-search --weights math=1,code=1,chat=1 --search \
  --budget "$SEARCH_BUDGET" --device "$DEVICE" --json
if ! "${XMERGE[@]}" compositions list --json | grep -q '"name": "mix-search"'; then
  step compose-search-forced 0 -- compose mix-search --weights math=1,code=1,chat=1 --search \
    --budget "$SEARCH_BUDGET" --device "$DEVICE" --force --json
fi
step train-code-v2 0 -- train-expert code "${TRAIN[@]}" --lr2 "$LR2_V2"
step replace "0 2" -- replace mix --domain code --expert code@v2 --device "$DEVICE" --json

for ref in seed:base math@v1 code@v1 chat@v1 code@v2 comp:mix@v1 comp:mix-search@v1 comp:mix; do
  name=eval-${ref//[:@]/-}
  step "$name" 0 -- eval "$ref" "${FULL[@]}" --out "$REPORT_DIR/$name"
done
"${XMERGE[@]}" experts list --json > "$REPORT_DIR/experts.json"
"${XMERGE[@]}" compositions list --json > "$REPORT_DIR/compositions.json"
cp "$XMERGE_HOME/registry.db" "$REPORT_DIR/registry.db" 2>/dev/null || true
echo "== pipeline finished; reports in $REPORT_DIR"
