"""Serving throughput: 16 concurrent requests on 16 different adapters vs 1 adapter vs the base model, and a
naive baseline that serves them one at a time switching adapters — one process, side by side.

    python bench/serve.py --model small --new-tokens 64 --repeats 5 [--dtype bfloat16] [--http] [--mixes]
    python bench/serve.py --adapters 1000 --zipf 1.0      # many adapters in rotation: bench/rotation.py

In-process: requests go straight to ``InferenceEngine`` (the real scheduler, per-row adapters, continuous
batching). ``--http`` repeats mixed and base through the real app (uvicorn on loopback, ``POST /generate``,
one client thread per request; needs Redis at ``--redis-url`` for the app's lifespan). The naive baseline
is PEFT-style: one model holding all adapters, ``set_adapter(name)`` then ``generate()`` per request.
Also: adapter cold load (registry → usable, p50) and a check that switching between resident adapters
loads nothing and moves no parameter. Figures are medians over ``--repeats`` runs after a warm-up run.
EOS is disabled so every request generates exactly ``--new-tokens`` tokens. ``--mixes`` adds a scenario of 16
per-request mixes (request i: ``{adapter i: 0.5, adapter i+1: 0.5}``), built once by the engine, then cached.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.engine import GenerationRequest, InferenceEngine, Target  # noqa: E402
from app.engine.adapter_pool import AdapterCache  # noqa: E402
from app.engine.batch import SamplingParams  # noqa: E402
from bench import rotation  # noqa: E402
from bench.models import LLAMA_PROJECTIONS, build_model  # noqa: E402
from bone import BoneConfig, get_bone_model  # noqa: E402
from core.base_model import _byte_level_tokenizer, load_base_model  # noqa: E402
from core.registry import AdapterRegistry  # noqa: E402
from core.settings import Settings  # noqa: E402

N_REQUESTS = 16


def build_world(args, root: Path) -> tuple[Settings, list[str]]:
    """The bench model saved as a local base model, and 16 random Bone adapters published to a registry."""
    model_dir = root / "models" / f"bench-{args.model}"
    model = build_model(args.model, seed=0)
    model.generation_config.eos_token_id = None
    model.save_pretrained(model_dir)
    _byte_level_tokenizer().save_pretrained(model_dir)
    settings = Settings(
        data_dir=root,
        base_model=str(model_dir),
        max_batch_size=N_REQUESTS,
        batch_wait_ms=5,
        redis_url=args.redis_url,
        device=args.device,
        max_new_tokens=max(512, args.new_tokens),
        dtype=args.dtype,
    )
    registry = AdapterRegistry(settings.registry_dir)
    config = BoneConfig(r=args.r, target_modules=LLAMA_PROJECTIONS, init_weights=False)
    names = [f"bench-{i:02d}" for i in range(N_REQUESTS)]
    bone = get_bone_model(build_model(args.model, seed=0), config, adapter_name=names[0])
    for name in names[1:]:
        bone.add_adapter(name, config)
    for name in names:
        with tempfile.TemporaryDirectory() as folder:
            bone.save_pretrained(folder, adapter_name=name)
            registry.publish(name, Path(folder), {"base_model": settings.base_model, "bone": config.to_dict()})
    return settings, names


def prompts(n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (length - (i % 4) * 3,), generator=g).tolist() for i in range(n)]  # ragged


def engine_run(engine: InferenceEngine, adapters: list, ids: list[list[int]], new_tokens: int) -> float:
    """Tokens/s for one burst of concurrent requests through the engine (an entry of ``adapters`` is a name,
    None for the base model, or a dict name -> weight for a mix)."""
    registry = engine.cache.registry

    def target(a) -> Target:
        if isinstance(a, dict):
            return Target(mix=tuple(sorted((n, registry.get(n).sha256, w) for n, w in a.items())))
        return Target(a, None if a is None else registry.get(a).sha256)

    targets = [target(a) for a in adapters]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    started = time.perf_counter()
    requests = [engine.submit(GenerationRequest(t, p, params)) for p, t in zip(ids, targets)]
    tokens = sum(r.future.result(600).completion_tokens for r in requests)
    return tokens / (time.perf_counter() - started)


def naive_run(model, adapters: list[str], ids: list[list[int]], new_tokens: int) -> float:
    """One request at a time, switching the active adapter for each (PEFT's way without mixed batches)."""
    started = time.perf_counter()
    tokens = 0
    for name, prompt in zip(adapters, ids):
        model.set_adapter(name)
        x = torch.tensor([prompt], device=model.device)
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        tokens += out.shape[1] - x.shape[1]
    return tokens / (time.perf_counter() - started)


def http_run(url: str, adapters: list[str | None], ids: list[list[int]], new_tokens: int) -> float:
    import httpx

    texts = [bytes(p).decode("latin-1") for p in ids]  # byte-level tokenizer: ≈ the same prompt lengths

    def one(i: int) -> int:
        reply = client.post(
            "/generate",
            json={"prompt": texts[i], "adapter": adapters[i], "max_new_tokens": new_tokens, "temperature": 0},
        )
        reply.raise_for_status()
        return reply.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=len(ids), max_keepalive_connections=len(ids))
    with httpx.Client(base_url=url, timeout=600, limits=limits) as client, ThreadPoolExecutor(len(ids)) as pool:
        started = time.perf_counter()
        tokens = sum(pool.map(one, range(len(ids))))
    return tokens / (time.perf_counter() - started)


def round_robin(runs: dict, repeats: int) -> dict[str, float]:
    for fn in runs.values():
        fn()  # warm-up (loads the adapters)
    samples: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, fn in runs.items():
            samples[label].append(fn())
    return {label: statistics.median(values) for label, values in samples.items()}


def median_of(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(repeats))


def cold_loads(engine: InferenceEngine, names: list[str]) -> tuple[float, float]:
    """p50 ms of registry → usable (no CPU tier) and of a CPU-tier → device promotion, engine stopped."""
    for name in names:
        engine.cache.evict(name)
    registry = engine.cache.registry
    cold, warm = [], []
    cache = AdapterCache(registry, engine.host, max_count=1, max_bytes=1 << 40, cpu_bytes=0, device=engine.base.device)
    for name in names:
        started = time.perf_counter()
        cache.acquire(name, registry.get(name).sha256)
        cold.append(time.perf_counter() - started)
    cache.evict(names[-1])
    cache = AdapterCache(
        registry, engine.host, max_count=1, max_bytes=1 << 40, cpu_bytes=1 << 40, device=engine.base.device
    )
    for name in names + names:
        started = time.perf_counter()
        cache.acquire(name, registry.get(name).sha256)
        warm.append(time.perf_counter() - started)
    cache.evict(names[-1])
    return statistics.median(cold) * 1000, statistics.median(warm[len(names) :]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "small"], default="small")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="BONE_DTYPE of the served base (auto: bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument("--http", action="store_true", help="also measure over HTTP (needs Redis)")
    parser.add_argument("--mixes", action="store_true", help="also 16 per-request mixes of two adapters each")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    rotation.add_arguments(parser)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.adapters:  # many adapters in rotation (bench/rotation.py)
        rotation.run(args)
        return

    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    settings, names = build_world(args, root)
    ids = prompts(N_REQUESTS, args.prompt_tokens)
    base = load_base_model(settings.base_model, settings, dtype=settings.dtype)
    engine = InferenceEngine(base, AdapterRegistry(settings.registry_dir), settings)
    engine.scheduler.eos_ids = frozenset()
    engine.start()
    print(
        f"model {args.model}, device {base.device}, {engine.host.dtype}, {N_REQUESTS} concurrent requests, "
        f"prompts ~{args.prompt_tokens} tokens, {args.new_tokens} new tokens each, "
        f"Bone r={args.r} on all 7 projections, median of {args.repeats} runs, torch threads {torch.get_num_threads()}"
    )

    # Round-robin over the scenarios, so drift on a shared machine hits them alike; medians per scenario.
    scenarios = {"base": [None] * N_REQUESTS, "one adapter": [names[0]] * N_REQUESTS, "mixed (16 adapters)": names}
    if args.mixes:
        scenarios["16 mixes (2 adapters each)"] = [
            {names[i]: 0.5, names[(i + 1) % N_REQUESTS]: 0.5} for i in range(N_REQUESTS)
        ]
    runs = {
        label: (lambda a=adapters: engine_run(engine, a, ids, args.new_tokens)) for label, adapters in scenarios.items()
    }
    figures = round_robin(runs, args.repeats)
    params = {n: (p.data_ptr(), p._version) for n, p in engine.host.bone_model.named_parameters()}
    installs = engine.cache.installs
    engine_run(engine, names, ids, args.new_tokens)
    now = {n: (p.data_ptr(), p._version) for n, p in engine.host.bone_model.named_parameters()}
    switch_note = f"{engine.cache.installs - installs} loads, every parameter untouched: {now == params}"
    engine.stop()
    base_tps = figures["base"]

    naive_model = build_model(args.model, seed=0).to(base.device, engine.host.dtype)
    naive_model.generation_config.eos_token_id = None
    from bone import BoneModel  # one model holding every adapter

    naive = BoneModel(naive_model)
    for name in names:
        naive.load_adapter(engine.cache.registry.path(name), adapter_name=name)
    naive.eval()
    naive_tps = median_of(lambda: naive_run(naive, names, ids, args.new_tokens), max(1, args.repeats // 2))
    cold_ms, promote_ms = cold_loads(engine, names)

    print(f"\n{'in-process engine':<28}{'tokens/s':>10}{'vs base':>9}")
    for label in scenarios:
        tps = figures[label]
        print(f"{label:<28}{tps:>10.1f}{tps / base_tps:>8.2f}x")
    print(f"{'naive (one by one, switch)':<28}{naive_tps:>10.1f}{naive_tps / base_tps:>8.2f}x")
    mixed = figures["mixed (16 adapters)"]
    print(
        f"\nmixed / base = {mixed / base_tps:.2f}x (target >= 0.85); mixed / naive = {mixed / naive_tps:.1f}x "
        f"(target >= 4)"
    )
    print(
        f"adapter cold load (registry -> usable) p50 {cold_ms:.1f} ms (target <= 20); CPU tier -> device p50 "
        f"{promote_ms:.1f} ms"
    )
    print(f"warm switching (a mixed run after warm-up): {switch_note}")

    if args.http:
        run_http(settings, names, ids, args, base_tps)


def run_http(settings: Settings, names: list[str], ids, args, engine_base_tps: float) -> None:
    import uvicorn

    from app.main import create_app
    from tests.app.conftest import free_port

    port = free_port()
    # The bench's own server on loopback: no keys (the minted local admin key would answer 401 to a keyless client)
    app = create_app(settings.model_copy(update={"auth_disabled": True}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    app.state.engine.scheduler.eos_ids = frozenset()
    url = f"http://127.0.0.1:{port}"
    try:
        figures = round_robin(
            {
                "base": lambda: http_run(url, [None] * N_REQUESTS, ids, args.new_tokens),
                "mixed": lambda: http_run(url, names, ids, args.new_tokens),
            },
            args.repeats,
        )
        base, mixed = figures["base"], figures["mixed"]
    finally:
        server.should_exit = True
        thread.join(30)
    print(
        f"\nover HTTP: base {base:.1f} tokens/s ({base / engine_base_tps:.2f}x in-process), mixed {mixed:.1f} "
        f"tokens/s, mixed / base = {mixed / base:.2f}x"
    )


if __name__ == "__main__":
    main()
