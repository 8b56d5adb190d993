"""vLLM serves our exported adapters with our greedy outputs: the check behind `adapters export-vllm`.

Two Bone adapters (seeded random blocks, so they visibly change the model) are exported the way the CLI and
BONE_VLLM_EXPORT_DIR export them (bone.export.to_lora, core.vllm_export.sync_folder), then served by vLLM's
offline engine with LoRA enabled, at the --max-lora-rank the export prints. Each adapter's greedy tokens from
vLLM are compared with ours (BoneModel on the same base, same dtype) on the same prompts. Needs a GPU and
`pip install vllm`; the base is the embedded model unless --model names a local Llama-shaped folder.

    python bench/vllm_check.py                 # on a GPU machine with vllm installed (bench/vllm_check.sh)
    python bench/vllm_check.py --ours-only     # the half that runs anywhere: export + our greedy tokens
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bone import BoneConfig, BoneModel, get_bone_model, to_lora  # noqa: E402
from core.base_model import build_embedded_model  # noqa: E402
from core.vllm_export import sync_folder, vllm_max_lora_rank  # noqa: E402

PROMPTS = [[1, 72, 101, 108, 108, 111], [1, 84, 104, 101, 32, 99, 97, 112], [1, 50, 43, 50, 61]]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, seed: int, r: int) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_bone_model(AutoModelForCausalLM.from_pretrained(base_dir), BoneConfig(r=r, target_modules=TARGETS))
    for _, layer in model.bone_layers():
        for block in layer.bone_block.values():
            torch.nn.init.normal_(block, std=0.02)
    model.save_pretrained(out)


def export(base_dir: Path, adapters: dict[str, Path], folder: Path) -> int:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)

    def fetch(name: str) -> dict[str, bytes]:
        config = BoneConfig.from_pretrained(adapters[name])
        config.base_model_name_or_path = str(base_dir)
        lora = to_lora(base, config, load_file(adapters[name] / "adapter_model.safetensors"))
        with tempfile.TemporaryDirectory() as tmp:
            lora.save(tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}

    result = sync_folder(folder, {name: name for name in adapters}, fetch)
    assert not result.failed, result.failed
    return vllm_max_lora_rank(list(result.ranks.values()))


def ours(base_dir: Path, adapter: Path, tokens: int, dtype: torch.dtype, device: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = BoneModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), adapter)
    model = model.to(device).eval()
    outputs = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt], device=device)
            generated = model.generate(input_ids=ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
            outputs.append(generated[0, len(prompt) :].tolist())
    return outputs


def theirs(base_dir: Path, folder: Path, names: list[str], max_rank: int, tokens: int, dtype: str):
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=str(base_dir),
        enable_lora=True,
        max_lora_rank=max_rank,
        max_loras=len(names),
        dtype=dtype,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=256,
    )
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    results = {}
    for i, name in enumerate(names):
        request = LoRARequest(name, i + 1, str(folder / name))
        generations = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, lora_request=request)
        results[name] = [list(g.outputs[0].token_ids) for g in generations]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a local Llama-shaped model folder (default: the embedded base)")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--ours-only", action="store_true", help="skip vLLM (no GPU / no vllm here)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bone-vllm-check-"))
    base_dir = args.model or build_embedded_model(work / "embedded-llama-v1")
    adapters = {f"check-{i}": work / "bone" / f"check-{i}" for i in range(2)}
    for i, path in enumerate(adapters.values()):
        make_adapter(base_dir, path, seed=100 + i, r=8 * (i + 1))
    max_rank = export(base_dir, adapters, work / "vllm")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected = {n: ours(base_dir, p, args.tokens, getattr(torch, args.dtype), device) for n, p in adapters.items()}
    print(json.dumps({"max_lora_rank": max_rank, "ours": expected}))
    if args.ours_only:
        return 0
    got = theirs(base_dir, work / "vllm", list(adapters), max_rank, args.tokens, args.dtype)
    failed = 0
    for name in adapters:
        for prompt, a, b in zip(PROMPTS, expected[name], got[name]):
            same = sum(x == y for x, y in zip(a, b))
            status = "same" if a == b else f"DIFFERS after {next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)}"
            print(f"{name} prompt {prompt[:4]}…: {same}/{len(a)} tokens equal — {status}")
            failed += a != b
    print("vllm_check: " + ("all greedy outputs equal" if not failed else f"{failed} outputs differ"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
