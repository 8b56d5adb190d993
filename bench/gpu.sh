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
# Each step runs under its own time limit and a step that fails or runs out of time is reported in summary.txt
# while the others still run: a lent device gives one call of at most 10 minutes (bench/device_run.sh), so the
# limits on GPU add up to 9 minutes (T_* below; BENCH_TIME_SCALE multiplies them all, e.g. 3 on a slower GPU).
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
  # seconds per step: the service job, train_step, serve, each scaling run, each co-training run
  T_SERVICE=120 T_TRAIN=75 T_SERVE=60 T_SCALING=(75 90) T_COTRAIN=(45 75)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/machine.txt"
else
  NPROC=2
  DEVICE=cpu
  STEPS=${BENCH_STEPS:-20}
  TRAIN_ARGS=(--model tiny --steps 2 --warmup 1 --batch 2 --seq 32 --gen-tokens 4 --gen-reps 1 --no-peft)
  SERVE_ARGS=(--model tiny --device cpu --new-tokens 8 --repeats 1)
  SCALING_RUNS=("--model tiny --device cpu --world 2 --batch 2 --seq 64 --steps 2 --warmup 1")
  COTRAIN_RUNS=("--model tiny --jobs 2 --steps 3 --threads 1")
  T_SERVICE=240 T_TRAIN=120 T_SERVE=120 T_SCALING=(180) T_COTRAIN=(180)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
{ echo "mode=$MODE processes=$NPROC host=$(hostname) cpus=$(getconf _NPROCESSORS_ONLN)"; "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } >> "$OUT/machine.txt"
echo "bench/gpu.sh: $MODE, $NPROC processes, results in $OUT" >&2
export PYTHONUNBUFFERED=1  # a step stopped at its limit still leaves what it printed
SCALE=${BENCH_TIME_SCALE:-1}
STATUS=()
# limit SECONDS NAME COMMAND...: runs COMMAND under SECONDS x BENCH_TIME_SCALE, records how it ended, never fails
# (called without a pipe, so STATUS stays in this shell; redirect its output at the call)
limit() {
  local secs=$(( $1 * SCALE )) name=$2 rc=0
  shift 2
  timeout --kill-after=10 "$secs" "$@" || rc=$?
  if [[ $rc -eq 0 ]]; then STATUS+=("$name: ok")
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then STATUS+=("$name: stopped at its ${secs} s limit (partial output kept)")
  else STATUS+=("$name: failed (exit $rc)"); fi
  return 0
}

# --- 1. the service on this device, one job on every device ---------------------------------------------------
export BONE_DATA_DIR=$DATA BONE_PORT=$PORT BONE_DEVICE=$DEVICE BONE_AUTH_DISABLED=true BONE_HOST=127.0.0.1
export BONE_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0  # nothing there: `up` starts a private redis-server
export BONE_MAX_NUM_PROCESSES=$NPROC BONE_BASE_MODEL=${BONE_BASE_MODEL:-embedded}
"$PY" -m cli up > "$OUT/service.log" 2>&1 &
UP_PID=$!
cleanup() { kill "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT

limit "$T_SERVICE" "service job" "$PY" - "$PORT" "$NPROC" "$STEPS" "$OUT" <<'EOF'
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
limit "$T_TRAIN" "train_step" "$PY" bench/train_step.py "${TRAIN_ARGS[@]}" > "$OUT/train_step.txt" 2>&1
limit "$T_SERVE" "serve" "$PY" bench/serve.py "${SERVE_ARGS[@]}" > "$OUT/serve.txt" 2>&1
# DDP scaling 1 -> N devices, FSDP peak memory and bf16 step time on real shapes (bench/scaling.py)
for i in "${!SCALING_RUNS[@]}"; do
  args=${SCALING_RUNS[$i]}
  read -r -a words <<< "$args"
  echo "== bench/scaling.py $args" >> "$OUT/scaling.txt"
  limit "${T_SCALING[$i]}" "scaling $args" "$PY" bench/scaling.py "${words[@]}" >> "$OUT/scaling.txt" 2>&1
done
# co-training: 8 jobs of 60 steps in one group vs one after another (bench/cotrain.py)
for i in "${!COTRAIN_RUNS[@]}"; do
  args=${COTRAIN_RUNS[$i]}
  read -r -a words <<< "$args"
  echo "== bench/cotrain.py $args" >> "$OUT/cotrain.txt"
  limit "${T_COTRAIN[$i]}" "cotrain $args" "$PY" bench/cotrain.py "${words[@]}" >> "$OUT/cotrain.txt" 2>&1
done

show() { if [[ -f $1 ]]; then tail -n "${2:-1000}" "$1"; else echo "(no $(basename "$1"))"; fi; }
{ cat "$OUT/machine.txt"; echo; printf '%s\n' "${STATUS[@]}"; echo
  if [[ -f "$OUT/job.json" ]]; then
    python3 -c "import json; j=json.load(open('$OUT/job.json')); print('job', j['job']['status'], json.dumps(j['job']['metrics']), 'wall_s', round(j['wall_s'], 1))" || true
  fi
  echo; echo "== bench/train_step.py ${TRAIN_ARGS[*]}"; show "$OUT/train_step.txt" 25
  echo; echo "== bench/serve.py ${SERVE_ARGS[*]}"; show "$OUT/serve.txt" 25
  echo; show "$OUT/scaling.txt" | grep -E "^(==|\(no|model|DDP|FSDP)" || true; echo; show "$OUT/cotrain.txt" 60; } > "$OUT/summary.txt"
cat "$OUT/summary.txt"
