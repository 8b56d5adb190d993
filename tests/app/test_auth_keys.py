"""Keys, settings and start-up policy without a server: parsing BONE_API_KEYS, minting with the CLI, and the
rule that auth may be off only on loopback."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from app.main import create_app
from cli.main import cli
from core.auth import AuthConfigError, KeyRing, is_loopback
from core.keys import generate_key, hash_key
from core.settings import Settings

HASH = "ab" * 32


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    # Every Settings below gets a fresh data dir (a local admin key may be minted there) and auth on unless
    # a test says otherwise (the suite's conftest turns it off for everyone else).
    monkeypatch.setenv("BONE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("BONE_AUTH_DISABLED", raising=False)


def settings(**fields) -> Settings:
    return Settings(_env_file=None, **fields)


@pytest.mark.parametrize(
    "raw, owners",
    [
        (f"alice:user:{HASH}", ["alice"]),
        (f"alice:user:{HASH}, bob:admin:{'cd' * 32}", ["alice", "bob"]),
        (f"alice:user:{HASH}\nbob:admin:{'cd' * 32}\n", ["alice", "bob"]),
        (json.dumps([f"alice:user:{HASH}", {"owner": "bob", "role": "admin", "sha256": "CD" * 32}]), ["alice", "bob"]),
        ("", []),
    ],
)
def test_api_keys_from_the_environment(monkeypatch, raw, owners):
    monkeypatch.setenv("BONE_API_KEYS", raw)
    lines = Settings().api_keys
    assert [line.split(":")[0] for line in lines] == owners
    assert all(line.split(":")[2] == line.split(":")[2].lower() for line in lines)


@pytest.mark.parametrize(
    "raw, says",
    [
        ("alice:root:" + HASH, "role"),
        ("alice:user:1234", "64 hex"),
        ("alice:user:bsk-abcdef", "hashes, not keys"),
        ("al ice:user:" + HASH, "owner"),
        ("alice:" + HASH, "owner:role:sha256hex"),
        (f"a:user:{HASH},b:user:{HASH}", "twice"),
        ("[not json", "BONE_API_KEYS"),
    ],
)
def test_bad_api_keys_stop_start_up_naming_the_setting(monkeypatch, raw, says):
    monkeypatch.setenv("BONE_API_KEYS", raw)
    with pytest.raises(ValidationError) as info:
        Settings()
    from core.settings import describe_validation_error

    line = describe_validation_error(info.value)
    assert "BONE_API_KEYS" in line and says in line


def test_keys_authenticate_to_their_owner_and_role():
    alice, root = generate_key(), generate_key()
    assert alice.startswith("bsk-") and len(alice) > 40 and alice != root
    ring = KeyRing.from_settings(settings(api_keys=[f"alice:user:{hash_key(alice)}", f"root:admin:{hash_key(root)}"]))
    assert ring.enabled and len(ring) == 2
    who = ring.authenticate(alice)
    assert (who.owner, who.role, who.is_admin, who.key_id) == ("alice", "user", False, hash_key(alice)[:16])
    assert who.can_see("alice") and not who.can_see("bob") and not who.can_see(None)
    assert ring.authenticate(root).can_see("bob") and ring.authenticate(root).can_see(None)
    assert ring.authenticate(alice + "x") is None and ring.authenticate("") is None
    assert ring.authenticate(hash_key(alice)) is None  # the stored hash is not a key


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("::", False),
        ("example.com", False),
    ],
)
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "fields, enabled",
    [
        ({"host": "127.0.0.1"}, True),  # nothing configured on loopback: still on, with the local admin key
        ({"host": "127.0.0.1", "auth_disabled": True}, False),  # off only when the settings say so
        ({"host": "127.0.0.1", "auth_disabled": True, "api_keys": [f"a:user:{HASH}"]}, False),
        ({"host": "127.0.0.1", "api_keys": [f"a:user:{HASH}"]}, True),  # keys configured: on, even on loopback
        ({"host": "0.0.0.0", "api_keys": [f"a:user:{HASH}"]}, True),
    ],
)
def test_when_auth_is_on(fields, enabled):
    assert KeyRing.from_settings(settings(**fields)).enabled is enabled


def test_loopback_without_keys_mints_one_local_admin_key(tmp_path):
    import stat

    from core.local_key import local_key_path

    ring = KeyRing.from_settings(settings(host="127.0.0.1"))
    path = local_key_path(settings().data_dir)
    assert ring.local_key_file == path and stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert key.startswith("bsk-")
    who = ring.authenticate(key)
    assert (who.owner, who.is_admin) == ("local", True)
    again = KeyRing.from_settings(settings(host="127.0.0.1"))  # a restart (or the next process) keeps the key
    assert again.authenticate(key) is not None and path.read_text().strip() == key
    configured = KeyRing.from_settings(settings(host="127.0.0.1", api_keys=[f"a:user:{HASH}"]))
    assert configured.local_key_file is None and configured.authenticate(key) is None  # replaced by real keys


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"host": "0.0.0.0"}, "BONE_API_KEYS is empty"),
        ({"host": "10.1.2.3", "auth_disabled": True, "api_keys": [f"a:user:{HASH}"]}, "BONE_AUTH_DISABLED"),
    ],
)
def test_an_open_api_on_a_public_address_never_starts(fields, says):
    with pytest.raises(AuthConfigError, match=says):
        KeyRing.from_settings(settings(**fields))
    with pytest.raises(AuthConfigError):
        create_app(settings(**fields))


def test_cli_refuses_to_serve_an_open_api_publicly(monkeypatch):
    monkeypatch.setenv("BONE_HOST", "0.0.0.0")
    monkeypatch.delenv("BONE_API_KEYS", raising=False)
    result = CliRunner().invoke(cli, ["api"])
    assert result.exit_code == 2
    assert "refusing to serve without authentication" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_keys_create_prints_the_key_once_and_its_entry(monkeypatch):
    result = CliRunner().invoke(cli, ["keys", "create", "--owner", "alice", "--role", "admin"])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("bsk-")
    entry = f"alice:admin:{hash_key(key)}"
    assert f"BONE_API_KEYS={entry}" in result.stderr
    monkeypatch.setenv("BONE_API_KEYS", entry)
    assert KeyRing.from_settings(Settings()).authenticate(key).owner == "alice"


@pytest.mark.parametrize("args", [["--owner", "bad owner"], ["--owner", "x", "--role", "root"], []])
def test_keys_create_refuses_bad_input(args):
    result = CliRunner().invoke(cli, ["keys", "create", *args])
    assert result.exit_code == 2


def test_processes_starting_together_agree_on_one_local_key(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from core.local_key import ensure_local_key, local_key_path

    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: ensure_local_key(tmp_path), range(32)))
    assert keys == {local_key_path(tmp_path).read_text().strip()}
    assert [p.name for p in tmp_path.iterdir()] == ["local-admin.key"]  # no temporary file left behind
