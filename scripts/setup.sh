#!/usr/bin/env bash
# Create the virtual environment at .venv (repository root) and install quotopt into it.
#
# torch is installed first and on its own, so that an unpinned dependency never pulls a
# multi-gigabyte CUDA build by accident:
#   1. a torch already importable in .venv is kept;
#   2. QUOTOPT_TORCH="torch==X.Y.Z" (or any pip requirement) installs exactly that;
#   3. a torch wheel that pip can find without an index (pip's find-links, e.g. a wheel
#      cache shipped with the machine) is used as it is;
#   4. otherwise the CPU build from QUOTOPT_TORCH_INDEX (default: PyTorch's CPU index).
# GPU users: QUOTOPT_TORCH_INDEX=https://download.pytorch.org/whl/cu126 bash scripts/setup.sh
# EXTRAS selects the optional extras (default: everything the tests and the CLI use).
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${QUOTOPT_TORCH:-}" ]; then
        pip install "$QUOTOPT_TORCH"
    elif pip install --quiet --no-index --no-deps torch 2>/dev/null; then
        echo "setup: using the torch wheel found locally"
    else
        pip install torch --index-url "${QUOTOPT_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
fi
pip install --quiet -e ".[${EXTRAS:-dev,interop,data,cli,hf,lora,docs}]"
.venv/bin/python -c "import torch, quotopt, manifolds; print('setup: torch', torch.__version__, '| quotopt', quotopt.__version__)"
