"""Many adapters in rotation: requests whose adapters follow a Zipf law over N published adapters, against the
same requests on the base model, one process, side by side.

    python bench/serve.py --adapters 1000 --zipf 1.0 [--model small] [--requests 512] [--concurrency 16]

Closed loop: ``--concurrency`` client threads each submit their next request when the previous one ends, straight
to ``InferenceEngine`` (the real scheduler, adapter pool, loader thread and CPU tier). Adapter i (0-based) is
drawn with probability ∝ 1/(i+1)^s, so a few adapters are hot and most are cold: the device pool
(``BONE_ADAPTER_CACHE_SIZE`` / ``_BYTES``) and the host tier (``BONE_ADAPTER_CPU_CACHE_BYTES``) run at the
settings' defaults unless given. Printed per round and as median [min–max] over ``--repeats`` rounds: tokens/s
of both streams and their ratio, the ratio of tokens per CPU-second of the process (``cpu_ratio``: the work each
stream costs, which a machine shared with other jobs distorts far less than wall-clock tokens/s), time to first
token p50/p99 (arrival to first sampled token), adapter loads (registry or host tier → device)
p50/p99 and how many, and the most device/host adapter memory seen against its bound.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from app import metrics
from app.engine import GenerationRequest, InferenceEngine, Target
from app.engine.batch import SamplingParams
from bench.models import LLAMA_PROJECTIONS, build_model
from bone import BoneConfig, get_bone_model
from core.base_model import _byte_level_tokenizer, load_base_model
from core.registry import AdapterRegistry
from core.settings import Settings


def publish_adapters(args, root: Path) -> tuple[Settings, list[str]]:
    model_dir = root / "models" / f"bench-{args.model}"
    model = build_model(args.model, seed=0)
    model.generation_config.eos_token_id = None  # every request generates exactly --new-tokens
    model.save_pretrained(model_dir)
    _byte_level_tokenizer().save_pretrained(model_dir)
    overrides = {
        k: v
        for k, v in (
            ("adapter_cache_size", args.cache_size),
            ("adapter_cache_bytes", args.cache_bytes),
            ("adapter_cpu_cache_bytes", args.cpu_cache_bytes),
        )
        if v is not None
    }
    settings = Settings(
        data_dir=root,
        base_model=str(model_dir),
        max_batch_size=args.concurrency,
        batch_wait_ms=5,
        redis_url=args.redis_url,
        device=args.device,
        dtype=args.dtype,
        max_new_tokens=max(512, args.new_tokens),
        max_adapters_per_owner=args.adapters,
        **overrides,
    )
    registry = AdapterRegistry(settings.registry_dir)
    config = BoneConfig(r=args.r, target_modules=LLAMA_PROJECTIONS, init_weights=False)
    bone = get_bone_model(build_model(args.model, seed=0), config, adapter_name="rot")
    blocks = [layer.bone_block["rot"] for _, layer in bone.bone_layers()]
    names = [f"rot-{i:04d}" for i in range(args.adapters)]
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in names:
            for block in blocks:
                block.copy_(torch.randn(block.shape, generator=generator) * 0.02)
            with tempfile.TemporaryDirectory() as folder:
                bone.save_pretrained(folder, adapter_name="rot")
                registry.publish(name, Path(folder), {"base_model": settings.base_model, "bone": config.to_dict()})
    print(f"published {len(names)} adapters in {time.perf_counter() - started:.0f} s")
    return settings, names


def zipf_choices(n: int, s: float, count: int, seed: int) -> list[int]:
    weights = torch.tensor([1.0 / (i + 1) ** s for i in range(n)], dtype=torch.float64)
    return torch.multinomial(weights, count, replacement=True, generator=torch.Generator().manual_seed(seed)).tolist()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Observations:
    """What the engine observes into one of its /metrics histograms (adapter load seconds, time to first
    token), kept as raw values here."""

    def __init__(self, histogram) -> None:
        self.values: list[float] = []
        self._observe = histogram.observe

        def observe(value: float, *a, **k) -> None:
            self.values.append(value)
            self._observe(value, *a, **k)

        self._histogram = histogram
        histogram.observe = observe  # type: ignore[method-assign]

    def close(self) -> None:
        self._histogram.observe = self._observe  # type: ignore[method-assign]

    def take(self) -> list[float]:
        values, self.values = self.values, []
        return values


def closed_loop(engine: InferenceEngine, adapters: list[str | None], ids: list[list[int]], args) -> dict:
    """Every request through the engine, ``args.concurrency`` at a time; tokens/s, TTFTs, peak pool use."""
    registry = engine.cache.registry
    shas = {name: registry.get(name).sha256 for name in set(adapters) if name is not None}
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    next_index = iter(range(len(adapters)))
    lock = threading.Lock()
    first_tokens = Observations(metrics.TIME_TO_FIRST_TOKEN)  # arrival → first token sampled (in the prefill)
    tokens = [0]
    peak = {"device": 0, "host": 0}

    def client() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            request = engine.submit(GenerationRequest(Target(adapters[i], shas.get(adapters[i])), ids[i], params))
            done = request.future.result(600)
            with lock:
                tokens[0] += done.completion_tokens
                peak["device"] = max(peak["device"], engine.cache.resident_bytes)
                peak["host"] = max(peak["host"], engine.cache._cpu_used)

    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    started, cpu_started = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    first_tokens.close()
    ttfts = first_tokens.take()
    return {
        "tps": tokens[0] / elapsed,
        "tokens_per_cpu_s": tokens[0] / cpu,
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p99": percentile(ttfts, 0.99),
        **peak,
    }


def run(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings, names = publish_adapters(args, Path(tmp))
        engine = InferenceEngine(
            load_base_model(settings.base_model, settings, None, settings.dtype),
            AdapterRegistry(settings.registry_dir),
            settings,
        )
        engine.scheduler.eos_ids = frozenset()
        engine.start()
        loads = Observations(metrics.ADAPTER_LOAD_SECONDS)
        g = torch.Generator().manual_seed(1)
        ids = [torch.randint(3, 256, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.requests)]
        cache = engine.cache
        print(
            f"model={args.model} dtype={args.dtype} adapters={args.adapters} zipf={args.zipf} "
            f"requests={args.requests} concurrency={args.concurrency} new_tokens={args.new_tokens} | device pool: "
            f"{cache.max_count} adapters / {cache.max_bytes / 2**20:.0f} MiB, host tier "
            f"{cache.cpu_bytes / 2**20:.0f} MiB"
        )
        try:
            closed_loop(engine, [None] * args.concurrency, ids[: args.concurrency], args)  # warm-up
            rounds: list[dict] = []
            for round_index in range(args.repeats):
                base = closed_loop(engine, [None] * args.requests, ids, args)
                choices = zipf_choices(args.adapters, args.zipf, args.requests, seed=round_index)
                loads.take()
                rotation = closed_loop(engine, [names[c] for c in choices], ids, args)
                took = loads.take()
                row = {
                    "base_tps": base["tps"],
                    "tps": rotation["tps"],
                    "ratio": rotation["tps"] / base["tps"],
                    "cpu_ratio": rotation["tokens_per_cpu_s"] / base["tokens_per_cpu_s"],
                    "ttft_p50_ms": rotation["ttft_p50"] * 1e3,
                    "ttft_p99_ms": rotation["ttft_p99"] * 1e3,
                    "base_ttft_p50_ms": base["ttft_p50"] * 1e3,
                    "loads": len(took),
                    "load_p50_ms": percentile(took, 0.5) * 1e3,
                    "load_p99_ms": percentile(took, 0.99) * 1e3,
                    "distinct": len(set(choices)),
                    "device_peak_mib": rotation["device"] / 2**20,
                    "host_peak_mib": rotation["host"] / 2**20,
                }
                rounds.append(row)
                print(f"round {round_index + 1}: " + "  ".join(f"{k}={v:.3g}" for k, v in row.items()), flush=True)
        finally:
            engine.stop()
    print("\nmedian [min–max] over rounds:")
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        print(f"  {key:18s} {statistics.median(values):10.3g}  [{min(values):.3g}–{max(values):.3g}]")
    within = all(
        r["device_peak_mib"] * 2**20 <= cache.max_bytes and r["host_peak_mib"] * 2**20 <= cache.cpu_bytes
        for r in rounds
    )
    print(
        f"rotation tokens/s vs base: {statistics.median(r['ratio'] for r in rounds):.2f}× (target ≥ 0.70×); "
        f"adapter memory within its bounds: {within}"
    )


def add_arguments(parser) -> None:
    parser.add_argument("--adapters", type=int, default=0, help="rotation mode: this many adapters (e.g. 1000)")
    parser.add_argument("--zipf", type=float, default=1.0, help="rotation mode: Zipf exponent of adapter choice")
    parser.add_argument("--requests", type=int, default=512, help="rotation mode: requests per stream")
    parser.add_argument("--concurrency", type=int, default=16, help="rotation mode: client threads (= batch size)")
    parser.add_argument("--cache-size", type=int, help="rotation mode: BONE_ADAPTER_CACHE_SIZE (default: settings')")
    parser.add_argument("--cache-bytes", type=int, help="rotation mode: BONE_ADAPTER_CACHE_BYTES")
    parser.add_argument("--cpu-cache-bytes", type=int, help="rotation mode: BONE_ADAPTER_CPU_CACHE_BYTES")
