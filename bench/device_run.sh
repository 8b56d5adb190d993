#!/usr/bin/env bash
# Runs bench/gpu.sh on this workplace's lent GPU machine in one call (see bench/device_wheels.sh first):
#
#   device run, carry [".whl"], timeout_s 600, command: bash bench/device_run.sh
#
# The machine has Python 3.12 with PyTorch (CUDA) but not the service's packages and no way to fetch them:
# this installs the carried wheels into /tmp/site (shadowing the image's older transformers/tokenizers), puts
# the checkout on PYTHONPATH (nothing is pip-installed from it), prints the versions that matter, then runs
# bench/gpu.sh with its results in $OUT/gpu (they come back; 8 files at most, as the tool allows). Each bench
# step has its own time limit inside gpu.sh, 9 minutes in all, so one call of 10 minutes is enough.
#
#   bash bench/device_run.sh --cpu   # here, a dry run of the same path on the CPU (uses .whl/ if present)
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-}
SITE=${DEVICE_SITE:-/tmp/site}
RESULTS=${OUT:-$PWD/bench-results}/gpu
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif [[ $MODE != --cpu ]]; then
  echo "device_run: no .whl/ here: run bench/device_wheels.sh on the dev machine and carry .whl" >&2
  exit 2
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# Fail in seconds, not minutes into the bench, when an import is missing or the GPU is not seen.
"$PY" - "$MODE" <<'EOF'
import importlib, sys

names = ["torch", "transformers", "tokenizers", "datasets", "pyarrow", "fastapi", "rq", "redis", "pydantic_settings"]
versions = {name: getattr(importlib.import_module(name), "__version__", "?") for name in names}
print("device_run:", sys.version.split()[0], " ".join(f"{k}={v}" for k, v in versions.items()))
import torch

if sys.argv[1] != "--cpu":
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    print("device_run:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
import app.main, worker.tasks, cli.redis_launcher  # noqa: E401,F401  the service imports whole

print("device_run: redis-server:", cli.redis_launcher.find_redis_binary())
EOF

mkdir -p "$RESULTS"
PYTHON=$PY BENCH_OUT=$RESULTS bash bench/gpu.sh $MODE
