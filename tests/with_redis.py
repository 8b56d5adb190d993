"""``make test``'s runner: pytest with a Redis it may flush.

The suite flushes the database it is given, so it never picks one by itself: ``BONE_TEST_REDIS_URL`` when set
(your choice, your database), else a private ``redis-server`` started here on a free port, without
persistence, in a temporary folder, and stopped afterwards (the same launcher ``bone-server up`` uses).
It prints which one it uses. Usage: ``python -m tests.with_redis [pytest args...]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cli.redis_launcher import redis_answers, start_private_redis


def say(message: str) -> None:
    print(f"make test: {message}", file=sys.stderr, flush=True)


def main(pytest_args: list[str]) -> int:
    chosen = os.environ.get("BONE_TEST_REDIS_URL")
    if chosen:
        if not redis_answers(chosen):
            say(f"BONE_TEST_REDIS_URL={chosen} does not answer; unset it to let make test start its own Redis")
            return 2
        say(f"using BONE_TEST_REDIS_URL={chosen} (the suite flushes this database)")
        return subprocess.call([sys.executable, "-m", "pytest", *pytest_args])

    directory = Path(tempfile.mkdtemp(prefix="bone-test-redis-"))
    try:
        try:
            handle = start_private_redis(directory, persistent=False)
        except RuntimeError as exc:
            say(
                f"cannot start a private Redis for the tests: {exc}.\n"
                "  Or point the suite at a database it may FLUSH: BONE_TEST_REDIS_URL=redis://HOST:PORT/DB make test"
            )
            return 2
        url = handle.url.rsplit("/", 1)[0] + "/15"
        say(f"started a private redis-server for this run on {url} (no persistence; stopped at the end)")
        try:
            return subprocess.call(
                [sys.executable, "-m", "pytest", *pytest_args], env={**os.environ, "BONE_TEST_REDIS_URL": url}
            )
        finally:
            handle.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
