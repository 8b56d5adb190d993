"""The decode loop: one batch of prompts, each row with its own adapter, sampling parameters and stops.

A hand-written loop over the model with a KV cache instead of ``generate()`` because every row differs:
its temperature / top_p / seed, its stop strings, its token budget. Rows that finish are dropped from the
batch (and from the KV cache), so a short answer never pays for a long neighbour's steps.

Prompts are left-padded; positions are counted from each row's first real token, so a padded row computes
exactly what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

# forward(input_ids, attention_mask, position_ids, past_key_values, adapter_names) -> (last logits, cache)
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, list[str]], tuple[torch.Tensor, Any]]


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Row:
    """One request's state in a running batch. ``decode`` turns token ids into text (special tokens dropped)."""

    prompt_ids: list[int]
    adapter_slot: str  # the name the adapter has inside the model, or the base marker
    params: SamplingParams
    eos_ids: frozenset[int]
    decode: Callable[[list[int]], str]
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text
    should_stop: Callable[[], bool] = lambda: False  # e.g. the client went away
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _emitted: int = 0
    _generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def choose(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        if self._generator is None:
            self._generator = torch.Generator(device=logits.device)
            if p.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(p.seed)
        probs = torch.softmax(logits.float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= p.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def push(self, token: int) -> None:
        self.generated.append(token)
        if token in self.eos_ids:
            self._finish("stop")
            return
        self.text = self.decode(self.generated)
        cut = _first_stop(self.text, self.params.stop)
        if cut is not None:
            self.text = self.text[:cut]
            self._finish("stop")
        elif len(self.generated) >= self.params.max_new_tokens:
            self._finish("length")
        elif self.should_stop():
            self._finish("abort")
        else:
            self._emit(final=False)

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self.on_text is None:
            return
        end = len(self.text) if final else _safe_end(self.text, self.params.stop)
        if end > self._emitted:
            piece, self._emitted = self.text[self._emitted:end], end
            self.on_text(piece)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be streamed: not a tail that may still grow into a stop string, nor a
    half-decoded multi-byte character (shown as U+FFFD until its last byte arrives)."""
    end = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                end = min(end, len(text) - k)
                break
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end


def decode_batch(forward: Forward, rows: list[Row], pad_id: int, device: torch.device) -> None:
    """Run ``rows`` to completion, filling in each row's ``text``, ``generated`` and ``finish_reason``."""
    longest = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - len(row.prompt_ids):] = torch.tensor(row.prompt_ids, dtype=torch.long)
        mask[i, longest - len(row.prompt_ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    active = list(range(len(rows)))
    logits, cache = forward(ids, mask, positions, None, [r.adapter_slot for r in rows])
    while True:
        # One device→host copy for all greedy rows (a sync per row per step would dominate on a GPU).
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for j, i in enumerate(active):
            token = greedy[j] if rows[i].params.temperature == 0 else rows[i].choose(logits[j])
            rows[i].push(token)
            tokens.append(token)
        keep = [j for j, i in enumerate(active) if not rows[i].finished]
        if not keep:
            return
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, positions = mask.index_select(0, index), positions.index_select(0, index)
            active = [active[j] for j in keep]
            tokens = [tokens[j] for j in keep]
        step_ids = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        positions = positions[:, -1:] + 1
        logits, cache = forward(step_ids, mask, positions, cache, [rows[i].adapter_slot for i in active])
