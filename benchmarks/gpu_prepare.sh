#!/usr/bin/env bash
# Host-side preparation of benchmarks/gpu_check.sh's carried files (run here, before the device `run`; idempotent):
# the SmolLM2 tokenizer in .gpu-tok/ (the device reaches no model hub) and the llguidance wheel in .whl/ (the
# structured-outputs CUDA test), both git-ignored through .git/info/exclude so that `run` carries them only when
# named in `carry`. Exits non-zero, before any device time is spent, if either is missing afterwards.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .git/info
for d in /.gpu-tok/ /.whl/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
if [ ! -f .gpu-tok/tokenizer.json ]; then
  src="${PREFIXSERVE_CACHE:-$HOME/.cache/prefixserve}/models/smollm2-135m-instruct"
  if [ ! -f "$src/tokenizer.json" ]; then
    .venv/bin/python -c "from server.model.loader import ensure_embedded_converted as e; e()"
  fi
  mkdir -p .gpu-tok
  cp "$src"/tokenizer* .gpu-tok/
fi
if ! ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 -d .whl llguidance==1.9.1
fi
# the code the device run runs (it gets the working tree without .git): its reports name it (benchmarks/common.py)
{ git rev-parse --short=12 HEAD | tr -d '\n'; [ -z "$(git status --porcelain --untracked-files=no)" ] || printf '+dirty'; } \
  > .gpu-tok/COMMIT
test -f .gpu-tok/tokenizer.json && ls .whl/*.whl >/dev/null
echo "ready: carry [\".gpu-tok\", \".whl\"]; $(du -sh .gpu-tok .whl | tr '\n' ' ')"
