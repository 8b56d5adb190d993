"""The Bone / Bat training step as autograd Functions, with the Bone path chosen by measurement.

Bone, ``y = x Wᵀ + b + S_r(x) @ B`` (equivalently ``x (W + ΔW)ᵀ + b``), can run each half of the step two ways:

- forward *fold*: build ``W + ΔW`` (one out×in add) and run ONE matmul;
  forward *add*: the base matmul, then ``y += S @ B`` accumulated in place (a tokens×r×out gemm, no temporary);
- backward *fold*: rebuild ``W + ΔW`` and ``dx = dy @ (W + ΔW)``;
  backward *add*: ``dx = dy @ W``, then ``dy @ Bᵀ`` (tokens×r) added to every r-wide chunk of dx in place —
  no full-weight rebuild.

Which is cheaper depends on the shape, dtype and device (a weight-sized memory pass against tokens-sized
ones), so on an accelerator it is timed once per (in, out, r, tokens bucket, dtype, device) at first use and
cached (:func:`choose`). On the CPU the pick is a fixed rule on the token count instead: the two forms round
differently, and a timing-based pick could differ between the process that wrote a checkpoint and the one that
resumes it, which would break the bit-identical CPU resume the service promises (a rule on the shape gives
every process the same pick for the same batch). The rule, from CPU-time measurements of one small-Llama
layer (hidden 512, 1 thread): additive up to 1024 tokens (at 512 tokens it cost 7 ms over the frozen
projections against 14 ms folded, r=16; 14 against 16–20 ms at r=64), even at 1024, folded from 2048 (5 against
31 ms at r=16, 29 against 52 ms at r=64): the additive form's extra gemms grow with the tokens, the fold's weight
rebuild does not. :func:`force` pins a path or asks for measuring everywhere (tests, benchmarks).
Either way the block gradient is one small gemm ``S_r(x)ᵀ @ dy`` with ``S_r(x)`` (tokens×r) saved from the
forward, never x, and the chunk sum is shared between sibling projections that read the same input (q/k/v,
gate/up) through :func:`bone.functional.cached_chunk_sum`, as in decoding.

Bat: the dense ``W'`` is built once in the forward and kept for ``dx`` (autograd would keep it as well), the
weight-shaped gradient ``dW' = dyᵀ x`` is the one weight-gradient matmul, and the block gradient comes from it
by one small batched matmul (``Σ_j W_ijᵀ dW'_ij + dW'_ij``).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import functional as BF

_CHOICES: dict[tuple, tuple[bool, bool]] = {}  # key -> (fold forward, fold backward)
_FORCED: list = [None]  # None (auto: a token-count rule on CPU, measured elsewhere), "measure", "fold" or "add"
CPU_FOLD_TOKENS = 2048  # on the CPU by default, fold both halves from this tokens bucket up (see above)
MODES = (None, "measure", "fold", "add")


def force(mode: str | None) -> None:
    """Pin the Bone training path: ``"fold"``, ``"add"``, ``"measure"`` (timed per shape on every device), or
    ``None`` for the default (on the CPU a fixed rule on the token count, so runs are reproducible; measured
    per shape elsewhere)."""
    if mode not in MODES:
        raise ValueError(f"train path must be one of {MODES}, got {mode!r}")
    _FORCED[0] = mode


def choices() -> dict[tuple, tuple[bool, bool]]:
    """The measured decisions so far (for benchmarks and logs)."""
    return dict(_CHOICES)


def clear() -> None:
    _CHOICES.clear()


def tokens_bucket(tokens: int) -> int:
    return 1 << max(tokens - 1, 0).bit_length()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fns: list, device: torch.device, rounds: int = 3) -> list[float]:
    """Min wall time of each callable, timed interleaved (A B A B …) so drift hits them alike."""
    for f in fns:  # warm-up (allocator, kernels)
        f()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


@torch.no_grad()
def _measure(fin: int, fout: int, rs: tuple[int, ...], tokens: int, dtype, device) -> tuple[bool, bool]:
    """Time both forms of each half on random tensors of this shape. The chunk sum is left out: both forms
    need it (the block gradient) and siblings share it."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, fin, generator=g, device=device, dtype=dtype)
    gy = torch.randn(tokens, fout, generator=g, device=device, dtype=dtype)
    w = torch.randn(fout, fin, generator=g, device=device, dtype=dtype)
    blocks = [torch.randn(r, fout, generator=g, device=device, dtype=dtype) * 0.01 for r in rs]
    sums = [BF.chunk_sum(x, r).contiguous() for r in rs]

    def fwd_fold():
        return F.linear(x, _fold(w, blocks, False))

    def fwd_add():
        y = F.linear(x, w)
        for s, b in zip(sums, blocks):
            y.addmm_(s, b)
        return y

    def bwd_fold():
        return gy @ _fold(w, blocks, False)

    def bwd_add():
        gx = gy @ w
        for b in blocks:
            _add_tiled_(gx, gy @ b.t())
        return gx

    t_ff, t_fa, t_bf, t_ba = _best([fwd_fold, fwd_add, bwd_fold, bwd_add], device)
    return t_ff < t_fa, t_bf < t_ba


def choose(fin: int, fout: int, rs: tuple[int, ...], tokens: int, dtype, device, conv1d: bool) -> tuple[bool, bool]:
    """(fold the forward?, fold the backward?) for this layer shape and token count; measured once per key."""
    forced = _FORCED[0]
    if forced in ("fold", "add"):
        return (forced == "fold",) * 2
    if forced is None and device.type == "cpu":
        return (tokens_bucket(tokens) >= CPU_FOLD_TOKENS,) * 2
    key = (fin, fout, rs, tokens_bucket(tokens), dtype, device.type, device.index, conv1d)
    hit = _CHOICES.get(key)
    if hit is None:
        hit = _CHOICES[key] = _measure(fin, fout, rs, tokens, dtype, device)
    return hit


def _fold(weight: torch.Tensor, blocks, conv1d: bool) -> torch.Tensor:
    w = weight
    for blk in blocks:
        w = BF.bone_weight(w, blk, conv1d)
    return w


def _add_tiled_(gx: torch.Tensor, gs: torch.Tensor) -> None:
    """gx (tokens, in) += gs (tokens, r) on every r-wide chunk of the input axis (the last one truncated)."""
    fin, r = gx.shape[-1], gs.shape[-1]
    nf, rem = divmod(fin, r)
    if nf:
        gx[:, : nf * r].unflatten(1, (nf, r)).add_(gs.unsqueeze(1))
    if rem:
        gx[:, nf * r :].add_(gs[:, :rem])


def _sum_for(x: torch.Tensor, x2: torch.Tensor, r: int, dtype) -> torch.Tensor:
    if x.is_contiguous():
        return BF.cached_chunk_sum(x, r, dtype)  # shared with the sibling projections reading this x
    return BF.chunk_sum(x2, r, dtype).contiguous()


class BoneTrainFn(torch.autograd.Function):
    """``y = x (W + Σ ΔW_k)ᵀ + b`` for Bone blocks (r_k, out). ``x`` and ``weight`` share a dtype; blocks may
    be in a wider one (fp32 adapters on a bf16 base): then only the additive forms run, and x is never
    converted (the chunk sum accumulates in the block dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv1d, fold_fwd, fold_bwd, *blocks):
        x2 = x.reshape(-1, x.shape[-1])
        same = all(b.dtype == x.dtype for b in blocks)
        fold_fwd, fold_bwd = fold_fwd and same, fold_bwd and same
        need_sums = fold_fwd is False or any(ctx.needs_input_grad[6:])
        sums = {}
        if need_sums:
            for blk in blocks:
                r = blk.shape[0]
                if (r, blk.dtype) not in sums:
                    sums[(r, blk.dtype)] = _sum_for(x, x2, r, blk.dtype)
        w = _fold(weight, blocks, conv1d) if fold_fwd else weight
        if conv1d:
            y = torch.addmm(bias, x2, w) if bias is not None else x2 @ w
        else:
            y = F.linear(x2, w, bias)
        if not fold_fwd:
            for blk in blocks:
                s = sums[(blk.shape[0], blk.dtype)]
                if blk.dtype == y.dtype:
                    y.addmm_(s, blk)
                else:
                    y.add_(s @ blk)
        saved = [sums[(b.shape[0], b.dtype)] if ctx.needs_input_grad[6 + i] else None for i, b in enumerate(blocks)]
        ctx.conv1d, ctx.fold_bwd, ctx.x_shape = conv1d, fold_bwd, x.shape
        ctx.has_bias, ctx.n_blocks = bias is not None, len(blocks)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight, *blocks, *saved)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, weight, *rest = ctx.saved_tensors
        n = ctx.n_blocks
        blocks, sums = rest[:n], rest[n:]
        conv1d = ctx.conv1d
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if ctx.fold_bwd:
                w = _fold(weight, blocks, conv1d)
                gx = g2 @ w.t() if conv1d else g2 @ w
            else:
                gx = g2 @ weight.t() if conv1d else g2 @ weight
                for blk in blocks:
                    _add_tiled_(gx, g2 @ blk.to(g2.dtype).t())
            gx = gx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = x2.t() @ g2 if conv1d else g2.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        gblocks: list[torch.Tensor | None] = []
        for s in sums:
            if s is None:
                gblocks.append(None)
            else:
                gblocks.append(s.t() @ (g2 if g2.dtype == s.dtype else g2.to(s.dtype)))
        return (gx, gw, gb, None, None, None, *gblocks)


def additive_default(device: torch.device, tokens: int) -> bool:
    """Does :func:`choose` answer "additive both ways" for this many tokens on this device without measuring?"""
    forced = _FORCED[0]
    return forced == "add" or (forced is None and device.type == "cpu" and tokens_bucket(tokens) < CPU_FOLD_TOKENS)


class BoneAddFn(torch.autograd.Function):
    """:class:`BoneTrainFn`'s additive path for the common training case, lean: nn.Linear layout, one block
    (r, out) in x's dtype with r dividing ``in``, x contiguous, weight and bias frozen. The same ops in the same
    order (so bit-identical results), without the generic bookkeeping: it runs for every projection of every
    step (28 in a small Llama), and on the CPU that Python costs about 1 % of a step."""

    @staticmethod
    def forward(ctx, x, weight, bias, block):
        s = BF.cached_chunk_sum(x, block.shape[0])  # (tokens, r), shared with sibling projections
        y = F.linear(x.view(-1, x.shape[-1]), weight, bias)
        y.addmm_(s, block)
        ctx.x_shape = x.shape
        ctx.save_for_backward(weight, block, s)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        weight, block, s = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = gblk = None
        if ctx.needs_input_grad[0]:
            gx = g2 @ weight
            gx.view(gx.shape[0], -1, block.shape[0]).add_((g2 @ block.t()).unsqueeze(1))
            gx = gx.view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            gblk = s.t() @ g2
        return gx, None, None, gblk


def bone_train(x, weight, bias, conv1d: bool, blocks: list[torch.Tensor]) -> torch.Tensor:
    fin = x.shape[-1]
    fout = weight.shape[1] if conv1d else weight.shape[0]
    fold_fwd, fold_bwd = False, False
    if all(b.dtype == x.dtype for b in blocks):
        fold_fwd, fold_bwd = choose(
            fin, fout, tuple(b.shape[0] for b in blocks), x.numel() // max(fin, 1), x.dtype, x.device, conv1d
        )
    return BoneTrainFn.apply(x, weight, bias, conv1d, fold_fwd, fold_bwd, *blocks)


class BatTrainFn(torch.autograd.Function):
    """``y = x W'ᵀ + b`` with ``W'_ij = W_ij (I + B_i) + B_i`` (nn.Linear layout, x / W / B in one dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, block):
        wp = BF.bat_weight(weight, block, conv1d=False)
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, wp, bias)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        ctx.save_for_backward(x2, weight, wp, block)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, weight, wp, block = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = gw = gb = gblk = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ wp).view(ctx.x_shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            gwp = g2.t() @ x2  # the one weight-shaped gradient matmul
            no, r, _ = block.shape
            ni = weight.shape[1] // r
            gv = gwp.view(no, r, ni, r)
            if ctx.needs_input_grad[3]:
                # dB_i = Σ_j W_ijᵀ dW'_ij + Σ_j dW'_ij, with the j blocks stacked as rows: one bmm + one sum
                wrows = weight.reshape(no, r * ni, r)
                gblk = torch.baddbmm(gv.sum(2), wrows.transpose(1, 2), gv.reshape(no, r * ni, r))
            if ctx.needs_input_grad[1]:
                # dW_ij = dW'_ij (I + B_i)ᵀ
                gw = (gv.reshape(no, r * ni, r) + torch.bmm(gv.reshape(no, r * ni, r), block.transpose(1, 2))).reshape(
                    weight.shape
                )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, gblk
