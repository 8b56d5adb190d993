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
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def test_cli_round_trip(service, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in MEMORIZE_RECORDS) + "\n")
    training = MEMORIZE_RECIPE["training"]
    created = cli(service, "jobs", "create", "--file", str(data), "--name", "cli-memo",
                  "--max-steps", str(training["max_steps"]), "--learning-rate", str(training["learning_rate"]),
                  "--batch-size", str(training["batch_size"]))
    assert created.returncode == 0, created.stderr
    job_id = created.stdout.split()[0]
    assert job_id.startswith("job-") and "file=file-" in created.stdout

    watched = cli(service, "jobs", "watch", job_id, "--interval", "0.3")
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert f"{job_id}: succeeded" in watched.stdout

    assert "cli-memo" in cli(service, "adapters", "list").stdout
    assert job_id in cli(service, "jobs", "list").stdout

    record = MEMORIZE_RECORDS[0]
    generated = cli(service, "generate", "--adapter", "cli-memo", "--max-new-tokens",
                    str(len(record["completion"].encode())), record["prompt"])
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip() == record["completion"]

    exported = tmp_path / "exported"
    assert cli(service, "adapters", "download", "cli-memo", str(exported)).returncode == 0
    assert {p.name for p in exported.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    imported = cli(service, "adapters", "import", str(exported), "--name", "cli-copy")
    assert imported.returncode == 0, imported.stderr
    copy = cli(service, "generate", "--adapter", "cli-copy", "--no-stream", "--max-new-tokens",
               str(len(record["completion"].encode())), record["prompt"])
    assert copy.stdout.strip() == record["completion"]


def test_cli_errors_are_one_line_with_nonzero_exit(service):
    result = cli(service, "generate", "--adapter", "no-such-adapter", "hello")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bone-server: ") and "404" in lines[0]
    unreachable = subprocess.run([sys.executable, "-m", "app.cli", "jobs", "list", "--url", "http://127.0.0.1:9"],
                                 capture_output=True, text=True, cwd=ROOT)
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
