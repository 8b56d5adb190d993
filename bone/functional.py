"""The Bone / Bat math as pure tensor functions (no modules, no state).

Shapes: a logical weight ``W`` is ``(out, in)``; transformers' Conv1D stores ``Wᵀ`` ``(in, out)`` and the
functions that take ``conv1d`` work on the stored orientation directly, so no transpose copy is made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chunk_sum(x: torch.Tensor, r: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """S_r(x): zero-pad the last dim of ``x`` to a multiple of ``r`` and sum its r-wide chunks -> (..., r).

    Pads by slicing instead of F.pad so the input is never copied (x is the largest tensor here). ``dtype``:
    accumulate and return in that dtype (e.g. a bf16 input for an fp32 block) without a converted copy of x."""
    d = x.shape[-1]
    nf, rem = divmod(d, r)
    if rem == 0:
        if nf > 1:
            return x.unflatten(-1, (nf, r)).sum(-2, dtype=dtype)
        return x if dtype is None or dtype == x.dtype else x.to(dtype)
    tail = x[..., nf * r :]
    if dtype is not None:
        tail = tail.to(dtype)
    if nf == 0:
        return F.pad(tail, (0, r - rem))
    s = x[..., : nf * r].unflatten(-1, (nf, r)).sum(-2, dtype=dtype)
    return torch.cat([s[..., :rem] + tail, s[..., rem:]], dim=-1)


# One-slot cache of the last chunk sum computed without autograd. Sibling projections (q/k/v, gate/up)
# receive the very same input tensor, so all but the first reuse it. Keyed on the tensor object (held, so
# its id cannot be recycled), its version counter (in-place edits invalidate) and r; swapped atomically.
_LAST_SUM: list = [None]


def cached_chunk_sum(x: torch.Tensor, r: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``chunk_sum`` of a contiguous tensor as (tokens, r), reusing the previous result for the same input
    tensor. Only for code that runs without autograd recording (no-grad paths and the forward of the
    training autograd Functions): the cached tensor carries no graph. Inference-mode tensors have no version
    counter, so they are never cached (an in-place edit could not be detected)."""
    dtype = dtype or x.dtype
    cacheable = not x.is_inference()
    v = x._version if cacheable else None
    hit = _LAST_SUM[0]
    if cacheable and hit is not None and hit[0] is x and hit[1] == v and hit[2] == r and hit[3] == dtype:
        return hit[4]
    x2 = x.view(-1, x.shape[-1])
    nf, rem = divmod(x2.shape[-1], r)
    if rem == 0 and dtype == x.dtype:
        s = x2.view(-1, nf, r).sum(1) if nf > 1 else x2
    else:
        s = chunk_sum(x2, r, dtype)
    _LAST_SUM[0] = (x, v, r, dtype, s) if cacheable else None
    return s


def expand_mini(block: torch.Tensor, out_features: int) -> torch.Tensor:
    """MiSS-mini: tile a (r, mini_r) block along the output axis to (r, out)."""
    return block.repeat(1, out_features // block.shape[1])


def bone_weight(weight: torch.Tensor, block: torch.Tensor, conv1d: bool, sign: float = 1.0) -> torch.Tensor:
    """A new weight ``W ± ΔW`` with ``ΔW[o, c] = block[c mod r, o]`` (block is (r, out)), in weight's layout.

    Works for any ``in`` (including ``r > in``): full chunks get the block, the tail gets its first rows."""
    b = block.to(weight.dtype)
    if sign < 0:
        b = -b
    if conv1d:  # stored (in, out): row c of the stored weight gets block[c mod r]
        fin = weight.shape[0]
        r = b.shape[0]
        nf, rem = divmod(fin, r)
        if rem == 0:
            return (weight.unflatten(0, (nf, r)) + b).flatten(0, 1)
        new = weight.clone()
        if nf:
            new[: nf * r].unflatten(0, (nf, r)).add_(b)
        new[nf * r :].add_(b[:rem])
        return new
    fin = weight.shape[1]
    bt = b.t()
    r = bt.shape[1]
    nf, rem = divmod(fin, r)
    if rem == 0:
        return (weight.unflatten(1, (nf, r)) + bt.unsqueeze(1)).flatten(1, 2)
    new = weight.clone()
    if nf:
        new[:, : nf * r].unflatten(1, (nf, r)).add_(bt.unsqueeze(1))
    new[:, nf * r :].add_(bt[:, :rem])
    return new


def bone_delta(block: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense (out, in) ΔW of a Bone block (for tests and inspection; the forward never builds it)."""
    r, out = block.shape
    reps = -(-in_features // r)
    return block.t().repeat(1, reps)[:, :in_features]


def _logical(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    return weight.t() if conv1d else weight


def bat_weight(weight: torch.Tensor, block: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """Bat: per r×r block ``W'_ij = W_ij (I + B_i) + B_i`` (block is (out/r, r, r)); returns the logical
    (out, in) weight in the block's dtype (computation happens in the adapter dtype)."""
    w = _logical(weight, conv1d).to(block.dtype)
    no, r, _ = block.shape
    out, fin = w.shape
    ni = fin // r
    wv = w.reshape(no, r, ni, r)  # copies only for Conv1D (transposed view)
    # W_ij + B_i  (broadcast over j), then + W_ij @ B_i via one batched matmul over the (r*ni, r) row stacks
    base = (wv + block.unsqueeze(2)).reshape(no, r * ni, r)
    return torch.baddbmm(base, wv.reshape(no, r * ni, r), block).reshape(out, fin)


def bat_unweight(weight: torch.Tensor, block: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """Inverse of :func:`bat_weight`: ``W_ij = (W'_ij − B_i)(I + B_i)⁻¹``; logical (out, in), block dtype.

    The inverse is computed in at least float32 (half precision inverses are not supported / too coarse)."""
    calc = torch.promote_types(block.dtype, torch.float32)
    b = block.to(calc)
    w = _logical(weight, conv1d).to(calc)
    no, r, _ = b.shape
    out, fin = w.shape
    ni = fin // r
    eye = torch.eye(r, dtype=calc, device=b.device)
    inv = torch.linalg.inv(eye + b)  # (no, r, r); raises if some I + B_i is singular
    wv = (w.reshape(no, r, ni, r) - b.unsqueeze(2)).reshape(no, r * ni, r)
    return torch.bmm(wv, inv).reshape(out, fin).to(block.dtype)
