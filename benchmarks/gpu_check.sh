#!/usr/bin/env bash
# The GPU checks of issue 6 as one prepared run for the device machine (its image has torch + transformers +
# pytest, not the service's dependencies; the engine is benchmarked in-process). Writes under $OUT (or ./gpu-out).
#
#   here, once:  bash benchmarks/gpu_prepare.sh   (after `make install`: the tokenizer in .gpu-tok/, the llguidance
#                wheel in .whl/, both git-ignored; it fails here, before any device time is spent, if either is missing)
#   device run:  PART=1 bash benchmarks/gpu_check.sh (run timeout_s 600), then, with device time left, PART=2;
#                carry [".gpu-tok", ".whl"]
#
# A session has 15 minutes of device time in all, machine starts included, so the stages run most important first
# and each gets only the time left before DEADLINE (seconds from the start; default 570, inside one 600 s call;
# for PART=2 set it to the device time left minus ~30 s), and at most its own cap, so one slow stage (a long
# compile) cannot eat the others' time. A stage that would not fit is skipped and says so; a stage that fails does
# not stop the next. Send PART=2 within ~30 s of PART=1 returning: an idle machine is handed back.
#   PART=1: 1. issue 6's GPU targets: SmolLM2-135M's shape, random bf16 weights, 64 tenants each with its own
#              prefix of 32, prompts 128, 128 new tokens, systems a (first 4 requests; sequential), b, c, d, e
#              (static cache, compiled); the table, the ratios and the engine's prefill / decode step times.
#           2. CUDA-path tests: CUDA-graph decode == eager == transformers (fp32), both kernel choices, async decode
#              follow-ups without host syncs, bf16 Triton kernels against the torch ops, the engine thread.
#           3. the ablation of system d: torch ops instead of the Triton kernels, and/or async decode off.
#   PART=2: 4. --profile of system d (torch.profiler for the prompt steps and for decode steps, cProfile of the host).
#           5. a ~1B config (Llama-3.2-1B shape), systems b, c, d, e.
set -u
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
PART="${PART:-1}"
case "$PART" in 1 | 2) ;; *) echo "PART must be 1 or 2, not $PART" >&2; exit 2 ;; esac
DEADLINE="${DEADLINE:-570}"
if [ ! -f .gpu-tok/tokenizer.json ]; then  # the device reaches no model hub: the benchmark needs this carried
  echo "no .gpu-tok/tokenizer.json: run benchmarks/gpu_prepare.sh here first and carry it" >&2
  exit 2
fi
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (llguidance for the structured-outputs CUDA test)
  # (a wheel is a zip: unpacked without pip if the image's python has none)
  { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" /tmp/site; done; } && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
# (at most 8 files come back from $OUT: the stages' logs and the two reports)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/stages.txt"
"$PY" -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/stages.txt"
echo "C compilers (Triton builds its launchers with one): $(command -v gcc cc clang | tr '\n' ' ')" | tee -a "$OUT/stages.txt"
# without a usable GPU every stage would "pass" (CUDA tests skipped, systems failed): stop before spending the time
TMP=$(mktemp -d)
# (an op run on it: torch built without kernels for this GPU reports it available all the same)
"$PY" -c "import sys, torch; ok = torch.cuda.is_available() and torch.ones(1, device='cuda').add_(1).item() == 2; print('CUDA usable:', ok, torch.cuda.get_device_capability() if ok else ''); sys.exit(0 if ok else 1)" \
  > "$TMP/cuda.txt" 2>&1
cuda_rc=$?
tee -a "$OUT/stages.txt" < "$TMP/cuda.txt"
if [ "$cuda_rc" != 0 ]; then
  echo "torch sees no usable CUDA device: nothing to measure" | tee -a "$OUT/stages.txt"
  exit 3
fi

# stage NAME NEED CAP LOG CMD...: run CMD (output to the terminal and to $OUT/LOG) if NEED seconds are left before
# the deadline, killed after CAP seconds or at the deadline, whichever comes first
stage() {
  local name="$1" need="$2" cap="$3" log="$4"
  shift 4
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$need" ]; then
    echo "=== $name: skipped ($left s left, needs about $need s)" | tee -a "$OUT/stages.txt"
    return
  fi
  local limit=$((left < cap ? left : cap))
  echo "=== $name (at ${SECONDS}s, ${left}s left, limit ${limit}s)" | tee -a "$OUT/stages.txt"
  local t0=$SECONDS out="$TMP/stage.log"
  : > "$out"
  timeout -k 10 "$limit" "$@" 2>&1 | grep --line-buffered -v -E "it/s\]|s/it\]" | tee -a "$OUT/$log" "$out"
  local rc=${PIPESTATUS[0]}
  # an exit status of 0 can hide what matters: a benchmark system that failed, kernels that fell back to torch ops,
  # tests skipped (no CUDA) rather than passed
  local said
  said=$(grep -o -E "System [a-e] failed|Triton kernels off|[0-9]+ (passed|failed|skipped|errors?)" "$out" \
    | sort -u | paste -sd ';' -)
  echo "=== $name: rc $rc, $((SECONDS - t0)) s${said:+ [$said]}" | tee -a "$OUT/stages.txt"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}
FAILED=0

BENCH=("$PY" benchmarks/bench_engine.py --device cuda --tenants 64 --requests 64 --prefix-len 32 --prompt-len 128
  --new-tokens 128 --tokenizer .gpu-tok)
if [ "$PART" = 1 ]; then
  stage "135M shape, systems a-e" 150 300 bench-135m.log "${BENCH[@]}" --model smollm2-135m-config \
    --systems a,b,c,d,e --naive-requests 4 --out "$OUT/gpu-smollm2-135m-config.md"
  TIMEOUT=()  # a per-test limit where pytest-timeout is installed (the stage's cap holds either way)
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT=(--timeout 120); fi
  stage "CUDA-path tests" 120 240 cuda-tests.log "$PY" -m pytest --noconftest -q -rs -p no:cacheprovider -o addopts="" \
    "${TIMEOUT[@]}" tests/test_engine_cuda.py tests/test_triton_kernels.py
  for abl in "torch off" "triton off" "torch on"; do
    set -- $abl
    stage "ablation d: kernels $1, async decode $2" 45 90 ablation.log "${BENCH[@]}" --model smollm2-135m-config \
      --systems d --kernels "$1" --async-decode "$2"
  done
else
  stage "profile of system d" 90 180 profile-d.log "${BENCH[@]}" --model smollm2-135m-config --systems d \
    --profile --out "$OUT/gpu-135m-d-profile.md"
  stage "1B config, systems b-e" 150 300 bench-1b.log "${BENCH[@]}" --model llama-1b-config --systems b,c,d,e \
    --out "$OUT/gpu-llama-1b-config.md"
fi
cat "$OUT/stages.txt"
[ "$FAILED" = 0 ] || { echo "$FAILED stage(s) ended with a non-zero status" >&2; exit 1; }
