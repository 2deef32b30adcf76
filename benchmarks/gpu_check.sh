#!/usr/bin/env bash
# The GPU checks of issue 6 as one prepared run for the device machine (its image has torch + transformers +
# pytest, not the service's dependencies; the engine is benchmarked in-process). Writes under $OUT (or ./gpu-out).
#
#   here, once:  echo /.gpu-tok/ >> .git/info/exclude; mkdir -p .gpu-tok
#                cp ~/.cache/prefixserve/models/smollm2-135m-instruct/tokenizer* .gpu-tok/   (after `make install`)
#                echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#                  --python-version 3.12 --implementation cp --platform manylinux_2_31_x86_64 -d .whl llguidance==1.9.1
#   device run:  PART=1 bash benchmarks/gpu_check.sh, then PART=2 (each within one 600 s call; without PART, both),
#                with carry [".gpu-tok", ".whl"]
#
# 1. CUDA-path tests: CUDA-graph decode == eager == transformers (fp32), no host sync inside a decode step, bf16,
#    structured-output rows on graphed steps.
# 2. Issue 6 GPU targets: SmolLM2-135M's shape, random bf16 weights, 64 tenants each with its own prefix of 32,
#    prompts 128, 128 new tokens, systems a (first 8 requests; sequential), b, c, d, e (static cache, compiled).
# 3. Ablation, system d only: torch ops instead of the Triton kernels, and/or async decode off.
# 4. The same with a ~1B config (Llama-3.2-1B shape), systems b, c, d, e.
set -u
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (llguidance for the structured-outputs CUDA test)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
PART="${PART:-all}"  # 1: tests + the 135M run; 2: ablation + the 1B run (each fits one 10-minute device call)
if [ "$PART" != 2 ]; then
timeout 240 "$PY" -m pytest --noconftest -q -p no:cacheprovider -o addopts="" tests/test_engine_cuda.py tests/test_triton_kernels.py 2>&1 \
  | tee "$OUT/cuda-tests.log"
timeout 300 "$PY" benchmarks/bench_engine.py --device cuda --model smollm2-135m-config --tenants 64 --requests 64 \
  --prefix-len 32 --prompt-len 128 --new-tokens 128 --systems a,b,c,d,e --naive-requests 8 --tokenizer .gpu-tok \
  --out "$OUT/gpu-smollm2-135m-config.md" 2>&1 | tail -40 | tee "$OUT/bench-135m.log"
fi
[ "$PART" = 1 ] && exit 0
for abl in "torch off" "triton off" "torch on"; do  # ablation of the CUDA fast path: kernels, async decode
  set -- $abl
  timeout 90 "$PY" benchmarks/bench_engine.py --device cuda --model smollm2-135m-config --tenants 64 --requests 64 \
    --prefix-len 32 --prompt-len 128 --new-tokens 128 --systems d --kernels "$1" --async-decode "$2" \
    --tokenizer .gpu-tok --out "$OUT/gpu-135m-d-kernels-$1-async-$2.md" 2>&1 | tail -3 | tee -a "$OUT/ablation.log"
done
timeout 180 "$PY" benchmarks/bench_engine.py --device cuda --model llama-1b-config --tenants 64 --requests 64 \
  --prefix-len 32 --prompt-len 128 --new-tokens 128 --systems b,c,d,e --tokenizer .gpu-tok \
  --out "$OUT/gpu-llama-1b-config.md" 2>&1 | tail -40 | tee "$OUT/bench-1b.log"
