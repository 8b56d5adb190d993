"""The local registry never loses a version: the sweep spares young and held leftovers, a publish racing a
sweep in another process always lands, an overwrite interrupted between its two renames is finished on the
next start, and what is loaded is exactly what was hashed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from core.errors import CorruptAdapter
from core.registry import AdapterRegistry
from core.storage import LocalStorage
from core.storage.local import JOURNAL_PREFIX

ROOT = Path(__file__).resolve().parents[2]
META = {"base_model": "embedded", "bone": {"r": 8}}


def weights(value: float) -> bytes:
    return save({"base_model.model.layer.bone_block": torch.full((4, 4), value)})


def adapter_dir(folder: Path, value: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "BONE", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(weights(value))
    return folder


SWEEP_FOREVER = """
import sys, time
from pathlib import Path
from core.registry import AdapterRegistry
registry = AdapterRegistry(Path(sys.argv[1]))
print("sweeping", flush=True)
while True:
    registry.sweep(grace_s=0)  # the harshest operator setting: every leftover is "old"
"""


def test_a_publish_racing_a_sweep_in_another_process_always_lands(tmp_path):
    root = tmp_path / "reg"
    registry = AdapterRegistry(root)
    registry.publish("alpha", adapter_dir(tmp_path / "v0", 0.0), META)
    sweeper = subprocess.Popen(
        [sys.executable, "-c", SWEEP_FOREVER, str(root)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert sweeper.stdout.readline().strip() == "sweeping"
        for i in range(1, 41):
            source = adapter_dir(tmp_path / f"v{i}", float(i))
            info = registry.publish("alpha", source, META, overwrite=True)  # raises if the sweep ate its staging
            tensors, read = registry.verified_tensors("alpha")
            assert read.sha256 == info.sha256
            assert float(tensors["base_model.model.layer.bone_block"][0, 0]) == float(i)
            registry.publish(f"new-{i}", source, META)  # a first publish (one rename) too
        assert sweeper.poll() is None, "the sweeping process died"
    finally:
        sweeper.kill()
        sweeper.wait(10)
    assert len(registry.list()) == 41


DIE_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
import core.storage.local as local
from core.registry import AdapterRegistry
local._exchange = lambda a, b: False  # a filesystem without RENAME_EXCHANGE: two journaled renames
real_rename = os.rename
def rename_then_die(src, dst, *args, **kwargs):
    real_rename(src, dst, *args, **kwargs)
    if Path(dst).name.startswith(".trash-"):
        os._exit(9)  # the old version is aside, the new one not yet in place
os.rename = rename_then_die
AdapterRegistry(Path(sys.argv[1])).publish("alpha", Path(sys.argv[2]), {"base_model": "embedded", "bone": {}},
                                           overwrite=True)
"""


@pytest.mark.parametrize("new_version_whole, expect", [(True, 2.0), (False, 1.0)], ids=["forward", "back"])
def test_an_overwrite_interrupted_between_its_renames_is_finished_on_the_next_start(
    tmp_path, new_version_whole, expect
):
    root = tmp_path / "reg"
    registry = AdapterRegistry(root)
    registry.publish("alpha", adapter_dir(tmp_path / "v1", 1.0), META)
    died = subprocess.run(
        [sys.executable, "-c", DIE_BETWEEN_RENAMES, str(root), str(adapter_dir(tmp_path / "v2", 2.0))],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert died.returncode == 9
    assert not (root / "alpha").exists()  # the window the journal covers
    assert (root / f"{JOURNAL_PREFIX}alpha.json").is_file()
    if not new_version_whole:  # e.g. damaged by hand: recovery must then bring the old one back
        staging = root / json.loads((root / f"{JOURNAL_PREFIX}alpha.json").read_text())["staging"]
        (staging / "metadata.json").unlink()

    AdapterRegistry(root).sweep()  # what every API start does

    tensors, _ = registry.verified_tensors("alpha")
    assert float(tensors["base_model.model.layer.bone_block"][0, 0]) == expect
    assert [
        p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".publish.lock"
    ] == [] or not new_version_whole  # a damaged staging folder is left for the sweep's grace period


def test_a_publish_or_delete_finishes_an_interrupted_overwrite_first(tmp_path):
    root = tmp_path / "reg"
    registry = AdapterRegistry(root)
    registry.publish("alpha", adapter_dir(tmp_path / "v1", 1.0), META)
    subprocess.run(
        [sys.executable, "-c", DIE_BETWEEN_RENAMES, str(root), str(adapter_dir(tmp_path / "v2", 2.0))],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    registry.delete("alpha")  # rolls the overwrite forward, then deletes: nothing comes back later
    assert LocalStorage(root).recover() == [] and not registry.exists("alpha")


def test_readers_never_miss_an_adapter_while_it_is_overwritten(tmp_path, monkeypatch):
    """Any rename that puts a folder aside is slowed down, widening the window in which a two-rename swap
    leaves the name missing; the exchange has no such window."""
    root = tmp_path / "reg"
    registry = AdapterRegistry(root)
    registry.publish("alpha", adapter_dir(tmp_path / "v0", 0.0), META)
    if not local_exchange_works(tmp_path):
        pytest.skip("this filesystem has no RENAME_EXCHANGE: overwrites fall back to two journaled renames")
    real_rename = os.rename

    def slow_rename(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        if Path(dst).name.startswith(".trash-"):
            time.sleep(0.2)

    monkeypatch.setattr(os, "rename", slow_rename)
    missing, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            if not (root / "alpha" / "metadata.json").is_file():
                missing.append(time.monotonic())
            time.sleep(0.005)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for i in range(1, 6):
            registry.publish("alpha", adapter_dir(tmp_path / f"v{i}", float(i)), META, overwrite=True)
    finally:
        stop.set()
        thread.join()
    assert missing == []
    assert float(registry.verified_tensors("alpha")[0]["base_model.model.layer.bone_block"][0, 0]) == 5.0


def local_exchange_works(folder: Path) -> bool:
    from core.storage.local import _exchange

    (folder / "ex-a").mkdir()
    (folder / "ex-b").mkdir()
    return _exchange(folder / "ex-a", folder / "ex-b")


def test_young_or_held_leftovers_survive_the_sweep(tmp_path):
    root = tmp_path / "reg"
    registry = AdapterRegistry(root)
    old = time.time() - 7200
    for name in (".staging-1", ".trash-1"):
        (root / name).mkdir()
        os.utime(root / name, (old, old))
    young = root / f".trash-{int(time.time() * 1000):013d}-abc"  # renamed just now from an old folder
    young.mkdir()
    os.utime(young, (old, old))
    assert registry.sweep() == 2 and young.exists()
    assert registry.sweep(grace_s=0) == 1 and not young.exists()


def test_a_corrupted_weights_file_is_refused_naming_it_and_no_server_path(tmp_path):
    registry = AdapterRegistry(tmp_path / "reg")
    registry.publish("alpha", adapter_dir(tmp_path / "v1", 1.0), META)
    path = tmp_path / "reg" / "alpha" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptAdapter) as refused:
        registry.verified_tensors("alpha")
    assert "alpha/adapter_model.safetensors" in str(refused.value)
    assert str(tmp_path) not in str(refused.value)


def test_the_bytes_loaded_are_the_bytes_hashed(tmp_path):
    """The weights file becomes a pipe that serves the published bytes on its first read and tampered bytes on
    any later one: a loader that hashed one read and loaded another would load the tampered tensors."""
    registry = AdapterRegistry(tmp_path / "reg")
    registry.publish("alpha", adapter_dir(tmp_path / "v1", 1.0), META)
    path = tmp_path / "reg" / "alpha" / "adapter_model.safetensors"
    good = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    served = []

    def serve() -> None:
        for payload in (good, weights(666.0), weights(666.0)):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK) if served else os.open(path, os.O_WRONLY)
            except OSError:  # no second reader came within the wait: the loader read once
                return
            with os.fdopen(fd, "wb") as pipe:
                pipe.write(payload)
            served.append(len(payload))
            time.sleep(0.5)

    writer = threading.Thread(target=serve, daemon=True)
    writer.start()
    tensors, _ = registry.verified_tensors("alpha")
    writer.join(5)
    assert float(tensors["base_model.model.layer.bone_block"][0, 0]) == 1.0
    assert len(served) == 1


def test_published_files_are_not_readable_by_others(tmp_path):
    previous = os.umask(0o022)  # a permissive umask: the registry narrows its own files anyway
    try:
        registry = AdapterRegistry(tmp_path / "reg")
        registry.publish("alpha", adapter_dir(tmp_path / "v1", 1.0), META)
    finally:
        os.umask(previous)
    for path in (tmp_path / "reg" / "alpha").iterdir():
        assert path.stat().st_mode & 0o777 == 0o640, path.name
