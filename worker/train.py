"""The training loop: reads top to bottom like nanoGPT's train.py, but as a function.

    train(model, tokenizer, examples, spec, device=...) -> TrainResult

Only parameters with ``requires_grad`` are optimised (the Bone blocks, after ``get_bone_model``). The loss
is the mean over every trainable token of one optimizer step, however the step is split into micro-batches
(gradient accumulation gives the same gradient as one big batch).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from core.jobs import TrainingSpec
from worker.data import IGNORE_INDEX, Example

StepCallback = Callable[[int, int, float, float, float, float], None]  # step, total, loss, lr, grad_norm, tokens/s


class Cancelled(Exception):
    """Raised inside the loop when ``should_stop()`` says so; nothing is saved."""


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    epochs: float  # examples seen / examples
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    tokens: int = 0  # non-padding tokens run through the model
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.losses[-1]

    def tail_loss(self, n: int = 10) -> float:
        """Mean of the last ``n`` step losses: steadier than the last one alone."""
        tail = self.losses[-n:]
        return sum(tail) / len(tail)


# --- small pure helpers --------------------------------------------------------------------------------------
def get_lr(step: int, *, base_lr: float, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based). Warm-up ramps linearly to ``base_lr`` without a
    zero step (nanoGPT's (step+1)/(warmup+1)); after it, HF's constant/linear/cosine schedules decay to
    zero at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler {schedule!r}")


def count_steps(n_examples: int, spec: TrainingSpec) -> int:
    """Optimizer steps for the run: ``max_steps`` if set, else enough for ``epochs`` passes."""
    if spec.max_steps is not None:
        return spec.max_steps
    micro_batches_per_epoch = math.ceil(n_examples / spec.batch_size)
    steps_per_epoch = micro_batches_per_epoch / spec.gradient_accumulation_steps
    return max(1, math.ceil(spec.epochs * steps_per_epoch))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def micro_batches(examples: Sequence[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """An endless stream of micro-batches: each epoch a fresh permutation from one seeded generator, so the
    order depends on the seed alone (not on global RNG use elsewhere). The last short batch of an epoch is
    kept: small datasets would otherwise lose rows."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]


def collate(batch: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding has attention 0 and label IGNORE_INDEX."""
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        attention_mask[row, :n] = 1
    return {k: v.to(device) for k, v in
            (("input_ids", input_ids), ("labels", labels), ("attention_mask", attention_mask))}


def trainable_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # position 0 is never a target


def summed_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over trainable tokens; the caller divides by the step's
    token count so every token weighs the same across micro-batches of different lengths."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()  # fp32 softmax: bf16 logits lose the small probabilities
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


# --- the loop ---------------------------------------------------------------------------------------------
def train(model: torch.nn.Module, tokenizer, examples: Sequence[Example], spec: TrainingSpec, *,
          device: torch.device, on_step: StepCallback | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    if not examples:
        raise ValueError("no training examples")

    # -- reproducibility: same seed, same data order, same initial state, same bytes (on CPU)
    seed_everything(spec.seed)
    batches = micro_batches(examples, spec.batch_size, spec.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # -- optimizer: trainable parameters only (the frozen base never enters the optimizer state)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    total_steps = count_steps(len(examples), spec)

    # -- precision: bf16 autocast on CUDA (fp32 master weights for the adapter), plain fp32 on CPU
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())

    result = TrainResult(steps=0, total_steps=total_steps, epochs=0.0)
    seen = 0
    model.train()
    started = time.perf_counter()
    for step in range(total_steps):
        if should_stop is not None and should_stop():
            raise Cancelled()
        step_started = time.perf_counter()
        lr = get_lr(step, base_lr=spec.learning_rate, schedule=spec.lr_scheduler,
                    warmup_steps=spec.warmup_steps, total_steps=total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # -- forward/backward over the step's micro-batches; each is divided by the step's token count
        step_batches = [collate(next(batches), pad_id, device) for _ in range(spec.gradient_accumulation_steps)]
        n_targets = max(1, sum(trainable_tokens(b) for b in step_batches))
        step_loss = 0.0
        step_tokens = 0
        for batch in step_batches:
            with autocast:
                loss = summed_loss(model, batch) / n_targets
            loss.backward()
            step_loss += loss.item()
            step_tokens += int(batch["attention_mask"].sum())
            seen += batch["input_ids"].size(0)

        # -- clip, step, clear (clip_grad_norm_ with inf measures the norm without clipping)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm or float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # -- bookkeeping
        elapsed = time.perf_counter() - step_started
        result.steps = step + 1
        result.losses.append(step_loss)
        result.tokens += step_tokens
        result.epochs = seen / len(examples)
        if on_step is not None:
            on_step(step + 1, total_steps, step_loss, lr, grad_norm, step_tokens / max(elapsed, 1e-9))

    model.eval()
    result.seconds = time.perf_counter() - started
    return result
