"""What co-training costs each member, measured on this worker's device: the bound on how much a group may slow
any one of its jobs (BONE_COTRAIN_MAX_SLOWDOWN).

A group's iteration runs every member's micro-batch in one forward/backward, so each member waits for the whole
group's rows. Whether that pays depends on the device, not on a rule: a GPU that one small job leaves mostly idle
runs 8 jobs' rows in about the time of one job's, while a saturated device (any CPU; a GPU at a 7 B model's
batch of 8 x 2048 tokens) takes about 8x as long, and then every member finishes ~8x later than it would alone,
for at best a few per cent more total throughput. So before claiming, the leader times the base's forward and
backward on its device at its own rows and at twice them (``StepCost.measure``; synthetic tokens, the base
frozen, the RNG untouched) and fits ``t(rows) = fixed + per_row x rows``. A companion is claimed only while the
predicted iteration time of the whole group stays within ``max_slowdown`` x the iteration time of the smallest
member alone (``admits``), i.e. while no member's steps would take longer than that multiple of its own.

The measurement is cached per (model, device, rows, padded length) for the worker process's life; it takes
about three iterations of the leader's size once (0.1-2 s on a CPU at the bench shapes, milliseconds on a GPU).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any, cast

import torch

REPEATS = 3  # timed passes per size (after one warm-up); their median is kept


@dataclass(frozen=True)
class StepCost:
    """Seconds of one forward/backward iteration as a function of its rows (at one padded length)."""

    fixed_s: float
    per_row_s: float
    measured_rows: int  # the smaller of the two sizes timed
    measured_s: tuple[float, float]  # median seconds at measured_rows and at twice it

    def seconds(self, rows: int) -> float:
        return self.fixed_s + self.per_row_s * rows

    def slowdown(self, group_rows: int, own_rows: int) -> float:
        """How much longer an iteration of ``group_rows`` takes than one of ``own_rows`` alone."""
        return self.seconds(group_rows) / self.seconds(own_rows)

    @classmethod
    def from_timings(cls, rows: int, alone_s: float, doubled_s: float) -> StepCost:
        # A line through the two points, kept physical: no negative fixed cost, no negative slope (noise can make
        # the doubled size time shorter on an idle GPU; that means "free", i.e. a slope of 0).
        per_row = max(0.0, (doubled_s - alone_s) / rows)
        fixed = max(0.0, alone_s - per_row * rows)
        if fixed == 0.0 and per_row == 0.0:
            per_row = max(alone_s, 1e-9) / rows
        return cls(fixed, per_row, rows, (alone_s, doubled_s))

    @classmethod
    def measure(cls, model: torch.nn.Module, rows: int, length: int, device: torch.device) -> StepCost | None:
        """Time ``model``'s forward and backward (the training loss) on random tokens at ``rows`` x ``length``
        and at twice the rows; None when twice the rows do not fit the device (no companion would either).

        Nothing of the model changes: no parameter gets a gradient (each is frozen for the measurement, and the
        embeddings' output is the only tensor that requires one; what a job's blocks add is small next to the
        base, see docs/performance.md's train-step table), and the global RNG states (the CPU's and the device's)
        are restored, so a job trained after the measurement is bit-identical to one trained without it."""
        cached = _CACHE.setdefault(model, {})
        key = (str(device), rows, length)
        if key not in cached:
            cuda = device.type == "cuda"
            vocab = int(cast(torch.nn.Embedding, _embeddings(model)).num_embeddings)
            # Timed as the frozen base (the floor of every training step): no parameter may require a gradient
            # meanwhile, or a plain model would compute (and hold) a gradient of every weight.
            trainable = [p for p in model.parameters() if p.requires_grad]
            try:
                for p in trainable:
                    p.requires_grad_(False)
                with torch.random.fork_rng(devices=[device] if cuda else []):
                    timings = [_time_iteration(model, r, length, vocab, device) for r in (rows, 2 * rows)]
            except torch.OutOfMemoryError:
                if cuda:
                    torch.cuda.empty_cache()
                return None  # not cached: the device may have room later
            finally:
                for p in trainable:
                    p.requires_grad_(True)
            cached[key] = cls.from_timings(rows, *timings)
        return cached[key]


# Per model object (a worker keeps its base loaded, model_cache.py): gone with the model.
_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[Any, ...], StepCost]] = weakref.WeakKeyDictionary()


def _time_iteration(model: torch.nn.Module, rows: int, length: int, vocab: int, device: torch.device) -> float:
    from worker.loss import CausalLMLoss  # the loss every training step computes (chunked output head)
    from worker.train import precision

    ids = torch.randint(0, vocab, (rows, length), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss_of = CausalLMLoss(model)
    autocast, _ = precision(device)
    # Gradients must flow back through every layer as in training, where the Bone blocks are the leaves; here the
    # embeddings' output is the only tensor that requires them, so no parameter gets a gradient.
    hook = _embeddings(model).register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True))
    seconds = []
    try:
        for n in range(REPEATS + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with autocast:
                loss = loss_of(**batch)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if n:  # the first pass warms caches and allocators
                seconds.append(time.perf_counter() - start)
    finally:
        hook.remove()
    return sorted(seconds)[len(seconds) // 2]


def _embeddings(model: torch.nn.Module) -> torch.nn.Module:
    return cast("torch.nn.Module", getattr(model, "get_input_embeddings")())  # noqa: B009 - typed loosely


def admits(cost: StepCost, member_rows: list[int], candidate_rows: int, max_slowdown: float) -> bool:
    """Would adding a member of ``candidate_rows`` keep every member (the candidate too) within ``max_slowdown``
    x its iteration time alone? ``member_rows``: the rows per iteration of the members already in the group.
    ``max_slowdown`` 0 means no bound."""
    if max_slowdown <= 0:
        return True
    group = sum(member_rows) + candidate_rows
    smallest = min([*member_rows, candidate_rows])
    return cost.slowdown(group, smallest) <= max_slowdown
