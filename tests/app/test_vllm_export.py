"""The way out to vLLM: `bone-server adapters export-vllm DIR` and BONE_VLLM_EXPORT_DIR, checked against the rules
vLLM applies when it loads a LoRA adapter (vLLM itself needs a GPU; bench/vllm_check.sh runs it on one)."""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bone import BoneModel
from cli.main import cli as cli_app
from core.base_model import resolve_base_model
from core.vllm_export import STAMP_FILE, VLLM_LORA_RANKS, serve_command, sync_folder, vllm_max_lora_rank
from tests.app.conftest import publish_adapter

SERVED_AS = "served-base"
SERVER_SETTINGS = {
    "vllm_export_dir": Path(tempfile.mkdtemp(prefix="bone-vllm-sync-")),
    "vllm_export_interval_s": 0.2,
    "vllm_export_base_model": SERVED_AS,
}

# vLLM's LlamaForCausalLM: packed_modules_mapping {qkv_proj: [q,k,v], gate_up_proj: [gate, up]} plus o_proj and
# down_proj; an adapter's module names (the last component) must be among these (LoRAModel's
# check_unexpected_modules).
LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def vllm_refusals(folder: Path, *, max_lora_rank: int, served_model: str) -> list[str]:
    """Why vLLM would refuse this LoRA folder, following its loading code: PEFTHelper.from_dict (required r,
    lora_alpha, target_modules; modules_to_save None; no DoRA) and validate_legal (rank ≤ --max-lora-rank,
    bias "none"), parse_fine_tuned_lora_name (keys "base_model.model.<module>.lora_A|lora_B.weight"),
    check_unexpected_modules, and the filesystem resolver (peft_type LORA, base_model_name_or_path equal to the
    served model's name)."""
    errors = []
    config = json.loads((folder / "adapter_config.json").read_text())
    errors += [f"missing {k}" for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if config.get("modules_to_save"):
        errors.append("vLLM only supports modules_to_save being None")
    if config.get("use_dora"):
        errors.append("vLLM does not yet support DoRA")
    if config.get("bias", "none") != "none":
        errors.append("Adapter bias cannot be used without bias_enabled")
    if config.get("r", 0) > max_lora_rank:
        errors.append(f"LoRA rank {config.get('r')} is greater than max_lora_rank {max_lora_rank}")
    if config.get("peft_type") != "LORA" or config.get("base_model_name_or_path") != served_model:
        errors.append("the filesystem resolver does not match it to the served model")
    tensors = load_file(folder / "adapter_model.safetensors")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith("base_model.model.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            errors.append(f"{key} is unsupported LoRA weight")
            continue
        module, part = key[len("base_model.model.") :].rsplit(".", 2)[:2]
        modules.setdefault(module, {})[part] = tensor
        if module.rsplit(".", 1)[-1] not in LLAMA_LORA_MODULES:
            errors.append(f"unexpected target module {module}")
    for module, parts in modules.items():
        if set(parts) != {"lora_A", "lora_B"}:
            errors.append(f"{module}: lora_A and lora_B must come together")
        elif parts["lora_A"].shape[0] != parts["lora_B"].shape[1] or parts["lora_A"].shape[0] > max_lora_rank:
            errors.append(
                f"{module}: rank of lora_A {tuple(parts['lora_A'].shape)} / lora_B "
                f"{tuple(parts['lora_B'].shape)} does not fit"
            )
    return errors


def test_the_rules_refuse_what_vllm_refuses(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 64,
                "lora_alpha": 64,
                "target_modules": ["q_proj"],
                "modules_to_save": ["lm_head"],
                "base_model_name_or_path": "other",
            }
        )
    )
    from safetensors.torch import save_file

    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(64, 8),
            "base_model.model.model.layers.0.self_attn.rotary.lora_B.weight": torch.zeros(8, 64),
        },
        folder / "adapter_model.safetensors",
    )
    errors = vllm_refusals(folder, max_lora_rank=16, served_model=SERVED_AS)
    assert any("modules_to_save" in e for e in errors) and any("max_lora_rank" in e for e in errors)
    assert any("resolver" in e for e in errors) and any("unexpected target module" in e for e in errors)


def test_max_lora_rank_is_the_smallest_value_vllm_accepts():
    assert vllm_max_lora_rank([4]) == 8 and vllm_max_lora_rank([16, 8]) == 16 and vllm_max_lora_rank([65]) == 128
    assert vllm_max_lora_rank([1]) == 1 and set(VLLM_LORA_RANKS) >= {8, 16, 32, 64}
    with pytest.raises(ValueError, match="up to 512"):
        vllm_max_lora_rank([513])


def _export_cli(live, directory: Path, *args: str):
    result = CliRunner().invoke(
        cli_app, ["adapters", "export-vllm", str(directory), "--url", live.url, *args], env={"COLUMNS": "400"}
    )
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_export_vllm_writes_folders_vllm_loads_with_our_logits(live, client, tmp_path):
    peft = pytest.importorskip("peft")
    publish_adapter(live.settings, "vl-a", seed=11, r=4)
    publish_adapter(live.settings, "vl-b", seed=12, r=8)
    out = _export_cli(live, tmp_path / "vllm", "--base-model", SERVED_AS)
    assert "2 written, 0 unchanged, 0 removed, 0 skipped" in out
    line = next(line.strip() for line in out.splitlines() if line.strip().startswith("vllm serve"))
    words = shlex.split(line)
    assert words[:4] == ["vllm", "serve", SERVED_AS, "--enable-lora"]
    max_rank = int(words[words.index("--max-lora-rank") + 1])
    assert max_rank == 8  # the largest adapter's rank, already one of vLLM's values
    modules = dict(w.split("=", 1) for w in words[words.index("--lora-modules") + 1 :])
    assert modules == {"vl-a": str(tmp_path / "vllm" / "vl-a"), "vl-b": str(tmp_path / "vllm" / "vl-b")}
    for name, path in modules.items():
        assert vllm_refusals(Path(path), max_lora_rank=max_rank, served_model=SERVED_AS) == [], name

    from transformers import AutoModelForCausalLM

    source = resolve_base_model("embedded", live.settings)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    ours = BoneModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(source).eval(), live.settings.registry_dir / "vl-b"
    )
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source).eval(), modules["vl-b"])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_export_vllm_syncs_changes_and_leaves_foreign_folders(live, client, tmp_path):
    target = tmp_path / "vllm"
    publish_adapter(live.settings, "vs-a", seed=21)
    publish_adapter(live.settings, "vs-b", seed=22)
    foreign = target / "someone-elses"
    foreign.mkdir(parents=True)
    (foreign / "adapter_config.json").write_text("{}")
    assert "2 written, 0 unchanged" in _export_cli(live, target)
    before = (target / "vs-a" / "adapter_model.safetensors").read_bytes()

    assert "0 written, 2 unchanged" in _export_cli(live, target)  # nothing downloaded again
    publish_adapter(live.settings, "vs-a", seed=23, overwrite=True)
    assert client.delete("/adapters/vs-b").status_code == 200
    assert "1 written, 0 unchanged, 1 removed" in _export_cli(live, target)
    assert (target / "vs-a" / "adapter_model.safetensors").read_bytes() != before
    stamp = json.loads((target / "vs-a" / STAMP_FILE).read_text())
    assert stamp["sha256"] == client.get("/adapters/vs-a").json()["sha256"]
    assert not (target / "vs-b").exists() and (foreign / "adapter_config.json").read_text() == "{}"
    assert sorted(p.name for p in target.iterdir()) == ["someone-elses", "vs-a"]  # no staging left behind


def test_the_server_keeps_its_vllm_folder_in_sync(live, client):
    folder = live.settings.vllm_export_dir
    publish_adapter(live.settings, "srv-sync", seed=31)
    deadline = time.monotonic() + 30
    while not (folder / "srv-sync" / STAMP_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vllm_refusals(folder / "srv-sync", max_lora_rank=8, served_model=SERVED_AS) == []
    assert client.delete("/adapters/srv-sync").status_code == 200
    while (folder / "srv-sync").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (folder / "srv-sync").exists()


def test_one_failing_adapter_does_not_stop_the_others_and_its_stale_export_leaves(tmp_path):
    good = {
        "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4}).encode(),
        "adapter_model.safetensors": b"weights",
    }

    def fetch(name: str):
        if name == "broken":
            raise RuntimeError("trains biases")
        return good

    first = sync_folder(tmp_path, {"ok": "1", "broken": "1"}, lambda name: good)
    assert sorted(first.written) == ["broken", "ok"]
    second = sync_folder(tmp_path, {"ok": "1", "broken": "2"}, fetch)  # a new version that cannot be exported
    assert second.failed == {"broken": "trains biases"} and second.unchanged == ["ok"]
    assert not (tmp_path / "broken").exists()  # vLLM must not go on serving the old version under its name
    assert "--lora-modules ok=" in serve_command("base", second) and "broken" not in serve_command("base", second)
