#!/usr/bin/env bash
# The GPU path, run once end to end on a GPU machine:
#   1. `bone-server up` (API + one worker + a private Redis) on CUDA, then one fine-tuning job with
#      training.num_processes = the GPU count (NCCL, one rank per GPU), timed, its metrics printed;
#   2. bench/train_step.py and bench/serve.py (--device cuda); bench/scaling.py: DDP scaling 1 -> N GPUs, FSDP peak
#      memory and bf16 step time on a 0.5 B- and a 7 B-shaped model; bench/cotrain.py: 8 jobs in one co-training
#      group vs one after another, on the small and the 0.5 B-shaped model.
# Everything lands in $BENCH_OUT (default bench-results/gpu-<UTC time>): logs, job.json, *.txt, summary.txt.
#
#   bench/gpu.sh            # on a GPU machine (nvidia-smi on PATH)
#   bench/gpu.sh --cpu      # dry run of the same steps on the CPU: 2 gloo processes, tiny sizes (~2-4 min)
#
# Environment: PYTHON (default .venv/bin/python, else python3), BONE_BASE_MODEL (default: embedded),
# BENCH_STEPS (job steps; default 200 on GPU, 20 with --cpu), BENCH_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
OUT=${BENCH_OUT:-bench-results/${MODE}-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DATA=$(mktemp -d)
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REDIS_PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

if [[ $MODE == gpu ]]; then
  command -v nvidia-smi >/dev/null || { echo "bench/gpu.sh: no nvidia-smi; use --cpu for a dry run" >&2; exit 2; }
  NPROC=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
  DEVICE=cuda
  STEPS=${BENCH_STEPS:-200}
  TRAIN_ARGS=(--model small --steps 10 --batch 8 --seq 512 --device cuda)
  SERVE_ARGS=(--model small --device cuda --new-tokens 64 --repeats 5)
  SCALING_RUNS=("--model 0.5b --batch 4 --seq 1024" "--model 7b --batch 1 --seq 1024")
  COTRAIN_RUNS=("--device cuda --model small" "--device cuda --model 0.5b")
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/machine.txt"
else
  NPROC=2
  DEVICE=cpu
  STEPS=${BENCH_STEPS:-20}
  TRAIN_ARGS=(--model tiny --steps 2 --warmup 1 --batch 2 --seq 32 --gen-tokens 4 --gen-reps 1 --no-peft)
  SERVE_ARGS=(--model tiny --device cpu --new-tokens 8 --repeats 1)
  SCALING_RUNS=("--model tiny --device cpu --world 2 --batch 2 --seq 64 --steps 2 --warmup 1")
  COTRAIN_RUNS=("--model tiny --jobs 2 --steps 3 --threads 1")
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
{ echo "mode=$MODE processes=$NPROC host=$(hostname) cpus=$(getconf _NPROCESSORS_ONLN)"; "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } >> "$OUT/machine.txt"
echo "bench/gpu.sh: $MODE, $NPROC processes, results in $OUT" >&2

# --- 1. the service on this device, one job on every device ---------------------------------------------------
export BONE_DATA_DIR=$DATA BONE_PORT=$PORT BONE_DEVICE=$DEVICE BONE_AUTH_DISABLED=true BONE_HOST=127.0.0.1
export BONE_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0  # nothing there: `up` starts a private redis-server
export BONE_MAX_NUM_PROCESSES=$NPROC BONE_BASE_MODEL=${BONE_BASE_MODEL:-embedded}
"$PY" -m cli up > "$OUT/service.log" 2>&1 &
UP_PID=$!
cleanup() { kill "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT

"$PY" - "$PORT" "$NPROC" "$STEPS" "$OUT" <<'EOF'
import json, sys, time
import httpx

port, nproc, steps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
url = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 600
while True:
    try:
        if httpx.get(url + "/readyz", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit("service not ready; see service.log")
    time.sleep(1)
with httpx.Client(base_url=url, timeout=60) as client:
    while not client.get("/workers").json()["data"]:
        time.sleep(1)
    workers = client.get("/workers").json()["data"]
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?\n", "completion": f"It is {2 * i}."} for i in range(256)]
    body = {"adapter_name": "gpu-bench", "dataset": {"records": rows}, "bone": {"r": 16},
            "training": {"max_steps": steps, "batch_size": 8 * nproc, "max_seq_length": 64, "learning_rate": 1e-3,
                         "num_processes": nproc}}
    created = client.post("/jobs", json=body)
    created.raise_for_status()
    job_id, started = created.json()["id"], time.monotonic()
    while (job := client.get(f"/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(1)
    wall = time.monotonic() - started
    json.dump({"job": job, "workers": workers, "wall_s": wall}, open(f"{out}/job.json", "w"), indent=2)
    m = job["metrics"]
    print(f"job {job['status']}: {nproc} processes, {m.get('steps')} steps, {m.get('train_tokens')} tokens in "
          f"{m.get('train_runtime_s')} s of training ({wall:.1f} s wall), "
          f"{(m.get('train_tokens') or 0) / max(m.get('train_runtime_s') or 1e-9, 1e-9):.0f} tokens/s, "
          f"loss {m.get('train_loss_first')} -> {m.get('train_loss')}" + (f"; error: {job['error']}" if job["error"] else ""))
    sys.exit(0 if job["status"] == "succeeded" else 1)
EOF
cleanup
trap - EXIT

# --- 2. the bench/ benchmarks -----------------------------------------------------------------------------------
"$PY" bench/train_step.py "${TRAIN_ARGS[@]}" > "$OUT/train_step.txt" 2>&1
"$PY" bench/serve.py "${SERVE_ARGS[@]}" > "$OUT/serve.txt" 2>&1
# DDP scaling 1 -> N devices, FSDP peak memory and bf16 step time on real shapes (bench/scaling.py)
for args in "${SCALING_RUNS[@]}"; do
  read -r -a words <<< "$args"
  { echo "== bench/scaling.py $args"; "$PY" bench/scaling.py "${words[@]}" 2>&1 | grep -E "^(model|DDP|FSDP)"; } >> "$OUT/scaling.txt"
done
# co-training: 8 jobs of 60 steps in one group vs one after another (bench/cotrain.py)
for args in "${COTRAIN_RUNS[@]}"; do
  read -r -a words <<< "$args"
  { echo "== bench/cotrain.py $args"; "$PY" bench/cotrain.py "${words[@]}" 2>&1 | tail -n 6; } >> "$OUT/cotrain.txt"
done

{ cat "$OUT/machine.txt"; echo; python3 -c "import json; j=json.load(open('$OUT/job.json')); print('job', j['job']['status'], json.dumps(j['job']['metrics']), 'wall_s', round(j['wall_s'], 1))"
  echo; echo "== bench/train_step.py ${TRAIN_ARGS[*]}"; tail -n 25 "$OUT/train_step.txt"
  echo; echo "== bench/serve.py ${SERVE_ARGS[*]}"; tail -n 25 "$OUT/serve.txt"
  echo; cat "$OUT/scaling.txt"; echo; cat "$OUT/cotrain.txt"; } > "$OUT/summary.txt"
cat "$OUT/summary.txt"
