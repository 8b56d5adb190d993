"""Choosing every row's next token at once: greedy, temperature, top-k and top-p, per-row seeds.

A decode step's logits (rows, vocab) stay on the device until one transfer brings the chosen tokens (and
whether each row's logits were finite) to the host: a per-row ``int(...)`` would wait on the device once per
row per step, which dominates a large batch on a GPU.

- Greedy rows (temperature 0) take one argmax over the whole batch.
- Sampled rows are scaled by their temperature; rows with a top-k or top-p are sorted together (one sort for
  the batch), cut to their top k (then renormalized, as vLLM does) and to the smallest head whose mass reaches
  top_p; rows with neither skip the sort.
- The draw is the exponential race: ``argmax(p / q)`` with ``q ~ Exp(1)`` per token picks token i with
  probability p_i (the smallest of independent Exp(p_i) times wins), and needs no device sync, unlike
  ``torch.multinomial`` per row. A seeded row draws its q from its own ``torch.Generator`` (V uniforms per
  step, whatever else runs); every other operation works within a row, and which path a row takes (sorted or
  not) depends on its own parameters only. So a seeded row's tokens do not depend on its neighbours: in a
  batch they equal the same request alone.

A row's failure stays its own: drawing its noise is wrapped per row, and if the batched arithmetic raises,
every row is redone alone (the same operations on one row, hence the same tokens), so only the row that
raises again fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

GREEDY_BELOW = 1e-6  # temperatures under this are greedy (a float32 scale that small is 0 or inf anyway)
MAX_TOP_K = 1 << 20  # above any vocabulary: a larger top_k would mean "off" anyway; the bound keeps it an int


class Sampling(Protocol):
    """What the sampler reads of a row's parameters (``app.engine.batch.SamplingParams``)."""

    temperature: float
    top_p: float
    top_k: int
    seed: int | None


@dataclass
class Choices:
    """One step's choice, on the host: a token per row (meaningless where ``finite`` is false or ``errors``
    names an error), whether the row's logits were finite, and the error of a row whose sampling raised."""

    tokens: list[int]
    finite: list[bool]
    errors: list[BaseException | None]


def is_greedy(params: Sampling) -> bool:
    return params.temperature < GREEDY_BELOW


def is_filtered(params: Sampling) -> bool:
    """The row needs the sort: a top-k or a top-p that can cut something."""
    return params.top_k > 0 or params.top_p < 1.0


def make_generator(params: Sampling, device: torch.device) -> torch.Generator | None:
    """A seeded row's own random stream (created on its first sampled token); None: a stream shared by the
    unseeded rows."""
    if params.seed is None or is_greedy(params):
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def choose(logits: torch.Tensor, params: Sequence[Sampling], generators: Sequence[torch.Generator | None]) -> Choices:
    """Each row's next token from ``logits`` (rows, vocab); ``generators[j]`` is row j's seeded stream or None.
    One device→host transfer."""
    rows, vocab = logits.shape
    device = logits.device
    top = logits.amax(dim=-1, keepdim=True)
    # A NaN or +inf anywhere makes the row's max non-finite; so does a row that is -inf everywhere.
    finite = torch.isfinite(top.squeeze(-1))
    tokens = logits.argmax(dim=-1)
    errors: list[BaseException | None] = [None] * rows
    sampled = _sampled_rows(params, errors)
    if sampled:
        noise = _draw_noise([generators[j] for j in sampled], vocab, device, errors, sampled)
        ok = [n for n, j in enumerate(sampled) if errors[j] is None]
        if len(ok) < len(sampled):
            noise, sampled = noise[_index(ok, device)], [sampled[n] for n in ok]
    if sampled:
        picks = _race_or_alone(logits, top, sampled, [params[j] for j in sampled], noise, errors)
        ok = [n for n, j in enumerate(sampled) if errors[j] is None]
        if len(ok) < len(sampled):
            picks, sampled = picks[_index(ok, device)], [sampled[n] for n in ok]
        if sampled:
            tokens = tokens.index_copy(0, _index(sampled, device), picks)
    host_tokens, host_finite = torch.stack([tokens, finite.long()]).tolist()
    return Choices(tokens=host_tokens, finite=[bool(f) for f in host_finite], errors=errors)


_UNSEEDED: dict[torch.device, torch.Generator] = {}


def _unseeded_stream(device: torch.device) -> torch.Generator:
    """The stream of rows without a seed: seeded from the OS's entropy, not the process's global generator
    (which other code may seed), so unseeded answers differ from run to run."""
    device = torch.device(
        device.type,
        device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else None),
    )
    if device not in _UNSEEDED:
        generator = torch.Generator(device=device)
        generator.seed()
        _UNSEEDED[device] = generator
    return _UNSEEDED[device]


def _sampled_rows(params: Sequence[Sampling], errors: list[BaseException | None]) -> list[int]:
    """The rows to sample, those without a cut first (each group is then a slice: a view, not a copy)."""
    plain: list[int] = []
    cut: list[int] = []
    for j, p in enumerate(params):
        try:
            if not is_greedy(p):
                (cut if is_filtered(p) else plain).append(j)
        except Exception as exc:  # noqa: BLE001 - parameters that cannot be read: this row's failure alone
            errors[j] = exc
    return plain + cut


def _draw_noise(
    generators: list[torch.Generator | None],
    vocab: int,
    device: torch.device,
    errors: list[BaseException | None],
    rows: list[int],
) -> torch.Tensor:
    """Exp(1) noise (len(generators), vocab): a seeded row's from its own generator, the others' in one draw
    from a stream they share. A row whose draw raises gets its error in ``errors[rows[n]]``.

    By inversion of float64 uniforms: q = -log(1 - u) is then never below ~1e-16, where float32 noise stops
    at ~6e-8, and a token of negligible probability whose q lands there would win the race (at 32k tokens,
    about one step in five hundred). On a CPU it is also faster than ``exponential_``."""
    uniform = torch.empty((len(generators), vocab), dtype=torch.float64, device=device)
    unseeded = [n for n, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        uniform.uniform_(generator=_unseeded_stream(device))
    elif unseeded:
        rest = torch.empty((len(unseeded), vocab), dtype=torch.float64, device=device)
        uniform[_index(unseeded, device)] = rest.uniform_(generator=_unseeded_stream(device))
    for n, generator in enumerate(generators):
        if generator is None:
            continue
        try:
            uniform[n].uniform_(generator=generator)
        except Exception as exc:  # noqa: BLE001 - e.g. a generator on another device: this row's alone
            errors[rows[n]] = exc
    noise = uniform.neg_().log1p_().neg_().to(torch.float32)
    # q = 0 would make a token cut by top-k/top-p (p = 0) read 0 / 0 = nan, which argmax takes as the max
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)


def _race_or_alone(
    logits: torch.Tensor,
    top: torch.Tensor,
    rows: list[int],
    params: list[Sampling],
    noise: torch.Tensor,
    errors: list[BaseException | None],
) -> torch.Tensor:
    """``_race`` over the rows together; if that raises, over each row alone, recording the rows that fail
    (their pick is a placeholder)."""
    device = logits.device
    try:
        if len(rows) == logits.shape[0] and rows == sorted(rows):
            return _race(logits, top, params, noise)
        index = _index(rows, device)
        return _race(logits.index_select(0, index), top.index_select(0, index), params, noise)
    except Exception:  # noqa: BLE001 - find the row that raises; the others' tokens are what they would be anyway
        picks = []
        for n, j in enumerate(rows):
            try:
                picks.append(_race(logits[j : j + 1], top[j : j + 1], [params[n]], noise[n : n + 1]))
            except Exception as exc:  # noqa: BLE001 - this row's failure alone
                errors[j] = exc
                picks.append(torch.zeros(1, dtype=torch.long, device=device))
        return torch.cat(picks)


def _race(logits: torch.Tensor, top: torch.Tensor, params: list[Sampling], noise: torch.Tensor) -> torch.Tensor:
    """Sampled tokens (rows,) on the device: temperature, then top-k / top-p for the rows that ask, then the
    exponential race against ``noise`` (rows, vocab), which is indexed by token id. ``top``: each row's max
    logit. The rows without a cut come first."""
    rows, vocab = logits.shape
    device = logits.device
    temperature = _column([p.temperature for p in params], torch.float32, device)
    # Shift so the top logit is 0 before dividing: a tiny temperature then gives -inf, never inf - inf = nan.
    # exp of that is each token's probability up to the row's normalization, which the race does not need.
    weights = (logits.float() - top).div_(temperature).exp_()
    plain = sum(not is_filtered(p) for p in params)
    picks = []
    if plain:
        picks.append(weights[:plain].div_(noise[:plain]).argmax(dim=-1))
    if plain < rows:
        cut = params[plain:]
        top_k = _column([p.top_k if 0 < p.top_k < vocab else vocab for p in cut], torch.long, device)
        top_p = _column([p.top_p for p in cut], torch.float32, device)
        # stable: among equal weights the lower token id comes first, as argmax picks it (top_k=1 == greedy)
        ordered, order = torch.sort(weights[plain:], dim=-1, descending=True, stable=True)
        ordered.masked_fill_(torch.arange(vocab, device=device) >= top_k, 0.0)
        # the smallest head whose mass reaches top_p of what top-k left (renormalized, as vLLM does), always
        # at least the top token (so a top_p of 0 is greedy)
        mass = torch.cumsum(ordered, dim=-1)
        outside = (mass - ordered) >= top_p * mass[:, -1:]
        outside[:, 0] = False
        ordered.masked_fill_(outside, 0.0)
        position = ordered.div_(noise[plain:].gather(-1, order)).argmax(dim=-1, keepdim=True)
        picks.append(order.gather(-1, position).squeeze(-1))
    return picks[0] if len(picks) == 1 else torch.cat(picks)


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    # non_blocking from pageable memory: staged at once, without waiting for the work queued on the device
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True).unsqueeze(-1)
