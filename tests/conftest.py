"""Fixtures shared by every test package: a real Redis database, settings on a temporary data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from core.settings import Settings

# The suite serves without keys, said explicitly as the server requires (loopback only): tests of keys and of
# the local admin key (tests/app/test_auth_keys.py, tests/e2e/test_up.py) turn it back off for themselves.
os.environ.setdefault("BONE_AUTH_DISABLED", "true")
# Co-training groups form whatever they cost on the machine running the suite, so a test's outcome never hangs on a
# timing; the time bound (BONE_COTRAIN_MAX_SLOWDOWN) has its own tests (tests/worker/test_cotrain_*).
os.environ.setdefault("BONE_COTRAIN_MAX_SLOWDOWN", "0")

# A database of its own so the suite never touches data on db 0; override with BONE_TEST_REDIS_URL.
TEST_REDIS_URL = os.environ.get("BONE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def redis_url() -> str:
    conn = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        conn.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - .ci/run starts one
        pytest.fail(f"these tests need a real Redis at {TEST_REDIS_URL}: {exc}")
    conn.flushdb()
    yield TEST_REDIS_URL
    conn.flushdb()


@pytest.fixture
def redis_conn(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def shared_models_dir(tmp_path_factory) -> Path:
    """One place for the embedded base model per test session: it is built once, then loaded from disk."""
    return tmp_path_factory.mktemp("models-cache")


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, shared_models_dir: Path) -> Settings:
    data_dir = tmp_path / "data"
    (data_dir).mkdir()
    # Reuse the session's embedded model instead of rebuilding it for every test.
    (data_dir / "models").symlink_to(shared_models_dir, target_is_directory=True)
    return Settings(data_dir=data_dir, redis_url=redis_url)


# One real S3 server (SeaweedFS on loopback) per test session, shared by every module that asks for it.
from tests.s3server import s3_server, s3_url  # noqa: E402,F401 - fixtures
