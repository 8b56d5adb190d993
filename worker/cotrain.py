"""Co-training: several jobs' Bone adapters trained together on ONE shared base model.

    cotrain(model, tokenizer, members, device=..., poll=...) -> None   (each member's outcome via its on_done)

Every member (one job) has its own adapter slot in the ``BoneModel`` (its own ``BoneConfig``: Bone or Bat,
any r, any targets), its own ``BatchStream`` (batch size, seed, data order, length grouping), its own AdamW,
learning-rate schedule, gradient accumulation, clipping, evaluation, checkpoints and callbacks. One group
iteration takes the next micro-batch of every member, concatenates the rows (padded to the longest), and runs
ONE forward and backward in which each row is routed to its own job's blocks (``bone.routing``: gradients
flow through the blocks in grad mode). The loss is a sum over rows of each row's summed cross-entropy divided
by ITS job's step token count (``CausalLMLoss(per_row=True)``), so every member's gradient is exactly the
one it would get training alone (``worker.train.train``); a member steps its optimizer once its own
micro-batches for the step are done. Nothing a member does touches another's parameters, moments or data.

Members join between iterations (``poll`` returns new ones; a joining member resumes from its own newest
checkpoint like a lone job) and leave when done, cancelled (``should_stop`` at its step boundaries) or
failed: its ``on_done`` gets the outcome, its adapter slot is deleted from the model and its optimizer
dropped, so its memory goes back. A member's exception never stops the others; a failure of the shared
forward/backward of several members (no single member's: an out-of-memory step may be the group's size alone)
reaches each as :class:`GroupStepFailed`, and the task sends each back to the queue to train alone.

Not co-trainable (``worker.cotrain_claims.solo_reason`` says why, and the leader claims nobody): gradient
checkpointing (it recomputes the forward outside the per-row routing context), more than one process or
node, FSDP sharding, trained biases (they belong to the shared base); and fp16 loss scaling (one scaler
cannot serve optimizers that step at different iterations: ``cotrain`` refuses it, a leader on such a GPU
claims nobody). Members of one group share the base model and device; packed and unpacked jobs mix (a packed
row makes the micro-batch use packed collation, in which an unpacked row is one segment: the same maths).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bone.routing import routing_context
from core.jobs import TrainingSpec
from core.names import TRAINING_SLOT
from worker import resume
from worker.batches import BatchStream, batch_tokens, collate, trainable_tokens
from worker.data import Cancelled, Example
from worker.eval_metrics import evaluate
from worker.loss import CausalLMLoss
from worker.tokenized import example_lengths
from worker.train import (
    EventCallback,
    TrainResult,
    clip_and_step,
    count_micro_batches,
    count_steps,
    due,
    make_optimizer,
    out_of_patience,
    precision,
    record_eval,
    set_step_lr,
    step_micro_batches,
)

if TYPE_CHECKING:
    from bone import BoneConfig, BoneModel
    from core.storage.resume_state import JobResume

log = logging.getLogger(__name__)


# --- a member -------------------------------------------------------------------------------------------
class GroupStepFailed(RuntimeError):
    """The shared forward/backward of a group of several jobs failed: not any one member's fault (an
    out-of-memory step may be the group's size alone), so a member that receives it is re-queued to train alone
    rather than failed (worker/cotrain_task.py)."""

    def __init__(self, cause: BaseException, members: int) -> None:
        super().__init__(f"the shared step of a co-training group of {members} jobs failed: {cause!r}")
        self.cause = cause


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


@dataclass
class Member:
    """One job of a group: what ``worker.train.train`` takes for it, plus where its adapter goes.

    ``on_step(step, total, loss, lr, grad_norm, tokens_per_s, share_s=..., rows=..., group_rows=...,
    co_trained_with=[...])``: as a lone job's, plus its share of the step's time (its rows / the iterations'
    rows x their seconds, summed over the step's iterations) and who it trained with during the step.
    ``on_done(member, result, error)``: once, when it leaves; on success its adapter is already saved in
    ``adapter_dir`` (if set); ``error`` is ``Cancelled`` for a cancel. ``on_join(trainable, total)``: once its
    adapter is in the model (its parameters, and the base's plus its own), before it resumes or trains."""

    key: str  # its adapter slot in the shared model (a job id)
    config: BoneConfig
    examples: Sequence[Example]
    spec: TrainingSpec
    eval_examples: Sequence[Example] = ()
    on_step: Callable[..., None] = _noop
    on_event: EventCallback = _noop
    should_stop: Callable[[], bool] = lambda: False
    on_done: Callable[[Member, TrainResult | None, BaseException | None], None] = _noop
    on_join: Callable[[int, int], None] = _noop
    checkpoint_dir: Path | None = None
    checkpoints_kept: int = 2
    shared_checkpoints: JobResume | None = None
    adapter_dir: Path | None = None


@dataclass
class _Running:
    """A member's loop state (what ``train`` keeps in locals)."""

    member: Member
    params: dict[str, torch.Tensor]  # by the name a lone job's checkpoint uses
    optimizer: torch.optim.Optimizer
    batches: BatchStream
    total_steps: int
    budget: int | None
    result: TrainResult
    loop: dict[str, Any]
    started: float
    step: int = 0
    pending: list[list[Example]] = field(default_factory=list)  # the step's micro-batches still to run
    n_targets: int = 1
    lr: float = 0.0
    step_loss: float = 0.0
    step_tokens: int = 0
    step_started: float = 0.0
    share_s: float = 0.0
    rows: int = 0
    group_rows: int = 0
    partners: set[str] = field(default_factory=set)
    epochs_before: int = 0

    @property
    def key(self) -> str:
        return self.member.key


# --- the loop ---------------------------------------------------------------------------------------------
def cotrain(
    model: BoneModel,
    tokenizer,
    members: Sequence[Member],
    *,
    device: torch.device,
    poll: Callable[[int], Sequence[Member]] | None = None,
    poll_every_s: float = 2.0,
    max_members: int | None = None,
    on_iteration: Callable[[dict[str, int], float], None] | None = None,
) -> None:
    """Train ``members`` together on ``model`` (a ``BoneModel``, possibly without adapters yet) until every
    member has left. ``poll(free_slots)`` is called between iterations, at most every ``poll_every_s``
    seconds while fewer than ``max_members`` train, and returns members to add. ``on_iteration(rows per
    member, seconds)`` after every iteration (metrics)."""
    autocast, scaler = precision(device)
    if scaler is not None:
        raise ValueError("co-training needs bf16 or fp32 (fp16 loss scaling cannot serve several optimizers)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    forward = CausalLMLoss(model)
    running: dict[str, _Running] = {}

    def leave(run: _Running, result: TrainResult | None, error: BaseException | None) -> None:
        running.pop(run.key, None)
        try:
            if error is None and run.member.adapter_dir is not None:
                model.save_pretrained(run.member.adapter_dir, adapter_name=run.key)
        except Exception as exc:  # noqa: BLE001 - its own failure, not the group's
            result, error = None, exc
        finally:
            run.optimizer.state.clear()
            model.delete_adapter(run.key)  # its blocks (and, through the optimizer going, its moments) go back
            if model.adapter_configs:
                model.set_adapter(list(running))
        try:
            run.member.on_done(run.member, result, error)
        except Exception:  # noqa: BLE001 - a reporting failure of one job never ends the others
            log.exception("member %s: on_done failed", run.key)

    def join(member: Member) -> None:
        if member.key in model.adapter_configs:  # already training here: the slot is the other's, keep it
            _safe_done(member, None, ValueError(f"{member.key} is already training in this group"))
            return
        try:
            run = _join(model, member, device, running)
        except Exception as exc:  # noqa: BLE001 - it never trained: nothing of it is left in the model
            if member.key in model.adapter_configs:
                model.delete_adapter(member.key)
                if model.adapter_configs:
                    model.set_adapter(list(running))
            _safe_done(member, None, exc)
            return
        running[member.key] = run

    for member in members:
        join(member)
    last_poll = time.monotonic()
    model.train()
    while running or poll is not None:
        # -- newcomers join at a step boundary of the group (between iterations)
        room = (max_members or 1 << 30) - len(running)
        if poll is not None and room > 0 and (not running or time.monotonic() - last_poll >= poll_every_s):
            last_poll = time.monotonic()
            newcomers = list(poll(room))
            if not newcomers and not running:
                break
            for member in newcomers[:room]:
                join(member)
            model.train()
        # -- members at a step boundary draw the step's micro-batches (or leave: done, cancelled, failed)
        for run in list(running.values()):
            if run.pending:
                continue
            try:
                if run.step >= run.total_steps:
                    _finish(run, model, tokenizer, device, autocast, pad_id)
                    leave(run, run.result, None)
                    continue
                if run.member.should_stop():
                    raise Cancelled()
                _begin_step(run, pad_id)
            except Exception as exc:  # noqa: BLE001 - Cancelled included: this member leaves, the others go on
                leave(run, None, exc)
        if not running:
            continue
        # -- one forward/backward over every member's next micro-batch, each row on its own adapter
        iteration_started = time.perf_counter()
        rows: list[Example] = []
        names: list[str] = []
        weights: list[float] = []
        owners: list[_Running] = []
        for run in running.values():
            micro = run.pending.pop(0)
            rows += micro
            names += [run.key] * len(micro)
            weights += [1.0 / run.n_targets] * len(micro)
            owners.append(run)
        try:
            batch = collate(rows, pad_id, device)
            with routing_context(names):
                with autocast:
                    per_row = forward(**batch, per_row=True)
                loss = (per_row * torch.tensor(weights, device=per_row.device)).sum()
                loss.backward()
            row_losses = (per_row.detach() * torch.tensor(weights, device=per_row.device)).tolist()
        except Exception as exc:  # noqa: BLE001 - the shared forward failed: no member can go on in it
            log.exception("co-training iteration failed for %s", [r.key for r in owners])
            # With partners, the step was the group's (an out-of-memory one may be the group's size alone):
            # no member's own failure, so each goes back to train alone. Alone, the failure is its own.
            failure = GroupStepFailed(exc, len(owners)) if len(owners) > 1 else exc
            for run in owners:
                leave(run, None, failure)
            continue
        seconds = time.perf_counter() - iteration_started
        counts = {}
        start = 0
        for run in owners:
            n = sum(1 for name in names if name == run.key)
            counts[run.key] = n
            run.step_loss += sum(row_losses[start : start + n])
            start += n
            run.rows += n
            run.group_rows += len(rows)
            run.share_s += seconds * n / len(rows)
            run.partners.update(r.key for r in owners if r is not run)
        if on_iteration is not None:
            try:
                on_iteration(counts, seconds)
            except Exception:  # noqa: BLE001 - metrics never stop training
                log.exception("co-training: on_iteration failed")
        # -- members whose step's micro-batches are all done: clip, step, report, evaluate, checkpoint
        for run in owners:
            if run.pending:
                continue
            try:
                if _end_step(run, model, tokenizer, device, autocast, pad_id):  # stopped early
                    _finish(run, model, tokenizer, device, autocast, pad_id)
                    leave(run, run.result, None)
            except Exception as exc:  # noqa: BLE001 - this member leaves, the others go on
                leave(run, None, exc)
    model.eval()


def _safe_done(member: Member, result: TrainResult | None, error: BaseException | None) -> None:
    try:
        member.on_done(member, result, error)
    except Exception:  # noqa: BLE001
        log.exception("member %s: on_done failed", member.key)


def _canonical(name: str, slot: str) -> str:
    """A parameter of slot ``slot`` named as a lone job's (slot ``TRAINING_SLOT``): checkpoints move freely
    between a lone run and a group."""
    return name[: -len(slot)] + TRAINING_SLOT


def _join(model: BoneModel, member: Member, device: torch.device, running: dict[str, _Running]) -> _Running:
    spec = member.spec
    if not member.examples:
        raise ValueError("no training examples")
    model.add_adapter(member.key, member.config)
    model.set_adapter([*running, member.key])  # every member's blocks trainable; rows pick theirs by routing
    suffix = f".{member.key}"
    params: dict[str, torch.Tensor] = {
        _canonical(n, member.key): p for n, p in model.named_parameters() if n.endswith(suffix)
    }
    if not params or not all(p.requires_grad for p in params.values()):
        raise ValueError("the model has no trainable parameters")
    trainable = sum(p.numel() for p in params.values())
    member.on_join(trainable, trainable + sum(p.numel() for p in model.parameters() if not p.requires_grad))
    lengths = example_lengths(member.examples) if spec.group_by_length else None
    total_steps = count_steps(len(member.examples), spec)
    run = _Running(
        member=member,
        params=params,
        optimizer=make_optimizer(list(params.values()), spec, device),
        batches=BatchStream(member.examples, spec.batch_size, spec.seed, lengths=lengths),
        total_steps=total_steps,
        budget=count_micro_batches(len(member.examples), spec),
        result=TrainResult(steps=0, total_steps=total_steps, epochs=0.0),
        loop={"micro_batches": 0, "seen": 0, "best_eval": None, "bad_evals": 0, "seconds": 0.0},
        started=time.perf_counter(),
    )
    newest = resume.newest(member.checkpoint_dir, member.shared_checkpoints) if member.checkpoint_dir else None
    if newest is not None:
        saved = resume.load(newest, model, run.optimizer, trainable=params)
        run.step = run.result.steps = run.result.resumed_from = saved["step"]
        run.result.losses, run.result.tokens, run.result.evals = saved["losses"], saved["tokens"], saved["evals"]
        run.loop.update({k: saved[k] for k in run.loop})
        run.batches.skip(run.loop["micro_batches"])
        member.on_event("resumed", f"resumed from the checkpoint of step {run.step}", step=run.step)
    member.on_event("phase", "", phase="training")
    return run


def _begin_step(run: _Running, pad_id: int) -> None:
    spec = run.member.spec
    run.step_started = time.perf_counter()
    run.lr = set_step_lr(run.optimizer, run.step, spec, run.total_steps)
    run.epochs_before = run.batches.epochs_done
    micro = step_micro_batches(run.batches, spec, run.budget)
    run.loop["seen"] += sum(len(b) for b in micro)
    # the divisor as a lone job counts it: target tokens of the step's collated micro-batches
    run.n_targets = max(1, sum(trainable_tokens(collate(b, pad_id, torch.device("cpu"))) for b in micro))
    run.step_tokens = sum(batch_tokens(b) for b in micro)
    run.pending = micro
    run.step_loss = 0.0
    run.share_s, run.rows, run.group_rows = 0.0, 0, 0
    run.partners = set()


def _end_step(run: _Running, model: BoneModel, tokenizer, device, autocast, pad_id: int) -> bool:
    """The member's optimizer step and what follows it; True when early stopping ends the member."""
    member, spec, result, loop = run.member, run.member.spec, run.result, run.loop
    grad_norm = clip_and_step(list(run.params.values()), run.optimizer, None, spec.max_grad_norm)
    done = run.step = run.step + 1
    elapsed = time.perf_counter() - run.step_started
    result.steps = done
    result.losses.append(run.step_loss)
    result.tokens += run.step_tokens
    result.epochs = loop["seen"] / len(member.examples)
    loop["micro_batches"] = run.batches.position
    member.on_step(
        done,
        run.total_steps,
        run.step_loss,
        run.lr,
        grad_norm,
        run.step_tokens / max(elapsed, 1e-9),
        share_s=run.share_s,
        rows=run.rows,
        group_rows=run.group_rows,
        co_trained_with=sorted(run.partners),
    )
    for epoch in range(run.epochs_before + 1, run.batches.epochs_done + 1):
        member.on_event("epoch", f"epoch {epoch} done at step {done}", epoch=epoch, step=done)

    if member.eval_examples and due(done, spec.eval_every, run.total_steps):
        got = _evaluate(run, model, device, autocast, pad_id)
        if out_of_patience(loop, got, spec):
            result.stopped_early = True
            member.on_event(
                "message",
                f"stopped early at step {done}: no better eval loss in {loop['bad_evals']} evaluations",
                step=done,
            )
            return True

    if member.checkpoint_dir is not None and due(done, spec.save_every, run.total_steps):
        member.on_event("phase", "", phase="checkpointing")
        now = time.perf_counter()
        loop["seconds"] += now - run.started
        run.started = now
        path = resume.save(
            member.checkpoint_dir,
            done,
            model,
            run.optimizer,
            {**loop, "losses": result.losses, "tokens": result.tokens, "evals": result.evals},
            adapter_name=run.key,
            keep=member.checkpoints_kept,
            shared=member.shared_checkpoints,
            trainable=run.params,
        )
        member.on_event(
            "checkpoint",
            f"checkpoint at step {done}",
            step=done,
            path=str(path),
            train_loss=run.step_loss,
            eval_loss=result.evals[-1]["eval_loss"] if result.evals else None,
        )
        member.on_event("phase", "", phase="training")
    return False


def _evaluate(run: _Running, model: BoneModel, device, autocast, pad_id: int) -> float:
    """Evaluate the member's adapter alone (every eval row routed to it); returns the eval loss."""
    member = run.member
    member.on_event("phase", "", phase="evaluating")
    with routing_context([run.key]):  # one name: every row of every eval batch, whatever its size
        got = evaluate(
            model,
            member.eval_examples,
            batch_size=member.spec.batch_size,
            pad_id=pad_id,
            device=device,
            autocast=autocast,
            should_stop=member.should_stop,
        )
    record_eval(run.result, member.on_event, run.step, got)
    return got.loss


def _finish(run: _Running, model: BoneModel, tokenizer, device, autocast, pad_id: int) -> None:
    """A last evaluation on the final weights (unless the loop just did one), the run's totals."""
    result = run.result
    if run.member.eval_examples and (not result.evals or result.evals[-1]["step"] != result.steps):
        _evaluate(run, model, device, autocast, pad_id)
    result.epochs = run.loop["seen"] / len(run.member.examples)
    result.seconds = run.loop["seconds"] + time.perf_counter() - run.started
