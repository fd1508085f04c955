#!/usr/bin/env bash
# Issue 8: the real pipeline through the CLI on one GPU — seed, one expert per domain, uniform and
# searched compositions, a second code expert through the gated replace, the full suite of each model.
#
#   TEACHER=/path/SmolLM2-135M-Instruct.Q4_1.gguf benchmarks/h100_pipeline.sh
#
# Every step is skipped when its marker exists, so re-running continues where a run stopped.
# Output: $REPORT_DIR (eval reports, command log with timings, the registry database) for
# benchmarks/pipeline_report.py, which writes the report's markdown, JSON and PNG.
set -euo pipefail

export XMERGE_HOME=${XMERGE_HOME:-.xmerge-h100}
REPORT_DIR=${REPORT_DIR:-reports/h100-smollm2/raw}
TEACHER=${TEACHER:-smollm2-135m-instruct}
DOMAINS=${DOMAINS:-math code chat}
WINDOW=${WINDOW:-256}     # at 2K blocks the window leaves 7/8 of each block's context to the mLSTM
SEQ=${SEQ:-2048}
BATCH=${BATCH:-8}
S1=${S1:-1048576}         # Stage I tokens per expert
S2=${S2:-4194304}         # Stage II tokens per expert
S2_CHAT=${S2_CHAT:-$S2}   # the chat preset holds ~0.4M train tokens at 2K: more only repeats it
LR2=${LR2:-1e-4}
LR2_V2=${LR2_V2:-3e-4}    # the second code expert: the one change offered through the gated replace
CE=${CE:-0.9}             # Stage II loss weights γ (data CE) and β (top-k KL to the teacher)
KL=${KL:-0.1}
DEVICE=${DEVICE:-cuda}
TOPK=${TOPK:-64}
SEARCH_BUDGET=${SEARCH_BUDGET:-12}
EVAL_JOBS=${EVAL_JOBS:-2}  # full evals side by side: one 135M student leaves the GPU mostly idle (run 3: ~1.5× the rate)
XMERGE=(python3 -m xmerge.cli)

mkdir -p "$REPORT_DIR" "$XMERGE_HOME/pipeline"
LOG="$REPORT_DIR/commands.tsv"
[ -f "$LOG" ] || printf 'step\tseconds\texit\tcommand\n' > "$LOG"

# step NAME OK-CODES -- ARGS: run `xmerge ARGS` once, logging the command, its wall time and exit code.
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

# compose_gated NAME ARGS: the gate at τ = 0.02 decides; a rejection (exit 2) is recorded, then the
# merge is registered with --force so that it can still be measured (the report shows the decision).
compose_gated() {
  local name=$1; shift
  step "compose-$name" "0 2" -- compose "$name" "$@" --device "$DEVICE" --json
  if ! "${XMERGE[@]}" compositions list --json | grep -q "\"name\": \"$name\""; then
    step "compose-$name-forced" 0 -- compose "$name" "$@" --device "$DEVICE" --force --json
  fi
}

TRAIN=(--seq-len "$SEQ" --batch-size "$BATCH" --stage1-tokens "$S1" --top-k "$TOPK" --ce-weight "$CE"
       --kl-weight "$KL" --device "$DEVICE" --resume --checkpoint-every 100)
read -ra domains <<< "$DOMAINS"
uniform=$(printf '%s=1,' "${domains[@]}"); uniform=${uniform%,}

step init 0 -- init
step seed 0 -- seed create base --teacher "$TEACHER" --window "$WINDOW"
for domain in "${domains[@]}"; do
  budget=$S2; [ "$domain" = chat ] && budget=$S2_CHAT
  step "train-$domain" 0 -- train-expert "$domain" "${TRAIN[@]}" --stage2-tokens "$budget" --lr2 "$LR2"
done
compose_gated mix --weights "$uniform"
[ "$SEARCH_BUDGET" -gt 0 ] && compose_gated mix-search --weights "$uniform" --search --budget "$SEARCH_BUDGET"
step train-code-v2 0 -- train-expert code "${TRAIN[@]}" --stage2-tokens "$S2" --lr2 "$LR2_V2"
step replace "0 2" -- replace mix --domain code --expert code@v2 --device "$DEVICE" --json

# compositions first: if time runs out, the merged students are what must have been measured
refs=(comp:mix@v1 comp:mix)
[ "$SEARCH_BUDGET" -gt 0 ] && refs+=(comp:mix-search)
for domain in "${domains[@]}"; do refs+=("$domain@v1"); done
refs+=(code@v2 seed:base)
eval_domains=$(IFS=,; echo "${domains[*]}")
eval_step() {
  local name=eval-${1//[:@]/-}
  step "$name" 0 -- eval "$1" --suite full --device "$DEVICE" --domains "$eval_domains" --json --out "$REPORT_DIR/$name"
}
eval_step "${refs[0]}"  # alone: it computes the teacher's reference metrics that the later evals reuse
running=0
for ref in "${refs[@]:1}"; do
  if [ "$running" -ge "$EVAL_JOBS" ]; then wait -n; running=$((running - 1)); fi
  eval_step "$ref" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do wait -n; running=$((running - 1)); done  # a failed eval fails the script
"${XMERGE[@]}" experts list --json > "$REPORT_DIR/experts.json"
"${XMERGE[@]}" compositions list --json > "$REPORT_DIR/compositions.json"
cp "$XMERGE_HOME/registry.db" "$REPORT_DIR/registry.db" 2>/dev/null || true
echo "== pipeline finished; reports in $REPORT_DIR"
