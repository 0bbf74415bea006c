#!/usr/bin/env bash
# The GPU checks in one run: the CUDA tests (pytest -m gpu) and the optimiser benchmark with
# --device cuda, each under its own time limit so that one that hangs leaves the other its time
# (about 12 minutes at most). Logs go to OUT (default runs/gpu-checks): gpu.txt, cuda-tests.txt,
# bench_optimizer-cuda.txt. Exit status 0 when both passed, 1 when one failed or ran out of
# time, 2 when torch sees no CUDA device (nothing is run).
#
#   bash scripts/gpu-checks.sh [OUT]
#
# The interpreter: $PYTHON, else .venv/bin/python when its torch sees a GPU, else python3
# (scripts/setup.sh installs a CUDA build with QUOTOPT_TORCH_INDEX, see there).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu-checks}"
sees_gpu() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
py="${PYTHON:-}"
if [ -z "$py" ]; then
    py=python3
    [ -x .venv/bin/python ] && py=.venv/bin/python
    sees_gpu "$py" || ! sees_gpu python3 || py=python3
fi
if ! sees_gpu "$py"; then
    torch=$("$py" -c "import torch; print('torch', torch.__version__)" 2>/dev/null || echo "no torch")
    echo "gpu-checks: $py ($torch) sees no CUDA device; nothing was run" >&2
    exit 2
fi
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$py" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda)"; } > "$out/gpu.txt"
cat "$out/gpu.txt"
status=0
timeout 240 "$py" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$out/cuda-tests.txt" || status=1
timeout 480 "$py" -m benchmarks.bench_optimizer --device cuda --budget 420 2>&1 \
    | tee "$out/bench_optimizer-cuda.txt" || status=1
exit "$status"
