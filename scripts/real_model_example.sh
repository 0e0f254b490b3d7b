#!/usr/bin/env bash
# REDI on a real LM, offline: self-distillation of SmolLM2-135M-Instruct on arithmetic word problems.
# docs/real-model-example.md explains every step and reports a measured run.
#
#   MODEL=path/to/SmolLM2-135M-Instruct scripts/real_model_example.sh [RUN_DIR]
#
# MODEL: the model as `redi --model` takes it (an HF folder). Sizes come from the environment (defaults: the
# documented run, ~30 minutes on 2 CPU cores); tests/test_real_model_example.py runs a reduced one.
set -euo pipefail

: "${MODEL:?set MODEL to the SmolLM2-135M-Instruct model (an HF folder)}"
RUN=${1:-runs/real-model}
PROBLEMS=${PROBLEMS:-64}            # training problems; the teacher (the model itself) samples each SAMPLES times
EVAL_PROBLEMS=${EVAL_PROBLEMS:-80} # held-out problems, disjoint from training
SAMPLES=${SAMPLES:-8}               # teacher samples per problem (the issue: 8 at T = 0.8)
TEACHER_T=${TEACHER_T:-0.8}
EVAL_SAMPLES=${EVAL_SAMPLES:-2}     # samples per problem at T = 0.6 (pass@1 averaged)
MAX_TOKENS=${MAX_TOKENS:-64}        # generation limit, teacher and evaluation
SFT_STEPS=${SFT_STEPS:-32}          # stage 1 optimizer steps
PAIR_STEPS=${PAIR_STEPS:-16}        # stage 2 steps, the same for REDI and for continued SFT
BACKEND=${BACKEND:-cpu}
SEED=${SEED:-0}
REDI=${REDI:-redi}
PYTHON=${PYTHON:-python}
RECIPE=${RECIPE:-$(dirname "$0")/../configs/real-model.yaml}

mkdir -p "$RUN"
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*"; uptime; }

log "problems"
$PYTHON -m redi.experiments.word_problems --output "$RUN/problems" --train "$PROBLEMS" --eval "$EVAL_PROBLEMS" --seed "$SEED"

# One prompt everywhere: the problem text (it carries its own instruction) is the whole user turn, in the
# model's chat template with its own system prompt; no <think> (the model does not think).
log "teacher traces: the model samples each problem $SAMPLES times at T = $TEACHER_T"
$REDI data generate --teacher "$MODEL" --problems "$RUN/problems/train.jsonl" --output "$RUN/teacher" \
  --samples "$SAMPLES" --temperature "$TEACHER_T" --top-p 0.95 --max-new-tokens "$MAX_TOKENS" \
  --instruction '{problem}' --no-force-think --grader math-verify-unboxed --engine native --backend "$BACKEND" \
  --seed "$SEED" --workers 0

log "pairs: first correct trace (SFT), (first correct, first wrong) per problem (REDI)"
$REDI data pair "$RUN/teacher/traces.jsonl" --output "$RUN/data" --format jsonl --workers 0 --force

train() {  # train OUT STAGE MODEL DATA STEPS [extra --set ...]
  local out=$1 stage=$2 model=$3 data=$4 steps=$5
  shift 5
  if [ -f "$out/final/config.json" ]; then return; fi
  rm -rf "$out"
  $REDI train --config "$RECIPE" --backend "$BACKEND" --stage "$stage" --model "$model" --data "$data" \
    --output "$out" --max-steps "$steps" --seed "$SEED" "$@"
}
log "SFT from the base model on the first correct traces"
train "$RUN/sft" sft "$MODEL" "$RUN/data/sft.jsonl" "$SFT_STEPS"
log "REDI from the SFT model on the pairs"
train "$RUN/redi" pairs "$RUN/sft/final" "$RUN/data/pairs.jsonl" "$PAIR_STEPS"
# The control: SFT on the pairs' chosen traces with stage 2's settings (same examples, order and steps), as
# redi.config.continued_sft_config builds it for `redi compare`: the recipe's pairs section becomes sft's.
control_sets=$($PYTHON -c 'import sys, yaml
pairs = yaml.safe_load(open(sys.argv[1]))["pairs"]
print(" ".join(f"--set sft.{k}={v}" for k, v in pairs.items() if k != "max_prompt_length"))' "$RECIPE")
log "continued SFT from the SFT model on the chosen traces"
# shellcheck disable=SC2086  # control_sets is a list of words
train "$RUN/continued-sft" sft "$RUN/sft/final" "$RUN/data/pairs.jsonl" "$PAIR_STEPS" $control_sets

evaluate() {  # evaluate ARM MODEL
  local arm=$1 model=$2
  $REDI eval --model "$model" --benchmark "$RUN/problems/eval.jsonl" --output "$RUN/eval/$arm/greedy" \
    --samples 1 --temperature 0 --max-new-tokens "$MAX_TOKENS" --template raw --no-system-prompt \
    --no-force-think --grader math-verify-unboxed --engine native --backend "$BACKEND" --seed "$SEED" --workers 0
  $REDI eval --model "$model" --benchmark "$RUN/problems/eval.jsonl" --output "$RUN/eval/$arm/t0.6" \
    --samples "$EVAL_SAMPLES" --temperature 0.6 --top-p 0.95 --max-new-tokens "$MAX_TOKENS" --template raw \
    --no-system-prompt --no-force-think --grader math-verify-unboxed --engine native --backend "$BACKEND" \
    --seed "$SEED" --workers 0
}
for arm in base sft redi continued-sft; do
  log "evaluate $arm"
  if [ "$arm" = base ]; then evaluate base "$MODEL"; else evaluate "$arm" "$RUN/$arm/final"; fi
done

$PYTHON -m redi.experiments.real_model "$RUN"
log "done"
