#!/usr/bin/env bash
# One GPU check on a CUDA machine, without Ray: tests/gpu, the 1B GPT's MFU, ResNet-50
# images/s and the 1B model's memory vs `temper plan`; writes one summary table
# (gpu-check.md, or --out PATH). Uses $PYTHON (default: .venv/bin/python if present, else
# python3), which needs CUDA torch and this repository's dependencies but not Ray.
# Arguments go to benchmarks/gpu_check.py (--steps N, --out PATH, --skip-tests).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT/platform:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# 8 minutes for everything; the script's own phases stop earlier.
exec timeout 480 "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$@"
