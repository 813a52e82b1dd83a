#!/usr/bin/env bash
# Every GPU figure of issue 11 in one run (about 8 minutes on an H200), InternLM2-1.8B's shape
# with random weights, bf16:
#   1. bench/gpu_check.py  where the bot path's time goes, variant by variant (the table)
#   2. bench/streaming.py  bot ÷ raw generate and added first-token latency (goals ≥ 0.97, ≤ 20 ms)
#   3. bench/batching.py   aggregate tokens/s at N = 16 vs N = 1 (goal ≥ 10×), bot ÷ ceiling,
#                          a late arrival's first token
# Each step's output goes to $OUT (or bench/results-gpu/) as a text file.
#
#   bench/gpu_all.sh                 on the GPU machine, from the project root
#   bench/gpu_all.sh --cpu-dry-run   here: the same three steps with small shapes on the CPU
#
# The GPU machine reaches no package registry and its python3 has other versions of
# transformers and no pydantic: run bench/gpu_wheels.sh here first (it fills .whl/), carry .whl,
# and this script installs those wheels into /tmp/site before it starts.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
PY=${PYTHON:-python3}
if [ "$MODE" = "--cpu-dry-run" ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
RESULTS=${OUT:-bench/results-gpu}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export BENCH_MODEL_CACHE=${BENCH_MODEL_CACHE:-/tmp/bench-models}  # one random model for all three steps
if [ "$MODE" != "--cpu-dry-run" ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$MODE" = "--cpu-dry-run" ]; then
  DEVICE=(--device cpu --dtype float32)
  CHECK=(--hidden 256 --layers 4 --heads 4 --kv-heads 2 --intermediate 512 --tokens 30 --repeats 1)
  STREAM=(--hidden 256 --layers 4 --tokens 30 --repeats 1)
  BATCH=(--models internlm2-1.8b --hidden 256 --layers 4 --tokens 16 --repeats 1)
else
  DEVICE=(--device cuda --dtype bfloat16)
  CHECK=(--tokens 100 --repeats 3)  # its default shape is InternLM2-1.8B's
  STREAM=(--internlm2-1.8b --tokens 200 --repeats 3)
  BATCH=(--models internlm2-1.8b --tokens 128 --repeats 2)
fi
"$PY" - <<'PY' 2>&1 | tee "$RESULTS/environment.txt"
import platform, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, {gpu}")
PY
status=0
"$PY" bench/gpu_check.py "${DEVICE[@]}" "${CHECK[@]}" 2>&1 | tee "$RESULTS/gpu_check.txt" || status=1
"$PY" bench/streaming.py --skip-tiny "${DEVICE[@]}" "${STREAM[@]}" 2>&1 | tee "$RESULTS/streaming.txt" || status=1
"$PY" bench/batching.py "${DEVICE[@]}" "${BATCH[@]}" --users 1,16 2>&1 | tee "$RESULTS/batching.txt" || status=1
echo "results in $RESULTS/ (exit $status)"
exit $status
