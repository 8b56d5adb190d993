"""The training loop: reads top to bottom like nanoGPT's train.py, but as a function.

    train(model, tokenizer, examples, spec, device=..., eval_examples=..., checkpoint_dir=...) -> TrainResult

Only parameters with ``requires_grad`` are optimised (the Bone blocks, after ``get_bone_model``). The loss
is the mean over every trainable token of one optimizer step, however the step is split into micro-batches
(gradient accumulation gives the same gradient as one big batch). With ``checkpoint_dir`` the loop saves
every ``save_every`` steps and, if a checkpoint is already there (a retried job), resumes from the newest:
the same seed then gives the same weights as a run that was never interrupted. With ``shared_checkpoints``
(the registry's store) the checkpoints are also written there and read back from there, so the retry may
run on another machine.

The loss is computed by ``worker.loss.CausalLMLoss`` (hidden states, then the output head in checkpointed
chunks: never the whole micro-batch's fp32 logits). On CUDA the forward runs under bf16 autocast, or fp16
with a ``GradScaler`` on GPUs without bf16. AdamW is the fused kernel (on the CPU as well).

With ``ranks`` (worker/distributed.py) the same loop runs in every process of a distributed job: each rank draws
the same global batches from the same seeded stream, runs only its disjoint shard of every micro-batch, and
``DistributedDataParallel`` averages the trainable (``bone_*``) gradients (each rank's loss is scaled by the
world size, so the average is the single-process gradient; ``no_sync`` on all but a step's last micro-batch).
Rank 0 alone reports, evaluates and checkpoints; it polls the stop flag and the verdict is shared.
With ``training.sharding = "full"`` the model is sharded by FSDP2 instead (worker/sharding.py) before the
optimizer is built (it steps on each rank's shards); every rank then evaluates and gathers the trainable
parameters for a checkpoint, since both are collectives, and rank 0 writes it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from core.jobs import TrainingSpec
from core.names import TRAINING_SLOT
from worker import resume, sharding
from worker.batches import Batch, BatchStream, batch_tokens, collate, trainable_tokens
from worker.data import IGNORE_INDEX, Cancelled, Example
from worker.eval_metrics import EvalResult, evaluate
from worker.loss import CausalLMLoss, plain_cross_entropy
from worker.ranks import Ranks
from worker.tokenized import example_lengths

if TYPE_CHECKING:
    from bone import BoneModel
    from core.storage.resume_state import JobResume

__all__ = ["Cancelled", "TrainResult", "collate", "count_steps", "get_lr", "train"]

StepCallback = Callable[[int, int, float, float, float, float], None]  # step, total, loss, lr, grad_norm, tokens/s
EventCallback = Callable[..., None]  # (kind, message, **data): epoch, eval, checkpoint, resumed, phase


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    epochs: float  # examples seen / examples
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    tokens: int = 0  # non-padding tokens run through the model
    seconds: float = 0.0
    evals: list[dict[str, float]] = field(default_factory=list)  # {step, eval_loss, eval_token_accuracy}
    stopped_early: bool = False
    resumed_from: int | None = None  # the checkpoint step this run continued from

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


def count_micro_batches(n_examples: int, spec: TrainingSpec) -> int | None:
    """Micro-batches for ``epochs`` passes (None with ``max_steps``: that run counts steps, not passes)."""
    if spec.max_steps is not None:
        return None
    return max(1, math.ceil(spec.epochs * math.ceil(n_examples / spec.batch_size)))


def count_steps(n_examples: int, spec: TrainingSpec) -> int:
    """Optimizer steps for the run: ``max_steps`` if set, else enough for ``epochs`` passes. The last step of
    an ``epochs`` run may accumulate fewer micro-batches, so the run sees ``epochs`` passes, not more."""
    micro_batches = count_micro_batches(n_examples, spec)
    if micro_batches is None:
        return spec.max_steps  # type: ignore[return-value]
    return max(1, math.ceil(micro_batches / spec.gradient_accumulation_steps))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def summed_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over trainable tokens, through the model's full logits
    (the reference ``CausalLMLoss`` is tested against); the loop divides by the step's token count so every
    token weighs the same across micro-batches of different lengths."""
    extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **extra
    ).logits
    return plain_cross_entropy(logits, batch["labels"])


def precision(device: torch.device):
    """(autocast context, GradScaler or None): bf16 autocast on CUDA where the GPU has bf16, else fp16 autocast
    with a loss scaler (fp16 gradients underflow without one); plain fp32 on CPU. Masters stay fp32."""
    if device.type != "cuda":
        return nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16), None
    return torch.autocast(device_type="cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def make_optimizer(params: list[torch.Tensor], spec: TrainingSpec, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, as the fused kernel (one kernel per step, not ~10 small ops per
    tensor) on CUDA and on the CPU. On the CPU the per-tensor loop cost ~2 ms a step for the 28 blocks of a
    small Llama (0.6 ms fused) and, being many small ops, far more when the cores are shared. Sharded (DTensor)
    parameters keep the default implementation. The fused kernel is deterministic, so a resumed run still
    matches an uninterrupted one bit for bit; it rounds differently from the loop (~1e-7)."""
    plain = all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point() for p in params)
    fused = plain and device.type in ("cuda", "cpu") and all(p.device.type == device.type for p in params)
    return torch.optim.AdamW(
        params,
        lr=spec.learning_rate,
        weight_decay=spec.weight_decay,
        fused=True if fused else None,  # None is AdamW's default: as if not passed
    )


def example_targets(example: Example) -> int:
    """Trainable tokens of one example as ``trainable_tokens`` counts them in a collated batch."""
    return int(np.count_nonzero(np.asarray(example.labels[1:]) != IGNORE_INDEX))


def due(step: int, every: int | None, total: int) -> bool:
    """After optimizer step ``step`` (1-based), is a periodic action due? Never on the last step: the end of
    the run has its own evaluation, and a checkpoint there would only be deleted again."""
    return every is not None and step % every == 0 and step < total


def enable_activation_checkpointing(model: BoneModel) -> None:
    """Non-reentrant checkpointing: the reentrant kind needs inputs that require grad, which a frozen
    base's embeddings never do. transformers 5 renamed the method (the old name warns)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def rank_batch(ranks: Ranks, batch: list[Example], pad_id: int, device: torch.device) -> tuple[Batch, float, int]:
    """(this rank's collated rows of a global micro-batch, loss weight, real tokens). A rank whose shard is empty (an
    epoch's last short batch on many ranks) runs one row with weight 0: DDP needs every rank in every
    backward, and a zero-weighted row adds nothing to the gradient."""
    shard = ranks.shard(batch)
    if shard:
        return collate(shard, pad_id, device), 1.0, batch_tokens(shard)
    return collate([batch[0]], pad_id, device), 0.0, 0


def _gradient_sync(forward: torch.nn.Module, sync: bool, sharded: bool):
    """Reduce gradients on this backward (``sync``) or let them accumulate: DDP's ``no_sync`` or FSDP2's switch."""
    if sharded:
        return sharding.gradient_sync(forward, sync)
    return nullcontext() if sync else forward.no_sync()  # type: ignore[operator]


def set_step_lr(optimizer: torch.optim.Optimizer, step: int, spec: TrainingSpec, total_steps: int) -> float:
    """Set (and return) the learning rate of optimizer step ``step`` (0-based) from the job's schedule."""
    lr = get_lr(
        step,
        base_lr=spec.learning_rate,
        schedule=spec.lr_scheduler,
        warmup_steps=spec.warmup_steps,
        total_steps=total_steps,
    )
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    return lr


def step_micro_batches(batches: BatchStream, spec: TrainingSpec, micro_batch_budget: int | None) -> list[list[Example]]:
    """The micro-batches of the next optimizer step; the last step of an ``epochs`` run stops where the
    requested passes end."""
    accumulate = spec.gradient_accumulation_steps
    if micro_batch_budget is not None:
        accumulate = min(accumulate, micro_batch_budget - batches.position)
    return [next(batches) for _ in range(accumulate)]


def clip_and_step(
    params: list[torch.Tensor], optimizer: torch.optim.Optimizer, scaler, max_grad_norm: float | None
) -> float:
    """Clip, step, clear; returns the gradient norm (clip_grad_norm_ with inf measures it without clipping)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = sharding.whole_float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when the fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def out_of_patience(loop: dict[str, Any], eval_loss: float, spec: TrainingSpec) -> bool:
    """Record an evaluation in the loop state; True when early stopping's patience is spent."""
    if loop["best_eval"] is None or eval_loss < loop["best_eval"]:
        loop["best_eval"], loop["bad_evals"] = eval_loss, 0
    else:
        loop["bad_evals"] += 1
    return spec.early_stopping_patience is not None and loop["bad_evals"] >= spec.early_stopping_patience


def record_eval(result: TrainResult, on_event: EventCallback, step: int, got: EvalResult) -> None:
    """An evaluation into the result and the job's events; training resumes."""
    result.evals.append({"step": step, "eval_loss": got.loss, "eval_token_accuracy": got.token_accuracy})
    on_event(
        "eval",
        f"step {step}: eval loss {got.loss:.4f}, token accuracy {got.token_accuracy:.3f}",
        step=step,
        eval_loss=got.loss,
        eval_token_accuracy=got.token_accuracy,
        eval_tokens=got.tokens,
    )
    on_event("phase", "", phase="training")


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


# --- the loop ---------------------------------------------------------------------------------------------
def train(
    model: BoneModel,
    tokenizer,
    examples: Sequence[Example],
    spec: TrainingSpec,
    *,
    device: torch.device,
    eval_examples: Sequence[Example] = (),
    on_step: StepCallback | None = None,
    on_event: EventCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_dir: Path | None = None,
    checkpoints_kept: int = 2,
    shared_checkpoints: JobResume | None = None,
    adapter_name: str = TRAINING_SLOT,
    ranks: Ranks | None = None,
) -> TrainResult:
    if not examples:
        raise ValueError("no training examples")
    on_step = on_step or _noop
    on_event = on_event or _noop
    stop = should_stop or (lambda: False)
    main = ranks is None or ranks.is_main  # the rank that reports, evaluates and checkpoints

    # -- reproducibility: same seed, same data order, same initial state, same bytes (on CPU)
    seed_everything(spec.seed)
    lengths = example_lengths(examples) if spec.group_by_length else None
    batches = BatchStream(examples, spec.batch_size, spec.seed, lengths=lengths)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # -- sharded (FSDP2): the parameters become shards, so shard before the optimizer takes them
    sharded = ranks is not None and ranks.sharded
    forward: torch.nn.Module = CausalLMLoss(model)
    if sharded:
        sharding.shard(forward, model, device, ranks.world_size)  # type: ignore[union-attr]

    # -- optimizer: trainable parameters only (the frozen base never enters the optimizer state)
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = make_optimizer(params, spec, device)
    total_steps = count_steps(len(examples), spec)
    micro_batch_budget = count_micro_batches(len(examples), spec)

    # -- memory and precision: recompute activations if asked (non-reentrant: the frozen base's inputs need
    #    no grad); bf16 (or fp16 + loss scaling) autocast on CUDA with fp32 master weights, plain fp32 on CPU
    if spec.gradient_checkpointing:
        enable_activation_checkpointing(model)
    autocast, scaler = precision(device)

    def run_eval(step: int) -> EvalResult:
        on_event("phase", "", phase="evaluating")
        # sharded: every rank evaluates (each layer's gather is a collective), so none may stop half-way
        with sharding.root_gathered(forward) if sharded else nullcontext():
            got = evaluate(
                model,
                eval_examples,
                batch_size=spec.batch_size,
                pad_id=pad_id,
                device=device,
                autocast=autocast,
                should_stop=None if sharded else stop,
            )
        record_eval(result, on_event, step, got)
        return got

    # -- resume: the newest complete checkpoint restores weights, optimizer, RNG and the data position
    result = TrainResult(steps=0, total_steps=total_steps, epochs=0.0)
    loop: dict[str, Any] = {"micro_batches": 0, "seen": 0, "best_eval": None, "bad_evals": 0, "seconds": 0.0}
    start = 0
    newest = resume.newest(checkpoint_dir, shared_checkpoints) if checkpoint_dir is not None else None
    if newest is not None:
        saved = resume.load(newest, model, optimizer, sharded=sharded)
        start = result.steps = result.resumed_from = saved["step"]
        result.losses, result.tokens, result.evals = saved["losses"], saved["tokens"], saved["evals"]
        loop.update({k: saved[k] for k in loop})
        batches.skip(loop["micro_batches"])
        on_event("resumed", f"resumed from the checkpoint of step {start}", step=start)
    # DDP broadcasts rank 0's trainable weights as it wraps: every rank starts from them, whatever its own init
    if ranks is not None and not sharded:
        forward = ranks.wrap(forward)
    world = ranks.world_size if ranks is not None else 1

    model.train()
    started = time.perf_counter()
    on_event("phase", "", phase="training")
    for step in range(start, total_steps):
        if ranks.any(stop()) if ranks is not None else stop():  # rank 0 polls; every rank stops together
            raise Cancelled()
        step_started = time.perf_counter()
        lr = set_step_lr(optimizer, step, spec, total_steps)

        # -- forward/backward over the step's micro-batches; each is divided by the step's token count
        epochs_before = batches.epochs_done
        global_batches = step_micro_batches(batches, spec, micro_batch_budget)
        loop["seen"] += sum(len(b) for b in global_batches)
        if ranks is None:
            step_batches = [(collate(b, pad_id, device), 1.0, batch_tokens(b)) for b in global_batches]
            n_targets = max(1, sum(trainable_tokens(b) for b, _, _ in step_batches))
        else:  # this rank's rows of each micro-batch; the divisor counts every rank's tokens
            n_targets = max(1, sum(example_targets(ex) for b in global_batches for ex in b))
            step_batches = [rank_batch(ranks, b, pad_id, device) for b in global_batches]
        step_loss = 0.0
        step_tokens = 0
        for i, (batch, weight, tokens) in enumerate(step_batches):
            # gradients are reduced across ranks once per step: on its last micro-batch's backward
            sync = ranks is None or i == len(step_batches) - 1
            with _gradient_sync(forward, sync, sharded):
                with autocast:
                    loss = forward(**batch) * (weight / n_targets)
                (scaler.scale(loss * world) if scaler is not None else loss * world).backward()
            step_loss += loss.item()
            step_tokens += tokens
        if ranks is not None:  # the step's loss and token count over every rank (DDP synced the gradients)
            step_loss, step_tokens = ranks.sum_stats(step_loss, step_tokens)

        # -- clip, step, clear (clip_grad_norm_ with inf measures the norm without clipping)
        grad_norm = clip_and_step(params, optimizer, scaler, spec.max_grad_norm)

        # -- bookkeeping
        done = step + 1
        elapsed = time.perf_counter() - step_started
        result.steps = done
        result.losses.append(step_loss)
        result.tokens += step_tokens
        result.epochs = loop["seen"] / len(examples)
        loop["micro_batches"] = batches.position
        on_step(done, total_steps, step_loss, lr, grad_norm, step_tokens / max(elapsed, 1e-9))
        for epoch in range(epochs_before + 1, batches.epochs_done + 1):
            on_event("epoch", f"epoch {epoch} done at step {done}", epoch=epoch, step=done)

        # -- evaluate; stop early when the eval loss has not improved for `patience` evaluations
        if eval_examples and due(done, spec.eval_every, total_steps):
            patience_out = False
            if main or sharded:  # rank 0 evaluates (sharded: all do); the others wait for its verdict
                patience_out = out_of_patience(loop, run_eval(done).loss, spec)
            if ranks is not None:
                patience_out = ranks.from_main(patience_out)
            if patience_out:
                result.stopped_early = True
                on_event(
                    "message",
                    f"stopped early at step {done}: no better eval loss in {loop['bad_evals']} evaluations",
                    step=done,
                )
                break

        # -- checkpoint: everything the next attempt needs to carry on exactly here
        if checkpoint_dir is not None and due(done, spec.save_every, total_steps) and sharded:
            gathered = resume.Gathered(sharding.trainable_state(model), sharding.optimizer_state(model, optimizer))
        else:
            gathered = None
        if main and checkpoint_dir is not None and due(done, spec.save_every, total_steps):
            on_event("phase", "", phase="checkpointing")
            loop["seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            path = resume.save(
                checkpoint_dir,
                done,
                model,
                optimizer,
                {**loop, "losses": result.losses, "tokens": result.tokens, "evals": result.evals},
                adapter_name=adapter_name,
                keep=checkpoints_kept,
                shared=shared_checkpoints,
                gathered=gathered,
            )
            on_event(
                "checkpoint",
                f"checkpoint at step {done}",
                step=done,
                path=str(path),
                train_loss=step_loss,
                eval_loss=result.evals[-1]["eval_loss"] if result.evals else None,
            )
            on_event("phase", "", phase="training")

    # -- a last evaluation on the final weights (unless the loop just did one)
    if (main or sharded) and eval_examples and (not result.evals or result.evals[-1]["step"] != result.steps):
        run_eval(result.steps)
    model.eval()
    result.epochs = loop["seen"] / len(examples)
    result.seconds = loop["seconds"] + time.perf_counter() - started
    return result
