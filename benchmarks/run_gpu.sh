#!/usr/bin/env bash
# Everything a GPU session does, in one device call: build the CUDA extension against the machine's
# torch, run the whole test suite (bf16 and large shapes included), the main job, the benchmarks and
# the report. Results land in ${OUT:-benchmarks/results/run} (the device tool's $OUT comes back).
#   bash benchmarks/run_gpu.sh            # on the device: run({"command": "bash benchmarks/run_gpu.sh"})
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/run}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PY="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u
} > "$OUT/env.txt" 2>&1
$PY -m pip install --quiet --no-build-isolation -e . > "$OUT/build.log" 2>&1 || echo "extension build FAILED" >> "$OUT/env.txt"
$PY -m twins_kernels > "$OUT/main_job.txt" 2>&1
TWINS_KERNELS_REQUIRE_EXTENSION=1 timeout 1500 $PY -m pytest tests/ -q -x --durations=15 > "$OUT/tests.txt" 2>&1
$PY -m pytest benchmarks/ --benchmark-only -q --benchmark-json="$OUT/benchmarks.json" > "$OUT/benchmarks.txt" 2>&1
$PY benchmarks/report.py "$OUT/benchmarks.json" --out "$OUT" >> "$OUT/benchmarks.txt" 2>&1
tail -3 "$OUT/tests.txt" "$OUT/main_job.txt"
