#!/usr/bin/env bash
# Serves two exported Bone adapters with vLLM on a GPU and compares greedy outputs with ours
# (bench/vllm_check.py). Needs a CUDA GPU and vLLM: `pip install vllm` in the same environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
"$PY" -c "import vllm" 2>/dev/null || { echo "bench/vllm_check.sh: vLLM is not installed (pip install vllm)" >&2; exit 2; }
exec "$PY" bench/vllm_check.py "$@"
