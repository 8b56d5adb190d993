"""Evaluation: mean next-token loss and token accuracy over the trainable tokens of held-out examples.

Token-weighted like training (each target token counts once, whatever its example's length), under
``no_grad`` and in eval mode; it draws no random numbers, so evaluating never changes the training run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.batches import collate
from worker.data import IGNORE_INDEX, Cancelled, Example


@dataclass
class EvalResult:
    loss: float
    token_accuracy: float
    tokens: int


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast,
    should_stop: Callable[[], bool] | None = None,
) -> EvalResult:
    was_training = model.training
    model.eval()
    loss_sum, correct, tokens = 0.0, 0, 0
    try:
        for start in range(0, len(examples), batch_size):
            if should_stop is not None and should_stop():  # a cancel lands within one eval batch
                raise Cancelled()
            batch = collate(list(examples[start : start + batch_size]), pad_id, device)
            with autocast:
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).logits
            logits = logits[:, :-1].float()
            targets = batch["labels"][:, 1:]
            mask = targets != IGNORE_INDEX
            loss_sum += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
                )
            )
            correct += int(((logits.argmax(-1) == targets) & mask).sum())
            tokens += int(mask.sum())
    finally:
        model.train(was_training)
    return EvalResult(loss=loss_sum / max(1, tokens), token_accuracy=correct / max(1, tokens), tokens=tokens)
