"""API load: ``POST /jobs`` and ``GET /adapters`` with 1,000 adapters registered, N concurrent clients on
loopback (DESIGN §6: p99 ≤ 50 ms, zero errors); then generation under overload must answer 429s, not time out.

    python -m bench.load [--clients 100] [--requests 2000] [--adapters 1000] [--redis redis://127.0.0.1:6379/9]

Starts its own API (uvicorn in a thread, the embedded model, a temporary data dir) on the given Redis
database, which it flushes: never point it at a database holding data. No worker runs: jobs are validated,
stored and queued, which is what the API promises to do fast. A bounded loop of concurrent httpx requests
(asyncio), not a soak test; figures print as p50/p99/max per route, with errors counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from core.keys import KeyEntry, generate_key, hash_key
from core.registry import AdapterRegistry
from core.settings import Settings

KEY = generate_key()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def register_adapters(settings: Settings, count: int) -> None:
    """``count`` registry entries (one real adapter folder copied under many names: listing reads metadata only)."""
    from tests.app.conftest import publish_adapter

    publish_adapter(settings, "seed-adapter", seed=0)
    registry = AdapterRegistry(settings.registry_dir)
    source = registry.path("seed-adapter")
    meta = json.loads((source / "metadata.json").read_text())
    for i in range(1, count):
        target = registry.root / f"bench-{i:04d}"
        shutil.copytree(source, target)
        (target / "metadata.json").write_text(json.dumps({**meta, "name": target.name, "owner": "bench"}))


async def hammer(
    sessions: list[httpx.AsyncClient], total: int, make_request, rate: float = 0.0
) -> tuple[list[float], dict]:
    """One loop per session (a client with its own connection) sending ``total`` requests among them: back to
    back (closed loop, rate 0), or paced so all together send ``rate`` requests/s (open loop: latency is then
    the server's, not the queue's)."""
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    remaining = total
    begin = time.perf_counter()
    sent = 0

    async def one_client(client: httpx.AsyncClient):
        nonlocal remaining, sent
        while remaining > 0:
            remaining -= 1
            if rate:
                due = begin + sent / rate
                sent += 1
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            started = time.perf_counter()
            try:
                reply = await make_request(client)
                outcome = str(reply.status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            latencies.append(time.perf_counter() - started)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    await asyncio.gather(*(one_client(session) for session in sessions))
    return latencies, outcomes


def report(
    name: str, latencies: list[float], outcomes: dict, seconds: float, ok: set[str], floor_p99: float | None = None
) -> bool:
    ms = [x * 1000 for x in latencies]
    errors = sum(n for code, n in outcomes.items() if code not in ok)
    p99 = percentile(ms, 99)
    print(
        f"{name:<22} n={len(ms):>5}  {len(ms) / seconds:7.0f} req/s  p50 {statistics.median(ms):6.1f} ms  "
        f"p99 {p99:6.1f} ms  max {max(ms):6.1f} ms  errors {errors}  {outcomes}"
    )
    met = errors == 0 and p99 <= 50
    ratio = f"; p99 = {p99 / floor_p99:.1f}x the /healthz floor" if floor_p99 else ""
    print(" " * 23 + "target p99 <= 50 ms, zero errors: " + ("met" if met else "NOT met") + ratio)
    return met


async def run(args, url: str) -> bool:
    headers = {"Authorization": f"Bearer {KEY}"}
    # One httpx client (one keep-alive connection) per simulated client, as N independent callers would be.
    # A single AsyncClient with an N-connection pool is not that: its pool scans every connection for each
    # request, and with 100 connections the generator itself became the bottleneck (/healthz: 200 req/s).
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        sessions = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits))
            for _ in range(args.clients)
        ]
        client = sessions[0]
        counter = iter(range(10**9))

        async def post_job(c):
            return await c.post(
                "/jobs", json={"adapter_name": f"load-{next(counter)}", "dataset": {"records": [{"text": "a row"}]}}
            )

        async def list_adapters(c):
            return await c.get("/adapters")

        first = (await client.get("/adapters")).json()
        print(
            f"{args.adapters} adapters registered (GET /adapters pages them: {len(first['data'])} per page, "
            f"has_more={first['has_more']}); {args.clients} concurrent clients"
        )
        # The floor, measured in the same run: the cheapest route (no Redis, no disk) under the same clients.
        # With N clients back to back, p99 can be no better than N / (requests/s the machine can serve).
        await hammer(sessions, args.clients * 2, lambda c: c.get("/healthz"))
        started = time.perf_counter()
        latencies, outcomes = await hammer(sessions, args.requests, lambda c: c.get("/healthz"))
        report("GET /healthz (floor)", latencies, outcomes, time.perf_counter() - started, {"200"})
        floor_p99 = percentile([x * 1000 for x in latencies], 99)
        passed = True
        routes = {"jobs": ("POST /jobs", post_job), "adapters": ("GET /adapters", list_adapters)}
        for name, request in (routes[key] for key in args.routes):
            await hammer(sessions, min(args.clients * 2, args.requests), request)  # warm-up
            for rate in (0.0, *args.rates):
                started = time.perf_counter()
                latencies, outcomes = await hammer(sessions, args.requests, request, rate)
                label = f"{name} " + (f"@{rate:g}/s" if rate else "flat out")
                passed &= report(
                    label,
                    latencies,
                    outcomes,
                    time.perf_counter() - started,
                    {"200", "202"},
                    floor_p99 if not rate else None,
                )

        # Generation under overload: more concurrent requests than the engine queue holds → fast 429s.
        async def generate(c):
            return await c.post(
                "/generate", json={"prompt": "Once upon a time", "max_new_tokens": 64, "temperature": 0}
            )

        latencies, outcomes = await hammer(sessions, args.clients * 2, generate)
        ms = sorted(x * 1000 for x in latencies)
        timeouts = sum(n for code, n in outcomes.items() if not code.isdigit())
        print(
            f"{'POST /generate (over)':<22} n={len(ms):>5}  {outcomes}  p50 {statistics.median(ms):.0f} ms  "
            f"max {ms[-1]:.0f} ms  timeouts {timeouts}"
        )
        passed &= timeouts == 0 and outcomes.get("429", 0) > 0 and set(outcomes) <= {"200", "429"}
        return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--requests", type=int, default=2000, help="per route")
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument(
        "--rates",
        type=float,
        nargs="*",
        default=[100.0, 300.0],
        help="open-loop request rates (req/s, all clients together) measured after the flat-out run",
    )
    parser.add_argument("--routes", nargs="*", choices=["jobs", "adapters"], default=["jobs", "adapters"])
    parser.add_argument("--redis", default=os.environ.get("BONE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"))
    args = parser.parse_args()

    redis.Redis.from_url(args.redis).flushdb()
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        env = {
            **os.environ,
            "BONE_DATA_DIR": str(Path(folder) / "data"),
            "BONE_REDIS_URL": args.redis,
            "BONE_API_KEYS": KeyEntry("bench", "admin", hash_key(KEY)).line(),
            "BONE_RATE_LIMIT_TRAINING": "0",
            "BONE_MAX_QUEUE": "16",
            "BONE_MAX_BATCH_SIZE": "8",
            "BONE_PORT": str(port),
            "BONE_LOG_LEVEL": "warning",
            "OMP_NUM_THREADS": "1",
        }
        register_adapters(Settings(_env_file=None, data_dir=env["BONE_DATA_DIR"], redis_url=args.redis), args.adapters)
        # The API in its own process, as deployed: the load generator must not share its interpreter.
        server = subprocess.Popen([sys.executable, "-m", "cli", "api"], env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the API did not start")
                time.sleep(0.2)
            passed = asyncio.run(run(args, url))
        finally:
            server.terminate()
            server.wait(timeout=30)
    redis.Redis.from_url(args.redis).flushdb()
    print(
        "target (p99 <= 50 ms, zero errors; generation overload answered by 429s, no timeouts):",
        "met" if passed else "NOT met",
    )


if __name__ == "__main__":
    main()
