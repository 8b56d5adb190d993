"""The training loss as a module: summed next-token cross-entropy over a micro-batch's trainable tokens.

``CausalLMLoss(model)(**batch)`` runs the decoder for hidden states and applies the output head (lm_head) in
chunks of ``chunk_tokens`` target positions, each under activation checkpointing: at most one chunk's
fp32 logits (chunk x vocabulary) exist at a time, in forward and in backward, instead of the whole
micro-batch's (batch x sequence x vocabulary: 8 x 2048 x 152 k fp32 = 10 GB for a Qwen2 vocabulary). Only
positions with a target enter the head at all (prompt tokens and padding never do).

It is a module so that ``DistributedDataParallel`` can wrap it: DDP must see the forward that produces the
loss. Models whose logits are not just ``lm_head(hidden)`` (soft-capping, logit scaling) take the plain path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from worker.data import IGNORE_INDEX

if TYPE_CHECKING:  # transformers is imported when a model loads, not with this module
    from transformers import PreTrainedModel

CHUNK_TOKENS = 1024
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # fp32 softmax: bf16 logits lose the small probabilities
    return F.cross_entropy(logits, targets, reduction="sum")


def _chunk_row_loss(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, row_of: torch.Tensor, rows: int
) -> torch.Tensor:
    """The chunk's cross-entropy summed per batch row: (rows,), zeros for rows with no token in the chunk."""
    logits = head(hidden).float()
    per_token = F.cross_entropy(logits, targets, reduction="none")
    return per_token.new_zeros(rows).index_add(0, row_of, per_token)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    *,
    chunk_tokens: int = CHUNK_TOKENS,
    per_row: bool = False,
) -> torch.Tensor:
    """Sum of cross-entropy of ``head(hidden)`` against ``targets`` (IGNORE_INDEX skipped), chunk by chunk.
    ``hidden``: (rows, ..., d) aligned with ``targets`` (rows, ...). ``per_row``: one sum per row, (rows,)
    (co-training weighs each job's rows by its own token count, worker/cotrain.py)."""
    keep = targets.reshape(-1) != IGNORE_INDEX
    h = hidden.reshape(-1, hidden.size(-1))[keep]
    t = targets.reshape(-1)[keep]
    rows = targets.shape[0]
    row_of = None
    if per_row:
        row_of = torch.arange(rows, device=targets.device).repeat_interleave(targets[0].numel())[keep]
    total = hidden.new_zeros((rows,) if per_row else (), dtype=torch.float32)
    for start in range(0, t.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        fn, args = (_chunk_loss, ()) if row_of is None else (_chunk_row_loss, (row_of[piece], rows))
        if torch.is_grad_enabled():  # recompute the chunk's logits in backward instead of keeping them
            total = total + checkpoint(fn, head, h[piece], t[piece], *args, use_reentrant=False)
        else:
            total = total + fn(head, h[piece], t[piece], *args)
    return total


def plain_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, per_row: bool = False) -> torch.Tensor:
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    if per_row:
        per_token = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        )
        return per_token.view(targets.shape).sum(dim=1)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under a Bone wrapper (its ``base_model``). A module's attributes type as
    ``Tensor | Module`` to mypy, so say what this one is."""
    return cast("PreTrainedModel", getattr(model, "base_model", model))


class CausalLMLoss(torch.nn.Module):
    """``forward(input_ids, attention_mask, labels, position_ids=None)`` -> summed loss (fp32 scalar); with
    ``per_row=True`` one sum per batch row (fp32, (rows,))."""

    def __init__(self, model: torch.nn.Module, *, chunk_tokens: int = CHUNK_TOKENS) -> None:
        super().__init__()
        self.model = model  # the Bone-wrapped causal LM; its parameters are this module's
        self.chunk_tokens = chunk_tokens
        causal_lm = _causal_lm(model)
        config = getattr(causal_lm, "config", None)
        self.chunked = (
            chunk_tokens > 0
            and hasattr(causal_lm, "get_decoder")
            and causal_lm.get_output_embeddings() is not None
            and not any(getattr(config, name, None) for name in _LOGIT_TRANSFORMS)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        per_row: bool = False,
    ) -> torch.Tensor:
        extra = {} if position_ids is None else {"position_ids": position_ids}
        if not self.chunked:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
            return plain_cross_entropy(out.logits, labels, per_row=per_row)
        causal_lm = _causal_lm(self.model)
        hidden = causal_lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
        ).last_hidden_state
        return chunked_cross_entropy(
            hidden[:, :-1],
            labels[:, 1:],
            causal_lm.get_output_embeddings(),
            chunk_tokens=self.chunk_tokens,
            per_row=per_row,
        )
