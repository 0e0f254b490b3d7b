#!/usr/bin/env bash
# The one prepared GPU check of the torch backend: run from the repo root on a machine with an NVIDIA GPU.
#
#   scripts/gpu_check.sh [all|tests|bench4k|bench16k|fsdp2|profile|evalnative|generate]...
#       (default: all = tests bench4k bench16k fsdp2 profile evalnative; cpugates, longest and generate on demand)
#
# 1. installs the wheels carried in .whl/ (trl, datasets and their missing dependencies) into /tmp/site,
#    and this repo (editable, no dependencies; a symlink fallback if pip cannot build it offline);
# 2. tests: the CUDA tests (tests/test_cuda.py), then the CPU gates again under this machine's torch and
#    transformers (packing, log-probs, 2-process gloo/FSDP2);
# 3. bench4k / bench16k (issue 18): scripts/bench.py --with-trl at max length 4,096 and 16,384, 20 timed steps
#    after 5 warm-up on both sides; TRL's CPO-SimPO (scripts/bench_trl.py, one process per setting) with
#    gradient checkpointing on and off; ours eager, compile=true, and compiled at the memory targets (auto:24 at
#    4k, auto:40 at 16k); fsdp2: torchrun --nproc-per-node 1 (FSDP2 over NCCL) with compile=true at 4k;
#    profile: torch.profiler over one compiled step at 4k (top 15 kernels, profile-4096.md); longest (on
#    demand): the longest pair that fits. Two calls fit one 15-minute lease (docs/cuda.md, "The GPU check").
# 4. evalnative (issue 13): scripts/bench_eval.py, the native eval engine on a random Qwen2.5-1.5B shape
#    (a 90-token vocabulary: the real model's 151,936-row LM head is not in this number).
# Everything is written under $OUT (default ./gpu-out): gpu_check.log, env.txt, cuda_tests.log,
# bench-4096.{md,json}, bench-16384.{md,json}, bench-fsdp2-4096.{md,json}, profile-4096.md. Each phase has
# its own time limit, so a slow phase cannot eat the others.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
log() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(all)
want() { for p in "${PHASES[@]}"; do [ "$p" = all ] || [ "$p" = "$1" ] && return 0; done; return 1; }

# ---------------------------------------------------------------- setup
log "setup"
if ls .whl/*.whl >/dev/null 2>&1; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        log "installed wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
    else
        log "WARNING: installing .whl/ failed (TRL comparisons will report errors)"
    fi
fi
if ! $PY -c "import redi.backends.torch_cuda.backend" 2>/dev/null; then
    if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1; then
        # No build backend offline: make the package layout by hand (redi.backends -> backends/, ...).
        for d in backends cli configs; do [ -e "redi/$d" ] || ln -s "../$d" "redi/$d"; done
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
        log "redi importable through symlinks (pip -e failed)"
    fi
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY - <<'EOF'
import importlib, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("transformers", "trl", "datasets", "accelerate", "pyarrow", "fsspec", "huggingface_hub", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # noqa: BLE001
        print(name, "NOT IMPORTABLE:", type(err).__name__, str(err)[:200])
import redi.backends.torch_cuda.backend as b
print("redi backend from", b.__file__)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"
# ---------------------------------------------------------------- tests
# Phase limits (seconds) fit one call inside a 15-minute device lease: T_TESTS, T_4K, T_16K.
if want tests; then
    log "CUDA tests"
    timeout ${T_TESTS:-90} $PY -m pytest -q -rA -s -p no:cacheprovider tests/test_cuda.py >"$OUT/cuda_tests.log" 2>&1
    log "CUDA tests exit $? ($(tail -1 "$OUT/cuda_tests.log"))"
fi
if want cpugates; then  # the CPU gates under this machine's torch/transformers (not in 'all': checked off-device)
    timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_packing.py tests/test_torch_logps.py \
        tests/test_distributed.py >>"$OUT/cuda_tests.log" 2>&1
    log "CPU gates exit $? ($(tail -1 "$OUT/cuda_tests.log"))"
fi

# ------------------------------------------------ training benchmarks (issue 18: window, TRL, compile, FSDP2)
# Both sides: $STEPS timed steps after $WARMUP warm-up steps (the first ones include compiling). TRL first,
# each setting in its own process and limit, so that TRL's peak is measured on a card nobody else holds.
STEPS=${STEPS:-20}; WARMUP=${WARMUP:-5}
LEN4K="--max-len 4096"; LEN16K="--max-len 16384"; LONGEST="--longest 19800 32768"; SMOKE=""
if [ "$($PY -c 'import torch; print(int(torch.cuda.is_available()))')" != 1 ]; then
    log "no CUDA here: the bench phases run as CPU smoke checks (--tiny)"
    SMOKE=--tiny; LEN4K="--max-len 256"; LEN16K="--max-len 512"; LONGEST="--longest 512"
    export REDI_COMPILE_BACKEND=${REDI_COMPILE_BACKEND:-aot_eager}  # no C++ compile on a CPU smoke run
fi
BENCH="scripts/bench.py $SMOKE --steps $STEPS --warmup $WARMUP --out $OUT"
COMPILED="redi+compile=true"
bench_at() {  # LABEL TIMEOUT "LENGTH FLAGS" TRL_TIMEOUT ACTIVATION_CHECKPOINTING: redi, compiled, and TRL's SimPO
    log "bench at $1"
    timeout "$2" $PY $BENCH $3 --with-trl --trl-runs simpo --trl-settings gc,nogc --trl-timeout "$4" \
        --runs "redi,$COMPILED,$COMPILED+activation_checkpointing=$5+optim_state_dtype=bf16" >>"$LOG" 2>&1
    log "bench $1 exit $?"
}
if want bench4k; then bench_at 4k "${T_4K:-320}" "$LEN4K" 110 auto:24; fi
# TRL's CPO-SimPO ran out of memory at 16k on 2026-11-27; nogc is skipped if gc does
if want bench16k; then bench_at 16k "${T_16K:-400}" "$LEN16K" 120 auto:40; fi
if want fsdp2; then  # one rank under torchrun is still sharded: FSDP2's hooks and NCCL, compiled layers
    log "FSDP2 (torchrun, 1 rank) with compile at 4k"
    timeout ${T_FSDP:-130} $PY -m torch.distributed.run --nproc-per-node 1 --standalone $BENCH $LEN4K \
        --runs "$COMPILED" --stem bench-fsdp2 >>"$LOG" 2>&1
    log "fsdp2 exit $?"
fi
if want profile; then
    log "profile of one compiled step at 4k"
    timeout ${T_PROFILE:-100} $PY scripts/profile_step.py $SMOKE $LEN4K --run "$COMPILED" \
        --out "$OUT/profile-${LEN4K##* }.md" >>"$LOG" 2>&1
    log "profile exit $?"
fi
if want longest && [ "${PHASES[*]}" != all ]; then  # on demand only: measured on 2026-11-27
    timeout ${T_LONGEST:-150} $PY $BENCH $LEN16K --runs "" $LONGEST --stem bench-longest >>"$LOG" 2>&1
    log "longest exit $?"
fi
for f in "$OUT"/bench-*.md; do [ -e "$f" ] && { echo; cat "$f"; } | tee -a "$LOG"; done
# ------------------------------------------------ eval engine (issue 13; separate from the training benches)
# The native engine on a random-init Qwen2.5-1.5B shape: 64 prompts x 4 samples x up to 4,096 new tokens,
# bf16 on the GPU, continuous batching over 256 rows. vLLM is not on the GPU image (its wheel is far over what
# can be carried there), so its side of docs/evaluation.md's H200 estimate is a cited number (docs/evaluation.md).
if want evalnative; then
    log "eval engine: native on qwen2.5-1.5b shape"
    EVAL_ARGS="--engines native --backend cuda --shapes qwen2.5-1.5b --prompts 64 --samples 4 --max-new-tokens 4096 --batch-size 256 --repeats 1"
    [ -n "$SMOKE" ] && EVAL_ARGS="--engines native --backend cpu --shapes tiny --prompts 4 --samples 2 --max-new-tokens 16 --repeats 1"
    timeout ${T_EVAL:-300} $PY scripts/bench_eval.py $EVAL_ARGS 2>&1 | tee "$OUT/bench-eval-native.txt" >>"$LOG"
    log "eval engine exit ${PIPESTATUS[0]}"
fi
# ---------------------------------------------------------------- redi data generate (issue 19)
# Not yet run on a GPU. Native engine (vLLM is not on the GPU image), a random Qwen2.5-1.5B shape, 64 problems
# x 4 samples x 1,024 new tokens, all 256 rows at once: traces/s and tokens/s for docs/generate.md's throughput section.
if [[ " ${PHASES[*]} " == *" generate "* ]]; then  # on demand: the default phases above fill a lease
    GEN="--shape qwen2.5-1.5b --backend cuda --problems 64 --samples 4 --max-new-tokens 1024 --batch-size 256"
    [ -n "$SMOKE" ] && GEN="--shape tiny --backend cpu --problems 8 --samples 2 --max-new-tokens 16"
    log "bench generate"
    timeout ${T_GEN:-240} $PY scripts/bench_generate.py $GEN --json "$OUT/bench-generate.json" \
        >"$OUT/bench-generate.md" 2>>"$LOG"
    log "bench generate exit $?"
fi
[ -e "$OUT/bench-generate.md" ] && cat "$OUT/bench-generate.md" | tee -a "$LOG"
log "done"
