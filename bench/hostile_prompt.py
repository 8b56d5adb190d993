"""The event loop under a hostile prompt (issue 13, row 5): ``/healthz`` round trips, probed every 10 ms,
while one client sends a huge prompt to ``POST /generate``.

    python -m bench.hostile_prompt [--mb 30] [--redis redis://127.0.0.1:6379/9]

Starts its own API process (the embedded model, a temporary data dir, no keys on loopback) on the given
Redis database, which it flushes. Cases: the huge prompt with ``Content-Length`` and streamed in chunks (both
refused by the generation routes' body bound), a prompt just under that bound but over the prompt's byte
bound (parsed, refused before tokenizing), and the largest prompt the server accepts (tokenized off the
loop, then generated). Prints p50/p99/max of the probes per case; the target is p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import redis

from bench.load import free_port, percentile


def probe_while(url: str, action) -> tuple[list[float], object]:
    done, result = threading.Event(), {}

    def run():
        try:
            result["value"] = action()
        except httpx.HTTPError as exc:  # the server answered 413 and closed while the body was still going
            result["value"] = exc
        finally:
            done.set()

    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=120) as probe:
        probe.get("/healthz")
        thread = threading.Thread(target=run)
        thread.start()
        while not done.is_set() or len(latencies) < 20:
            started = time.perf_counter()
            probe.get("/healthz")
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
        thread.join()
    return latencies, result.get("value")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=30.0, help="size of the huge prompt")
    parser.add_argument("--redis", default=os.environ.get("BONE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"))
    args = parser.parse_args()

    redis.Redis.from_url(args.redis).flushdb()
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        env = {
            **os.environ,
            "BONE_DATA_DIR": str(Path(folder) / "data"),
            "BONE_REDIS_URL": args.redis,
            "BONE_AUTH_DISABLED": "true",
            "BONE_PORT": str(port),
            "BONE_LOG_LEVEL": "warning",
            "OMP_NUM_THREADS": "1",
        }
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
            from core.settings import Settings

            settings = Settings(_env_file=None)
            huge = ('{"prompt": "%s", "max_new_tokens": 4}' % ("x" * int(args.mb * 1024 * 1024))).encode()
            under_body = (
                '{"prompt": "%s", "max_new_tokens": 4}' % ("x" * (settings.max_generation_body_bytes - 1024))
            ).encode()
            largest = {"prompt": "ab" * (settings.max_prompt_tokens // 2 - 8), "max_new_tokens": 4}
            cases = {
                f"{args.mb:g} MB prompt, Content-Length": lambda http: http.post(
                    "/generate", content=huge, headers={"content-type": "application/json"}
                ),
                f"{args.mb:g} MB prompt, chunked": lambda http: http.post(
                    "/generate",
                    content=(huge[i : i + (1 << 20)] for i in range(0, len(huge), 1 << 20)),
                    headers={"content-type": "application/json"},
                ),
                f"{len(under_body) // 1024} KiB prompt (under the body bound, over the prompt's)": lambda http: (
                    http.post("/generate", content=under_body, headers={"content-type": "application/json"})
                ),
                f"largest accepted prompt ({settings.max_prompt_tokens - 16} tokens), generated": lambda http: (
                    http.post("/generate", json=largest)
                ),
            }
            with httpx.Client(base_url=url, timeout=300) as http:
                for name, send in cases.items():
                    latencies, reply = probe_while(url, partial(send, http))
                    answer = reply.status_code if isinstance(reply, httpx.Response) else type(reply).__name__
                    print(
                        f"{name}: answer {answer}; /healthz over {len(latencies)} probes: "
                        f"p50 {statistics.median(latencies) * 1000:.1f} ms, "
                        f"p99 {percentile(latencies, 99) * 1000:.1f} ms, "
                        f"max {max(latencies) * 1000:.1f} ms"
                    )
        finally:
            server.terminate()
            server.wait(timeout=30)
    redis.Redis.from_url(args.redis).flushdb()


if __name__ == "__main__":
    main()
