#!/usr/bin/env bash
# One GPU check of hybridtrt (benchmarks/gpu/README.md): build, GPU tests, bf16/FP8 engines against ONNX Runtime,
# double plugin load, a static-cache engine with CUDA graphs, scan timings — one JSON, at most ten minutes.
#
#   bash benchmarks/gpu/check.sh [--out PATH] [--only STEP,...] [--total-budget S] [--keep]
#
# Writes $OUT/gpu_check.json when $OUT is set (the device machine), else benchmarks/gpu/check.json.
# Exit code 0 when no step failed (skipped steps are not failures), 1 when one did.
# Python: $HYBRIDTRT_PYTHON, else the checkout's .venv, else python3 (the device image's, which holds torch).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
if [ -n "${HYBRIDTRT_PYTHON:-}" ]; then
  PY="$HYBRIDTRT_PYTHON"
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY="$(command -v python3 || command -v python)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The driver keeps its own 590 s budget; this outer limit only stops a driver that hangs.
exec timeout --kill-after=10 600 "$PY" benchmarks/gpu/check.py "$@"
