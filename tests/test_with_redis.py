"""`make test`'s runner (tests/with_redis.py): without BONE_TEST_REDIS_URL it gives the suite a private
redis-server that it started itself (never a database it did not create), says so, and stops it afterwards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]

INNER_TEST = """
import os, redis
def test_the_suite_gets_a_private_redis():
    url = os.environ["BONE_TEST_REDIS_URL"]
    assert not url.startswith("redis://127.0.0.1:6379/")
    assert redis.Redis.from_url(url).ping()
"""


def test_make_test_starts_a_private_redis_and_stops_it(tmp_path):
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER_TEST)
    env = {k: v for k, v in os.environ.items() if k != "BONE_TEST_REDIS_URL"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.with_redis", "-q", "-p", "no:cacheprovider", str(inner)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    said = re.search(r"started a private redis-server for this run on (redis://\S+)", run.stderr)
    assert said, run.stderr
    gone = redis.Redis.from_url(said.group(1), socket_connect_timeout=0.5)
    try:
        gone.ping()
        raise AssertionError("the private redis-server still answers after the run")
    except redis.ConnectionError:
        pass


def test_an_explicit_url_that_does_not_answer_stops_before_pytest():
    run = subprocess.run(
        [sys.executable, "-m", "tests.with_redis", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "BONE_TEST_REDIS_URL": "redis://127.0.0.1:9/15"},
        timeout=60,
    )
    assert run.returncode == 2 and "does not answer" in run.stderr
