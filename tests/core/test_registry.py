import json
import os
import time
from pathlib import Path

import pytest

from core.errors import Conflict, CorruptAdapter, NotFound
from core.registry import AdapterRegistry, file_sha256
from core.storage import PUBLISH_LOCK_FILE


def _adapter_dir(tmp_path: Path, payload: bytes = b"weights-v1") -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "BONE", "r": 8}))
    (src / "adapter_model.safetensors").write_bytes(payload)
    return src


META = {"base_model": "embedded", "bone": {"r": 8}, "job_id": "job-1", "metrics": {"train_loss": 0.5}}


def test_publish_then_get_and_list(tmp_path):
    registry = AdapterRegistry(tmp_path / "reg")
    info = registry.publish("alpha", _adapter_dir(tmp_path), META)
    assert info.sha256 == file_sha256(tmp_path / "src" / "adapter_model.safetensors")
    assert info.size_bytes == len(b"weights-v1")
    assert registry.get("alpha") == info
    assert [i.name for i in registry.list()] == ["alpha"]
    assert registry.verified_weights("alpha")[0] == tmp_path / "reg" / "alpha" / "adapter_model.safetensors"


def test_republish_conflicts_unless_overwrite(tmp_path):
    registry = AdapterRegistry(tmp_path / "reg")
    registry.publish("alpha", _adapter_dir(tmp_path), META)
    with pytest.raises(Conflict):
        registry.publish("alpha", _adapter_dir(tmp_path, b"weights-v2"), META)
    info = registry.publish("alpha", _adapter_dir(tmp_path, b"weights-v2"), META, overwrite=True)
    assert registry.get("alpha").sha256 == info.sha256
    assert (tmp_path / "reg" / "alpha" / "adapter_model.safetensors").read_bytes() == b"weights-v2"
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == [PUBLISH_LOCK_FILE, "alpha"]  # no staging/trash


def test_corrupted_weights_are_refused_naming_the_file(tmp_path):
    registry = AdapterRegistry(tmp_path / "reg")
    registry.publish("alpha", _adapter_dir(tmp_path), META)
    weights = tmp_path / "reg" / "alpha" / "adapter_model.safetensors"
    weights.write_bytes(b"weights-v1-but-flipped")
    with pytest.raises(CorruptAdapter, match="adapter_model.safetensors"):
        registry.verified_weights("alpha")


def test_interrupted_publish_is_never_listed_and_is_swept_once_old(tmp_path):
    registry = AdapterRegistry(tmp_path / "reg")
    half = tmp_path / "reg" / ".staging-deadbeef"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")
    assert registry.list() == []
    assert registry.sweep() == 0 and half.exists()  # young: it may be a publish still copying
    two_hours_ago = time.time() - 7200
    os.utime(half, (two_hours_ago, two_hours_ago))
    assert registry.sweep() == 1
    assert not half.exists()


@pytest.mark.parametrize("name", ["../etc", "UPPER", "a/b", "", ".hidden", "x" * 65])
def test_bad_names_are_not_found(tmp_path, name):
    registry = AdapterRegistry(tmp_path / "reg")
    with pytest.raises(NotFound):
        registry.get(name)


def test_delete(tmp_path):
    registry = AdapterRegistry(tmp_path / "reg")
    registry.publish("alpha", _adapter_dir(tmp_path), META)
    registry.delete("alpha")
    assert registry.list() == []
    with pytest.raises(NotFound):
        registry.delete("alpha")
    assert os.listdir(tmp_path / "reg") == [PUBLISH_LOCK_FILE]
