"""The RQ task the API enqueues by dotted path for ``POST /evals``: ``worker.evals.run_eval_job(eval_id)``.

One evaluation scores several adapters (and the base model) on the same rows, sharing every batch through
the mixed-adapter path: the base model is wrapped once in a ``BoneModel`` holding every adapter, and each
batch of ``b`` examples becomes ``b × n`` rows (one copy per adapter, ``BASE_ADAPTER`` for the base model) run
in ONE forward with ``adapter_names``. Row ``i`` then equals that example run on that adapter alone.

* **Loss / perplexity / token accuracy**: rows are tokenized exactly as training tokenizes them
  (``worker.data``), so the loss is taken where training takes it (completion, assistant turns, or all
  text); token-weighted over the whole set; perplexity is ``exp(loss)``.
* **Exact match**: for rows with a reference completion (prompt/completion, or messages ending with an
  assistant turn) the prompt alone is decoded greedily (left-padded, one ``generate`` for all adapters) and
  compared with the reference after stripping whitespace.

Outcomes are written to the evaluation record (never RQ's failed registry), and each evaluated adapter's
record under ``bone:adapter_eval:<name>`` (``GET /adapters/{name}`` → ``latest_eval``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import redis
import torch
import torch.nn.functional as F

from core.adapter_loading import read_adapter
from core.base_model import eos_token_ids, pick_device
from core.errors import Conflict
from core.evals import EvalMetrics, EvalStore, Evaluation, LatestEval
from core.formats import detect_format
from core.jobs import JobStatus
from core.logs import job_id_var
from core.names import BASE_ADAPTER, AdapterName
from core.registry import AdapterRegistry
from worker import model_cache
from worker.batches import collate
from worker.context import current_settings
from worker.data import IGNORE_INDEX, Cancelled, Example, load_rows, tokenize_rows
from worker.tasks import describe_failure

log = logging.getLogger(__name__)


# --- the task -----------------------------------------------------------------------------------------------
def run_eval_job(eval_id: str) -> str:
    """Run one evaluation; returns its final status (also written to the record)."""
    settings = current_settings()
    context = job_id_var.set(eval_id)
    conn = redis.Redis.from_url(settings.redis_url)
    store = EvalStore(conn)
    try:
        evaluation = _start(store, eval_id)
        if evaluation is None:
            return store.get(eval_id).status.value
        try:
            results, shas = evaluate_adapters(evaluation, store, settings)
        except Cancelled:
            _finish(store, eval_id, JobStatus.CANCELLED)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the evaluation's `error`
            log.exception("evaluation %s failed", eval_id)
            _finish(store, eval_id, JobStatus.FAILED, error=describe_failure(exc))
        else:
            done = _finish(store, eval_id, JobStatus.SUCCEEDED, results=results, adapter_sha256=shas)
            if done is not None:
                record_latest(store, done)
        return store.get(eval_id).status.value
    finally:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        job_id_var.reset(context)
        conn.close()


def _start(store: EvalStore, eval_id: str) -> Evaluation | None:
    evaluation = store.get(eval_id)
    if evaluation.status.is_final:
        return None
    if store.cancel_requested(eval_id):
        _finish(store, eval_id, JobStatus.CANCELLED)
        return None
    try:
        return store.transition(eval_id, [JobStatus.QUEUED], status=JobStatus.RUNNING, started_at=time.time())
    except Conflict:
        return None  # running elsewhere already, or changed meanwhile


def _finish(store: EvalStore, eval_id: str, status: JobStatus, **fields: Any) -> Evaluation | None:
    try:
        done = store.transition(eval_id, None, status=status, finished_at=time.time(), **fields)
    except Conflict:
        log.warning("evaluation %s was already final; not marking it %s", eval_id, status.value)
        return None
    log.info("evaluation %s %s%s", eval_id, status.value, f": {done.error}" if done.error else "")
    return done


def record_latest(store: EvalStore, evaluation: Evaluation) -> None:
    base = evaluation.results.get(BASE_ADAPTER)
    for name in evaluation.adapters:
        store.set_latest(
            name,
            LatestEval(
                eval_id=evaluation.id,
                sha256=evaluation.adapter_sha256[name],
                dataset=evaluation.dataset,
                metrics=evaluation.results[name],
                base=base,
                created_at=evaluation.created_at,
                finished_at=evaluation.finished_at,
            ),
        )


# --- the evaluation -----------------------------------------------------------------------------------------
def evaluate_adapters(
    evaluation: Evaluation, store: EvalStore, settings
) -> tuple[dict[str, EvalMetrics], dict[str, str]]:
    """(results by name, sha256 by adapter name) for one evaluation record."""
    from bone import BoneModel

    def stop() -> bool:
        return store.cancel_requested(evaluation.id)

    def progress(**fields: Any) -> None:
        try:
            store.transition(evaluation.id, [JobStatus.RUNNING], progress=fields)
        except Conflict:
            pass

    device = pick_device(settings)
    progress(phase="loading")
    rows = load_rows(evaluation, store, settings)[: evaluation.max_examples]
    if stop():
        raise Cancelled()
    model, tokenizer = model_cache.model_for_job(evaluation.base_model, settings, device)
    bone_model = BoneModel(model)
    bone_model.eval()
    registry = AdapterRegistry.from_settings(settings)
    slots, shas = load_adapters(bone_model, registry, evaluation.adapters, evaluation.base_model)
    names = evaluation.names
    row_slots = [slots.get(name, BASE_ADAPTER) for name in names]

    progress(phase="tokenizing")
    fmt = evaluation.dataset.get("format")
    data = tokenize_rows(rows, tokenizer, evaluation.max_seq_length, format=fmt, should_stop=stop)
    prompts = completion_prompts(rows, tokenizer, evaluation.max_seq_length, format=fmt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    total = len(data.examples)
    scores = score_rows(
        bone_model,
        data.examples,
        row_slots,
        batch_size=evaluation.batch_size,
        pad_id=pad_id,
        device=device,
        autocast=autocast,
        should_stop=stop,
        on_batch=lambda done: progress(phase="scoring", examples_done=done, examples_total=total),
    )
    matches: list[tuple[int, int]] | None = None
    if evaluation.max_new_tokens > 0 and prompts:
        matches = exact_matches(
            bone_model,
            tokenizer,
            prompts,
            row_slots,
            batch_size=evaluation.batch_size,
            max_new_tokens=evaluation.max_new_tokens,
            pad_id=pad_id,
            device=device,
            autocast=autocast,
            should_stop=stop,
            on_batch=lambda done: progress(phase="generating", examples_done=done, examples_total=len(prompts)),
        )
    results = {}
    for i, name in enumerate(names):
        s = scores[i]
        loss = s.loss_sum / s.tokens if s.tokens else None
        metrics = EvalMetrics(
            loss=loss,
            perplexity=_perplexity(loss),
            tokens=s.tokens,
            examples=total,
            token_accuracy=s.correct / s.tokens if s.tokens else None,
        )
        if matches is not None:
            hits, n = matches[i]
            metrics.exact_match, metrics.exact_match_examples = (hits / n if n else None), n
        results[name] = metrics
    return results, shas


def _perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


def load_adapters(
    bone_model, registry: AdapterRegistry, names: Sequence[str], base_model: str | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """Add each registry adapter to ``bone_model`` under its slot (``AdapterName.slot``); returns
    ({name: slot}, {name: sha256}). Weights are sha256-checked, keys and shapes strictly."""
    slots, shas = {}, {}
    for name in names:
        config, tensors, info = read_adapter(registry, name, param="adapters")
        if base_model is not None and info.base_model != base_model:
            raise Conflict(
                f"adapter {name!r} was trained on base model {info.base_model!r}, not {base_model!r}",
                param="adapters",
                code="base_model_mismatch",
            )
        slot = AdapterName(name).slot(info.sha256)
        bone_model.add_adapter_from_state_dict(slot, config, tensors)
        slots[name], shas[name] = slot, info.sha256
    return slots, shas


# --- loss and token accuracy, all adapters in one forward per batch ----------------------------------------
@dataclass
class RowScore:
    loss_sum: float = 0.0
    correct: int = 0
    tokens: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.tokens)

    @property
    def token_accuracy(self) -> float:
        return self.correct / max(1, self.tokens)


@torch.no_grad()
def score_rows(
    bone_model,
    examples: Sequence[Example],
    slots: Sequence[str],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast=None,
    should_stop: Callable[[], bool] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[RowScore]:
    """One ``RowScore`` per entry of ``slots`` (an adapter slot or ``BASE_ADAPTER``) over every example. Each
    batch of ``b`` examples runs as ``len(slots) × b`` rows in one forward: rows ``[k*b, (k+1)*b)`` use
    ``slots[k]``."""
    autocast = autocast or nullcontext()
    n = len(slots)
    scores = [RowScore() for _ in slots]
    for start in range(0, len(examples), batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled()
        batch = list(examples[start : start + batch_size])
        b = len(batch)
        tensors = collate(batch * n, pad_id, device)
        names = [slot for slot in slots for _ in range(b)]
        with autocast:
            logits = bone_model(
                input_ids=tensors["input_ids"],
                attention_mask=tensors["attention_mask"],
                adapter_names=names,
                use_cache=False,
            ).logits
        logits = logits[:, :-1].float()
        targets = tensors["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        row_loss = (token_loss * mask).sum(1).view(n, b).sum(1).tolist()
        row_correct = ((logits.argmax(-1) == targets) & mask).sum(1).view(n, b).sum(1).tolist()
        row_tokens = mask.sum(1).view(n, b).sum(1).tolist()
        for k in range(n):
            scores[k].loss_sum += row_loss[k]
            scores[k].correct += int(row_correct[k])
            scores[k].tokens += int(row_tokens[k])
        if on_batch is not None:
            on_batch(start + b)
    return scores


# --- exact match: greedy completions, all adapters in one generate per batch --------------------------------
@dataclass
class Prompt:
    input_ids: list[int]
    reference: str


def completion_prompts(
    rows: Sequence[dict[str, Any]], tokenizer, max_seq_length: int, *, format: str | None = None
) -> list[Prompt]:
    """The rows that have a reference completion, as (prompt tokens, reference), tokenized as training does
    (``worker.data``): prompt/completion rows, and messages rows whose last turn is the assistant's. Rows
    whose prompt alone exceeds ``max_seq_length`` are left out."""
    prompts = []
    for index, row in enumerate(rows):
        kind = detect_format(row, index, format)
        if kind == "prompt_completion":
            ids, reference = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"], row["completion"]
        elif kind == "messages" and row["messages"][-1]["role"] == "assistant":
            history = [{"role": m["role"], "content": m["content"]} for m in row["messages"][:-1]]
            text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            ids, reference = tokenizer(text, add_special_tokens=False)["input_ids"], row["messages"][-1]["content"]
        else:
            continue
        if 0 < len(ids) <= max_seq_length:
            prompts.append(Prompt(list(ids), reference))
    return prompts


@torch.no_grad()
def generate_rows(
    bone_model,
    tokenizer,
    prompts: Sequence[Prompt],
    slots: Sequence[str],
    *,
    max_new_tokens: int,
    pad_id: int,
    device: torch.device,
    autocast=None,
) -> list[list[str]]:
    """Greedy completions: ``out[k][j]`` is prompt ``j`` under ``slots[k]``, all in one left-padded generate."""
    autocast = autocast or nullcontext()
    n, b = len(slots), len(prompts)
    width = max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((n * b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n * b, width), dtype=torch.long)
    for k in range(n):
        for j, prompt in enumerate(prompts):
            row, length = k * b + j, len(prompt.input_ids)
            input_ids[row, width - length :] = torch.tensor(prompt.input_ids)
            attention_mask[row, width - length :] = 1
    eos = sorted(eos_token_ids(bone_model, tokenizer))
    with autocast:
        out = bone_model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            adapter_names=[slot for slot in slots for _ in range(b)],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=pad_id,
        )
    texts = []
    for row in out[:, width:].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in eos), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return [texts[k * b : (k + 1) * b] for k in range(n)]


def exact_matches(
    bone_model,
    tokenizer,
    prompts: Sequence[Prompt],
    slots: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    pad_id: int,
    device: torch.device,
    autocast=None,
    should_stop: Callable[[], bool] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[int, int]]:
    """(hits, prompts) per entry of ``slots``."""
    hits = [0] * len(slots)
    for start in range(0, len(prompts), batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled()
        batch = list(prompts[start : start + batch_size])
        outputs = generate_rows(
            bone_model,
            tokenizer,
            batch,
            slots,
            max_new_tokens=max_new_tokens,
            pad_id=pad_id,
            device=device,
            autocast=autocast,
        )
        for k, texts in enumerate(outputs):
            hits[k] += sum(text.strip() == p.reference.strip() for text, p in zip(texts, batch))
        if on_batch is not None:
            on_batch(start + len(batch))
    return [(h, len(prompts)) for h in hits]
