"""The command-line client against the running service: create, watch, list, download, import, generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.worker.recipes import MEMORIZE_RECIPE, MEMORIZE_RECORDS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def cli(service, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "BONE_URL": service.url, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )


def test_cli_round_trip(service, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in MEMORIZE_RECORDS) + "\n")
    training = MEMORIZE_RECIPE["training"]
    created = cli(
        service,
        "jobs",
        "create",
        "--file",
        str(data),
        "--name",
        "cli-memo",
        "--max-steps",
        str(training["max_steps"]),
        "--learning-rate",
        str(training["learning_rate"]),
        "--batch-size",
        str(training["batch_size"]),
    )
    assert created.returncode == 0, created.stderr
    job_id = created.stdout.split()[0]
    assert job_id.startswith("job-") and "file=file-" in created.stdout

    watched = cli(service, "jobs", "watch", job_id, "--interval", "0.3")
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert f"{job_id}: succeeded" in watched.stdout

    assert "cli-memo" in cli(service, "adapters", "list").stdout
    assert job_id in cli(service, "jobs", "list").stdout

    record = MEMORIZE_RECORDS[0]
    generated = cli(
        service,
        "generate",
        "--adapter",
        "cli-memo",
        "--max-new-tokens",
        str(len(record["completion"].encode())),
        record["prompt"],
    )
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip() == record["completion"]

    exported = tmp_path / "exported"
    assert cli(service, "adapters", "download", "cli-memo", str(exported)).returncode == 0
    assert {p.name for p in exported.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    imported = cli(service, "adapters", "import", str(exported), "--name", "cli-copy")
    assert imported.returncode == 0, imported.stderr
    copy = cli(
        service,
        "generate",
        "--adapter",
        "cli-copy",
        "--no-stream",
        "--max-new-tokens",
        str(len(record["completion"].encode())),
        record["prompt"],
    )
    assert copy.stdout.strip() == record["completion"]


def test_cli_errors_are_one_line_with_nonzero_exit(service):
    result = cli(service, "generate", "--adapter", "no-such-adapter", "hello")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bone-server: ") and "404" in lines[0]
    unreachable = subprocess.run(
        [sys.executable, "-m", "cli", "jobs", "list", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


# --- a CLI that guides ------------------------------------------------------------------------------------
def walk(command, path=()):
    """Every (path, click command) of the CLI, groups included."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, (*path, name))


def test_every_command_and_option_has_help():
    import typer.main

    from cli.main import cli as app_cli

    undocumented = []
    for path, command in walk(typer.main.get_command(app_cli)):
        if path and not (command.help or command.short_help):
            undocumented.append(" ".join(path))
        for param in command.params:
            if param.name != "help" and not getattr(param, "help", None):
                undocumented.append(f"{' '.join(path)} {param.name}")
    assert undocumented == []


def test_version_and_completion():
    version = subprocess.run([sys.executable, "-m", "cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert version.returncode == 0 and version.stdout.startswith("bone-server ")
    shown = subprocess.run(
        [sys.executable, "-m", "cli", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "--install-completion" in shown.stdout


def plain_cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: the server found through BONE_PORT/BONE_DATA_DIR, no BONE_URL/BONE_API_KEY."""
    base = {k: v for k, v in os.environ.items() if k not in ("BONE_URL", "BONE_API_KEY", "BONE_DATA_DIR")}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, "COLUMNS": "200", "PYTHONPATH": str(ROOT), **env},
        timeout=timeout,
    )


def test_settings_key_hints_files_cancel_and_adapters(keyed_service, tmp_path):
    svc = keyed_service
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = {"BONE_PORT": str(svc.port)}

    # From another folder, no key: the error names where the client looked and how to pass one.
    lost = plain_cli("jobs", "list", env=port, cwd=elsewhere)
    assert lost.returncode == 1
    assert "missing API key" in lost.stderr and str(elsewhere / "bone-data" / "local-admin.key") in lost.stderr
    assert "--api-key" in lost.stderr and "BONE_API_KEY" in lost.stderr
    # BONE_PORT + BONE_DATA_DIR, the server's own settings, are all the client needs.
    found = {**port, "BONE_DATA_DIR": str(svc.data_dir)}
    assert plain_cli("jobs", "list", env=found, cwd=elsewhere).returncode == 0
    key = (svc.data_dir / "local-admin.key").read_text().strip()
    assert plain_cli("jobs", "list", "--api-key", key, env=port, cwd=elsewhere).returncode == 0
    refused = plain_cli("jobs", "list", "--api-key", "bsk-wrong", env=port, cwd=elsewhere)
    assert refused.returncode == 1 and "refused" in refused.stderr

    # files upload / list / delete
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in MEMORIZE_RECORDS) + "\n")
    uploaded = plain_cli("files", "upload", str(data), "--quiet", env=found, cwd=elsewhere)
    file_id = uploaded.stdout.strip()
    assert uploaded.returncode == 0 and file_id.startswith("file-"), uploaded.stderr
    assert file_id in plain_cli("files", "list", env=found, cwd=elsewhere).stdout
    assert plain_cli("files", "delete", file_id, env=found, cwd=elsewhere).stdout.strip() == f"deleted {file_id}"
    assert file_id not in plain_cli("files", "list", env=found, cwd=elsewhere).stdout

    # cancel says what happened: a queued job (on a queue no worker serves) never runs ...
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    queued = httpx.post(
        svc.url + "/jobs",
        headers=headers,
        json={
            "adapter_name": "never",
            "dataset": {"records": MEMORIZE_RECORDS},
            "queue": "idle",
            "training": {"max_steps": 1},
        },
    ).json()
    cancelled = plain_cli("jobs", "cancel", queued["id"], env=found, cwd=elsewhere)
    assert cancelled.stdout.strip() == f"{queued['id']}: cancelled before it ran; nothing was published"
    again = plain_cli("jobs", "cancel", queued["id"], env=found, cwd=elsewhere)
    assert again.returncode == 0 and again.stdout.strip() == f"{queued['id']}: job already cancelled; nothing to cancel"

    # ... a finished one is left alone; then compose, export and delete adapters
    training = MEMORIZE_RECIPE["training"]
    job_id = plain_cli(
        "jobs",
        "create",
        "--file",
        str(data),
        "--name",
        "memo",
        "--quiet",
        "--max-steps",
        str(training["max_steps"]),
        "--learning-rate",
        str(training["learning_rate"]),
        "--batch-size",
        str(training["batch_size"]),
        env=found,
        cwd=elsewhere,
    ).stdout.strip()
    assert plain_cli("jobs", "watch", job_id, env=found, cwd=elsewhere).returncode == 0
    done = plain_cli("jobs", "cancel", job_id, env=found, cwd=elsewhere)
    assert done.stdout.strip() == f"{job_id}: job already succeeded; nothing to cancel"
    composed = plain_cli("adapters", "compose", "half", "memo=0.5", env=found, cwd=elsewhere)
    assert composed.returncode == 0 and "composed half" in composed.stdout, composed.stderr
    exported = plain_cli("adapters", "export", "memo", str(tmp_path / "lora"), env=found, cwd=elsewhere)
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert plain_cli("adapters", "delete", "half", env=found, cwd=elsewhere).stdout.strip() == "deleted half"
    listed = plain_cli("adapters", "list", env=found, cwd=elsewhere).stdout
    assert "memo" in listed and "half" not in listed
