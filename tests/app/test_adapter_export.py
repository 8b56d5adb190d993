"""Download in BONE / MiSS / LoRA layout, and exact composition, on the real server."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from safetensors.torch import load

from bone import BoneModel
from core.base_model import resolve_base_model
from tests.app.conftest import publish_adapter


def _unzip(response) -> dict[str, bytes]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        return {n: archive.read(n) for n in archive.namelist()}


def _base_model(settings):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_base_model("embedded", settings)).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("fmt, peft_type, suffix", [("bone", "BONE", ".bone_block"), ("miss", "MISS", ".miss_block")])
def test_download_in_peft_layouts(live, client, fmt, peft_type, suffix):
    publish_adapter(live.settings, "dl", seed=3)
    files = _unzip(client.get(f"/adapters/dl/download?format={fmt}"))
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "bone_export.json"}
    assert json.loads(files["adapter_config.json"])["peft_type"] == peft_type
    tensors = load(files["adapter_model.safetensors"])
    assert tensors and all(k.endswith(suffix) and k.startswith("base_model.model.") for k in tensors)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_lora_download_is_served_by_peft_with_our_logits(live, client, tmp_path):
    peft = pytest.importorskip("peft")
    publish_adapter(live.settings, "to-lora", seed=4)
    response = client.get("/adapters/to-lora/download?format=lora")
    assert response.headers["x-bone-lora-exact"] == "true"
    for name, data in _unzip(response).items():
        (tmp_path / name).write_bytes(data)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    ours = BoneModel.from_pretrained(_base_model(live.settings), live.settings.registry_dir / "to-lora")
    theirs = peft.PeftModel.from_pretrained(_base_model(live.settings), tmp_path)
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)


def test_bat_lora_download_reports_its_approximation(live, client):
    publish_adapter(live.settings, "bat-lora", seed=5, init_weights="bat")
    response = client.get("/adapters/bat-lora/download?format=lora&lora_rank=2")
    report = json.loads(_unzip(response)["bone_export.json"])
    assert response.headers["x-bone-lora-exact"] == "false"
    assert report["rank"] == 2 and 0 < report["max_relative_error"] < 1


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_bat_lora_download_meets_the_tolerance_and_keeps_greedy_output(live, client, tmp_path):
    peft = pytest.importorskip("peft")
    publish_adapter(live.settings, "bat-tol", seed=9, init_weights="bat")
    loose = json.loads(_unzip(client.get("/adapters/bat-tol/download?format=lora&tolerance=0.2"))["bone_export.json"])
    response = client.get("/adapters/bat-tol/download?format=lora")  # the default tolerance
    files = _unzip(response)
    report = json.loads(files["bone_export.json"])
    assert report["max_relative_error"] <= 1e-4 and loose["max_relative_error"] <= 0.2
    assert loose["rank"] < report["rank"]  # a looser tolerance, a smaller rank
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 101]])
    ours = _logits(BoneModel.from_pretrained(_base_model(live.settings), live.settings.registry_dir / "bat-tol"), ids)
    theirs = _logits(peft.PeftModel.from_pretrained(_base_model(live.settings), tmp_path), ids)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=1e-3)
    full = client.get("/adapters/bat-tol/download?format=lora&lora_rank=256")  # the embedded model's width
    assert full.headers["x-bone-lora-exact"] == "true"
    both = client.get("/adapters/bat-tol/download?format=lora&lora_rank=8&tolerance=1e-3")
    assert both.status_code == 422 and both.json()["error"]["param"] == "tolerance"


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["lora", "miss"])
def test_downloads_name_a_base_model_that_resolves(live, client, tmp_path, monkeypatch, fmt):
    """The embedded base has no hub id: downloads name the folder ``bone-server models export-embedded`` writes,
    and PEFT's AutoPeftModelForCausalLM loads the adapter from that alone."""
    import subprocess
    import sys

    peft = pytest.importorskip("peft")
    publish_adapter(live.settings, "resolves", seed=10)
    files = _unzip(client.get(f"/adapters/resolves/download?format={fmt}"))
    config = json.loads(files["adapter_config.json"])
    assert config["base_model_name_or_path"] == "embedded-llama-v1"
    assert (
        json.loads(files["bone_export.json"])["base_model_how"]
        == "bone-server models export-embedded embedded-llama-v1"
    )
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for name, data in files.items():
        (adapter_dir / name).write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-m", "cli", "models", "export-embedded", "embedded-llama-v1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    again = subprocess.run(
        [sys.executable, "-m", "cli", "models", "export-embedded", "adapter"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 2 and "not empty" in again.stderr  # never writes into a folder with other files
    monkeypatch.chdir(tmp_path)
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).eval()
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    ours = BoneModel.from_pretrained(_base_model(live.settings), live.settings.registry_dir / "resolves")
    torch.testing.assert_close(_logits(loaded, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name, expected", [("embedded", "embedded-llama-v1"), ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B")]
)
def test_exported_base_model_names(live, name, expected):
    from core.base_model import exported_base_model_name

    assert exported_base_model_name(name, live.settings) == expected
    local = live.settings.data_dir / "models" / "local-base"
    local.mkdir(parents=True, exist_ok=True)
    assert exported_base_model_name(str(local), live.settings) == str(local.resolve())


def test_compose_stores_an_exact_sum_with_lineage(live, client):
    a = publish_adapter(live.settings, "comp-a", seed=6)
    publish_adapter(live.settings, "comp-b", seed=7)
    made = client.post("/adapters/comp-ab/compose", json={"adapters": {"comp-a": 1.0, "comp-b": 0.0}})
    assert made.status_code == 201, made.text
    lineage = made.json()["lineage"]
    assert lineage["operation"] == "weighted_sum"
    assert [(s["name"], s["weight"], s["sha256"]) for s in lineage["adapters"]][0] == ("comp-a", 1.0, a.sha256)
    assert "comp-ab" in [x["name"] for x in client.get("/adapters").json()["data"]]

    def greedy(adapter):
        reply = client.post(
            "/generate", json={"adapter": adapter, "prompt": "compose me", "max_new_tokens": 8, "temperature": 0}
        )
        assert reply.status_code == 200, reply.text
        return reply.json()["text"]

    assert greedy("comp-ab") == greedy("comp-a")  # weights 1 and 0 reproduce the single adapter
    again = client.post("/adapters/comp-ab/compose", json={"adapters": {"comp-a": 0.5}})
    assert again.status_code == 409


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"adapters": {"comp-bat": 0.5, "comp-a": 0.5}}, 422, "adapters"),
        ({"adapters": {"nope": 1.0}}, 404, None),
        ({"adapters": {}}, 422, "adapters"),
        ({"adapters": {"../x": 1.0}}, 422, "adapters"),
    ],
)
def test_compose_errors(live, client, body, status, param):
    publish_adapter(live.settings, "comp-a", seed=6)
    publish_adapter(live.settings, "comp-bat", seed=8, init_weights="bat")
    reply = client.post("/adapters/out/compose", json=body)
    assert reply.status_code == status, reply.text
    if param:
        assert reply.json()["error"]["param"].startswith(param)


def test_download_unknown_adapter_is_404(client):
    reply = client.get("/adapters/nope/download")
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found"
