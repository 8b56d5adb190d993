"""Bone training-step and generation cost against the frozen-base floor and PEFT, one process, side by side.

    python bench/train_step.py                      # small model, batch 2 x 256, 16 rounds after 3 warm-up steps
    python bench/train_step.py --sweep              # ours / PEFT per shape: 1x128, 2x256, 4x512, 8x1024
    python bench/train_step.py --sweep --shapes 1x128,2x256 --rounds 8
    python bench/train_step.py --threads 1 --clock cpu  # on a shared machine: CPU time, not wall time

Variants (all seven Llama projections targeted): the floor (frozen base, gradients flow through every layer
via one trainable scalar on the input embeddings, no weight gradients), Bone r=16, Bone r=64, Bat r=16 and,
when PEFT with MiSS is installed, PEFT's MiSS at the same settings (same math). One round times one step of
every variant, in an order rotated each round so no variant always follows the same neighbour; every figure
is the MEDIAN OF PER-ROUND RATIOS (each step against the floor / PEFT step of the same round), which resists
load drift from other processes on a shared machine better than a ratio of medians. The 1-minute load
average is printed with each table: on a shared machine, compare runs only at similar load.
Then (not with --sweep): per-token greedy generation, batch 1, one adapter unmerged, vs the base model.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.models import LLAMA_PROJECTIONS, build_model  # noqa: E402
from bone import BoneConfig, get_bone_model  # noqa: E402


class Floor(torch.nn.Module):
    """The frozen base with one trainable scalar on the input embeddings: every layer back-propagates
    activations, no weight gradient is computed."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        # the base's dtype: an fp32 scalar would silently promote bf16 activations to fp32
        self.scale = torch.nn.Parameter(torch.ones((), dtype=next(model.parameters()).dtype))

    def forward(self, input_ids, labels):
        emb = self.model.get_input_embeddings()(input_ids) * self.scale
        return self.model(inputs_embeds=emb, labels=labels)


class Wrapped(torch.nn.Module):
    """Adapter models get the embeddings the same way as the floor (minus the scalar)."""

    def __init__(self, model, hf):
        super().__init__()
        self.model = model
        self.hf = hf

    def forward(self, input_ids, labels):
        emb = self.hf.get_input_embeddings()(input_ids)
        return self.model(inputs_embeds=emb, labels=labels)


def randomize_blocks(model, std=0.02):
    # non-zero blocks so no variant can shortcut through zeros; same for ours and PEFT's
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bone_block" in n or "miss_block" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_variants(base, with_peft: bool):
    out = {"floor": Floor(copy.deepcopy(base))}
    for label, r, init in [("bone r=16", 16, True), ("bone r=64", 64, True), ("bat r=16", 16, "bat")]:
        hf = copy.deepcopy(base)
        bm = get_bone_model(hf, BoneConfig(r=r, target_modules=LLAMA_PROJECTIONS, init_weights=init))
        randomize_blocks(bm)
        out[label] = Wrapped(bm, hf)
    if with_peft:
        import warnings

        from peft import MissConfig, get_peft_model

        for label, r, init in [
            ("peft miss r=16", 16, True),
            ("peft miss r=64", 64, True),
            ("peft miss-bat r=16", 16, "bat"),
        ]:
            hf = copy.deepcopy(base)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm = get_peft_model(hf, MissConfig(r=r, target_modules=LLAMA_PROJECTIONS, init_weights=init))
            randomize_blocks(pm)
            out[label] = Wrapped(pm, hf)
    return out


def _sync(device: torch.device) -> None:
    """CUDA runs asynchronously: a timer must wait for the queued kernels to finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(mod, opt, ids):
    loss = mod(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


PAIRS = [("bone r=16", "peft miss r=16"), ("bone r=64", "peft miss r=64"), ("bat r=16", "peft miss-bat r=16")]


def load_average() -> str:
    try:
        return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "load n/a"


def time_rounds(variants, opts, ids, args):
    """Per variant, the step time of every round (rounds rotate the variant order)."""
    names = list(variants)
    times = {n: [] for n in names}
    for k in range(args.rounds):
        order = names[k % len(names) :] + names[: k % len(names)]
        for name in order:
            _sync(args.device)
            t0 = args.clock()
            train_step(variants[name], opts[name], ids)
            _sync(args.device)
            times[name].append(args.clock() - t0)
    return times


def paired(times, a, b):
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def bench_training(variants, args, batch, seq):
    g = torch.Generator().manual_seed(0)
    vocab = next(iter(variants.values())).model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(args.device)
    opts = {}
    for name, mod in variants.items():
        mod.train()
        params = [p for p in mod.parameters() if p.requires_grad]
        # the fused kernel, as worker.train.make_optimizer builds it on the CPU and on CUDA (same for every variant)
        opts[name] = torch.optim.AdamW(params, lr=1e-4, fused=True)
        for _ in range(args.warmup):
            train_step(mod, opts[name], ids)
    times = time_rounds(variants, opts, ids, args)
    tokens = batch * seq
    print(
        f"\ntraining step: model={args.model} batch={batch} seq={seq} rounds={args.rounds} warmup={args.warmup} "
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} clock={args.clock_name} "
        f"{load_average()}"
    )
    print(f"{'variant':<12}{'ours ms':>9}{'tokens/s':>10}{'ours/floor':>12}{'PEFT/floor':>12}{'ours/PEFT':>11}")
    print(
        f"{'floor':<12}{statistics.median(times['floor']) * 1e3:>9.1f}"
        f"{tokens / statistics.median(times['floor']):>10.0f}"
    )
    res = {}
    for ours, peft in PAIRS:
        med = statistics.median(times[ours])
        row = {"ours/floor": paired(times, ours, "floor")}
        if peft in times:
            row["peft/floor"] = paired(times, peft, "floor")
            row["ours/peft"] = paired(times, ours, peft)
        res[ours] = row
        fmt = lambda k, row=row: f"{row[k]:>12.3f}" if k in row else f"{'-':>12}"  # noqa: E731
        print(
            f"{ours:<12}{med * 1e3:>9.1f}{tokens / med:>10.0f}{fmt('ours/floor')}{fmt('peft/floor')}"
            f"{fmt('ours/peft')[1:]}"
        )
    from bone import train_path

    picks = {}
    for key, (ff, fb) in train_path.choices().items():
        if key[3] == train_path.tokens_bucket(tokens):
            picks[f"{key[0]}->{key[1]} r={'+'.join(map(str, key[2]))}"] = (
                f"fwd {'fold' if ff else 'add'}/bwd {'fold' if fb else 'add'}"
            )
    if picks:
        print("bone paths measured: " + "; ".join(f"{k}: {v}" for k, v in picks.items()))
    return res


def bench_sweep(variants, args):
    table = {}
    for shape in args.shapes:
        b, s = shape
        table[shape] = bench_training(variants, args, b, s)
    print(f"\nsweep (median of per-round ratios; {load_average()} at the end)")
    head = "".join(f"{f'{b}x{s}':>10}" for b, s in args.shapes)
    for col in ("ours/floor", "ours/peft"):
        print(f"\n{col:<12}{head}")
        for ours, _ in PAIRS:
            cells = "".join(
                f"{table[sh][ours][col]:>10.3f}" if col in table[sh][ours] else f"{'-':>10}" for sh in args.shapes
            )
            print(f"{ours:<12}{cells}")
    return table


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        b, s = part.lower().split("x")
        out.append((int(b), int(s)))
    return out


@torch.no_grad()
def per_token_ms(gen, ids, n_new, reps):
    """Median per-token decode time: (time for n_new tokens - time for 1 token) / (n_new - 1)."""

    def run(n):
        _sync(ids.device)
        t0 = time.perf_counter()
        gen(ids, n)
        _sync(ids.device)
        return time.perf_counter() - t0

    run(n_new)
    full = statistics.median(run(n_new) for _ in range(reps))
    one = statistics.median(run(1) for _ in range(reps))
    return (full - one) / (n_new - 1) * 1e3


def bench_generation(base, args, with_peft):
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (1, 16)).to(args.device)
    kw = dict(do_sample=False, pad_token_id=0)

    def hf_gen(m):
        return lambda x, n: m.generate(input_ids=x, max_new_tokens=n, min_new_tokens=n, **kw)

    rows = {}
    plain = copy.deepcopy(base).eval()
    rows["base"] = hf_gen(plain)
    hf = copy.deepcopy(base)
    bm = get_bone_model(hf, BoneConfig(r=16, target_modules=LLAMA_PROJECTIONS)).eval()
    randomize_blocks(bm)
    rows["bone r=16 unmerged"] = lambda x, n: bm.generate(input_ids=x, max_new_tokens=n, min_new_tokens=n, **kw)
    rows["bone r=16 per-row"] = lambda x, n: bm.generate(
        input_ids=x, adapter_names=["default"], max_new_tokens=n, min_new_tokens=n, **kw
    )
    if with_peft:
        import warnings

        from peft import MissConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(copy.deepcopy(base), MissConfig(r=16, target_modules=LLAMA_PROJECTIONS)).eval()
        randomize_blocks(pm)
        rows["peft miss r=16"] = lambda x, n: pm.generate(input_ids=x, max_new_tokens=n, min_new_tokens=n, **kw)
    res = {}
    for _ in range(2):  # two rounds, keep the best median of each: generation on CPU is noisy
        for name, gen in rows.items():
            ms = per_token_ms(gen, ids, args.gen_tokens, args.gen_reps)
            res[name] = min(res.get(name, float("inf")), ms)
    print(f"\ngeneration, batch 1, greedy, {args.gen_tokens} new tokens, per-token decode time")
    print(f"{'variant':<22}{'ms/token':>10}{'x base':>9}")
    for name, ms in res.items():
        print(f"{name:<22}{ms:>10.2f}{ms / res['base']:>9.3f}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "small"], default="small")
    ap.add_argument("--rounds", "--steps", type=int, default=16, help="timed rounds (one step of every variant each)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--sweep", action="store_true", help="time every shape of --shapes (no generation)")
    ap.add_argument(
        "--shapes",
        type=parse_shapes,
        default=parse_shapes("1x128,2x256,4x512,8x1024"),
        help="batch x sequence shapes of --sweep, e.g. 1x128,2x256",
    )
    ap.add_argument(
        "--train-path",
        choices=["auto", "measure", "fold", "add"],
        default="auto",
        help="Bone training path: the library default (auto: additive on CPU, timed per shape on "
        "GPU), timed per shape everywhere (measure), or pinned",
    )
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time steps by wall clock (default) or by this process's CPU time (CPU only; with --threads 1 it "
        "is nearly blind to other processes sharing the cores, which stretch wall times but not CPU time)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as started)")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--gen-reps", type=int, default=3)
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT's MiSS even if installed")
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="base weights (default: bfloat16 on CUDA, float32 on CPU; adapters stay float32 as in PEFT)",
    )
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device.type != "cpu":
        ap.error("--clock cpu times the CPU only: the GPU's work is not this process's CPU time")
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        print("note: --clock cpu with several threads also counts their spin-waiting", file=sys.stderr)
    args.clock_name = args.clock
    args.clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.rounds < 10:
        print("note: fewer than 10 timed rounds; medians are noisy", file=sys.stderr)
    if args.train_path != "auto":
        from bone import train_path

        train_path.force(args.train_path)
    with_peft = False
    if not args.no_peft:
        try:
            from peft import MissConfig  # noqa: F401

            with_peft = True
        except ImportError:
            print("peft with MiSS not installed: PEFT rows skipped", file=sys.stderr)
    base = build_model(args.model).to(device=args.device, dtype=getattr(torch, args.dtype))
    if args.sweep:
        bench_sweep(make_variants(base, with_peft), args)
        return
    if not args.skip_training:
        bench_training(make_variants(base, with_peft), args, args.batch, args.seq)
    if not args.skip_generation:
        bench_generation(base, args, with_peft)


if __name__ == "__main__":
    main()
