"""One worker per device: `bone-server worker --device cuda:N` (or BONE_DEVICE=cuda:N) pins a worker to one GPU,
its advert names that device, and a device this machine does not have stops start-up with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.base_model import pick_device
from core.fleet import DeviceUnavailable, check_device
from core.settings import Settings
from worker.distributed import check_processes
from worker.main import describe_device

ROOT = Path(__file__).resolve().parents[2]
NO_GPUS = torch.cuda.device_count() == 0


@pytest.mark.skipif(not NO_GPUS, reason="needs a machine without GPUs to name a missing one for sure")
@pytest.mark.parametrize(
    "args, env, words",
    [
        (["--device", "cuda:3"], {}, "cuda:3"),
        ([], {"BONE_DEVICE": "cuda:3"}, "cuda:3"),
        (["--device", "cuda"], {}, "no CUDA device"),
        (["--device", "tpu:0"], {}, "BONE_DEVICE"),  # not a device name at all: the settings check says so
    ],
)
def test_a_device_that_does_not_exist_is_a_one_line_start_up_error(tmp_path, redis_url, args, env, words):
    child_env = {
        **os.environ,
        "BONE_DATA_DIR": str(tmp_path),
        "BONE_REDIS_URL": redis_url,
        "PYTHONPATH": str(ROOT),
        **env,
    }
    child_env.pop("BONE_DEVICE", None) if not env else None
    result = subprocess.run(
        [sys.executable, "-m", "cli", "worker", "--burst", *args],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("bone-server: "), result.stderr
    assert not (tmp_path / "models").exists()  # refused before loading anything


@pytest.mark.parametrize("setting, device", [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:2", "cuda:2")])
def test_the_device_setting_picks_the_device(tmp_path, setting, device):
    assert pick_device(Settings(data_dir=tmp_path, device=setting)) == torch.device(device)


def test_the_advert_names_the_pinned_device(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert describe_device(settings, torch.device("cpu"))["device"] == "cpu"
    assert describe_device(settings, torch.device("cuda", 1))["device"] == "cuda:1"


@pytest.mark.skipif(not NO_GPUS, reason="a machine without GPUs")
def test_check_device_accepts_the_cpu_and_refuses_missing_gpus():
    check_device(torch.device("cpu"), "device cpu")
    with pytest.raises(DeviceUnavailable, match="cuda:1"):
        check_device(torch.device("cuda", 1), "device cuda:1")


def test_a_pinned_worker_refuses_multi_process_jobs():
    with pytest.raises(ValueError, match="pinned to cuda:1"):
        check_processes(2, torch.device("cuda", 1), 8)
