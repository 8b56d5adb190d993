"""Host memory while the base model loads: peak RSS vs the size of the bf16 safetensors on disk.

    python bench/load_memory.py [--repeats 1] [--layers 24]

Builds a Qwen2.5-0.5B-shaped model from a config (on the meta device, then materialized in bf16, so building
it costs one bf16 copy, not an fp32 one), saves it as bf16 safetensors in a temp dir, and loads it in a fresh
subprocess per path, each reporting its own peak RSS (``VmHWM``):

* ``worker``: ``worker.model_cache.preload`` for a CUDA device, on the CPU (the worker's parent never touches
  CUDA): what a worker holds while it loads the base for GPU training;
* ``loader bf16``: ``core.base_model.load_base_model(..., dtype="bfloat16")``, what the API does with
  ``BONE_DTYPE=bfloat16``;
* ``old: fp32 then cast``: the previous worker path, loaded in fp32 and then cast to bf16.

Target: the loader's peak ≤ 1.3x the file size. "peak after load" is the peak when loading returns;
transformers memory-maps the safetensors and, when the dtypes match, the parameters are the mapped file
itself, so pages count only once read: "after use" reads every weight once (as a forward pass or the move
to a GPU would) and is the honest figure. Those pages are shared page cache: processes that map the same
file share one host copy (a forked work-horse inherits it). "over baseline" subtracts the RSS after importing
torch and transformers (the interpreter's own footprint, the same in every path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIB = 1024 * 1024
PATHS = {"worker": "worker (preload for cuda)", "bf16": "loader bf16", "old": "old: fp32 then cast"}


def qwen2_config(layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(  # Qwen2.5-0.5B's shape
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )


def build_and_save(target: Path, layers: int) -> int:
    """Write the model and a tokenizer to ``target``; returns the bytes of its safetensors files."""
    import torch
    from transformers import Qwen2ForCausalLM

    from core.base_model import _byte_level_tokenizer

    with torch.device("meta"):
        model = Qwen2ForCausalLM(qwen2_config(layers)).to(torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    model.tie_weights()
    model.save_pretrained(target)
    _byte_level_tokenizer().save_pretrained(target)
    del model  # the children measure their own memory; the parent needs none of this while they run
    return sum(f.stat().st_size for f in target.glob("*.safetensors"))


def status_bytes(field: str) -> int:
    """A /proc/self/status figure (``VmRSS`` now, ``VmHWM`` its peak). Not ``ru_maxrss``: Linux carries that
    across fork+exec, so a child would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def load_in_this_process(path: str, model_dir: str) -> dict:
    """Runs in the child: load one way, report peak RSS after loading and after reading every weight once."""
    import torch

    from core.base_model import load_base_model
    from core.settings import Settings
    from worker import model_cache

    settings = Settings(data_dir=Path(model_dir).parent / "data", base_model=model_dir)
    baseline = status_bytes("VmRSS")
    if path == "worker":
        model = model_cache.preload(model_dir, settings, torch.device("cuda")).model
    elif path == "bf16":
        model = load_base_model(model_dir, settings, device=torch.device("cpu"), dtype="bfloat16").model
    else:
        model = load_base_model(model_dir, settings, device=torch.device("cpu"), dtype="float32").model
        model.to(torch.bfloat16)
    loaded_peak = status_bytes("VmHWM")
    # Weights read from a memory-mapped file count once touched (as shared page cache): touch them all, as
    # the first forward pass or the move to a GPU would. bf16 sums, so no temporary fp32 copy adds to the peak.
    with torch.no_grad():
        for param in model.parameters():
            param.sum()
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    return {"loaded_peak": loaded_peak, "used_peak": status_bytes("VmHWM"), "baseline": baseline, "dtypes": dtypes}


def run_child(path: str, model_dir: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", path, "--model-dir", str(model_dir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--child", choices=sorted(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_in_this_process(args.child, args.model_dir)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "qwen2-0.5b-shape-bf16"
        file_bytes = build_and_save(model_dir, args.layers)
        print(f"model: Qwen2.5-0.5B shape, {args.layers} layers, bf16 safetensors {file_bytes / MIB:.0f} MiB")
        print(f"{'path':<28}{'peak after load':>17}{'after use':>11}{'over baseline':>15}  (MiB, x file)")
        for _ in range(args.repeats):
            for path, label in PATHS.items():
                got = run_child(path, model_dir)
                cells = [got["loaded_peak"], got["used_peak"], got["used_peak"] - got["baseline"]]
                row = "".join(f"{c / MIB:>6.0f} {c / file_bytes:>4.2f}x".rjust(w) for c, w in zip(cells, (17, 11, 15)))
                print(f"{label:<28}{row}  {','.join(got['dtypes'])}")


if __name__ == "__main__":
    main()
