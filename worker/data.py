"""Training data: fetch a job's rows, check each row's format, tokenize it with the right loss mask.

Row formats (core/formats.py, the same checks the API and ``POST /files`` run):
  {"text": ...}                      loss on every token
  {"prompt": ..., "completion": ...} loss on the completion (and EOS) only; prompt labels are -100
  {"messages": [{role, content}...]} rendered with the tokenizer's chat template; loss on assistant turns only

Every example ends with EOS (so the model learns to stop), is cut to ``max_seq_length`` (cut rows are
counted) and keeps only examples that still have a token to learn from. Row numbers in errors are 0-based,
like the API's ``dataset.records.<i>``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias, overload

import numpy as np
import torch

from core.errors import InvalidRequest, NotFound
from core.files import SUFFIXES, FileStore, read_rows
from core.formats import detect_format
from core.jobs import FileDataset, InlineRecords, Job, PathDataset, dataset_ref
from core.paths import dataset_file, dataset_source
from core.settings import Settings

IGNORE_INDEX = -100  # what cross-entropy skips: prompt tokens, non-assistant turns, padding
# Token ids, labels, lengths: lists while built, numpy int arrays (not Sequences to a type checker) when read
# back from disk or measured from Arrow offsets (worker.tokenized).
Ints: TypeAlias = "Sequence[int] | np.ndarray"


class Cancelled(Exception):
    """Raised when ``should_stop()`` says so, in whatever phase (tokenizing, training, evaluating)."""


@dataclass
class Example:
    # Lists while built; read-only numpy int32 views when read back from disk (worker.tokenized).
    input_ids: Ints
    labels: Ints  # IGNORE_INDEX where no loss is taken
    # A packed block: the lengths of the whole examples it holds, in order (None: one plain example). Each
    # restarts its positions at 0 and attends only within itself (worker.batches.collate).
    segments: Ints | None = None


class ExampleSink(Protocol):
    """Where examples go as they are made instead of a list (``worker.tokenized.ExampleWriter``: an Arrow file)."""

    def add(self, example: Example) -> None: ...

    def finish(self) -> Sequence[Example]: ...

    def abort(self) -> None: ...


@dataclass
class TokenizedData:
    examples: Sequence[Example]
    rows: int
    truncated: int = 0  # rows cut to max_seq_length
    dropped: int = 0  # rows left with no trainable token after cutting
    formats: dict[str, int] = field(default_factory=dict)  # format -> rows


# --- where the rows come from ------------------------------------------------------------------------------
class _InlineRows(Protocol):  # the job or evaluation store: where inline rows are kept apart from the record
    def records(self, record_id: str, which: str = "records") -> list[dict[str, Any]] | None: ...


@overload
def load_rows(
    job: Job | Any, store: _InlineRows, settings: Settings, *, validation: Literal[False] = False
) -> list[dict[str, Any]]: ...
@overload
def load_rows(
    job: Job | Any, store: _InlineRows, settings: Settings, *, validation: bool
) -> list[dict[str, Any]] | None: ...
def load_rows(
    job: Job | Any, store: _InlineRows, settings: Settings, *, validation: bool = False
) -> list[dict[str, Any]] | None:
    """The job's rows (or its validation rows; None when it has none) as plain dicts, whichever dataset
    form it was created with. ``job`` is a ``Job`` or an evaluation (whose record keeps the summary as a dict)."""
    stored = job.validation_dataset if validation else job.dataset
    param = "validation_dataset" if validation else "dataset"
    if stored is None:
        return None
    dataset = dataset_ref(stored)
    if isinstance(dataset, InlineRecords):
        which = "validation_records" if validation else "records"
        rows = store.records(job.id, which)
        if rows is None:
            raise InvalidRequest(f"job {job.id} has no stored records (expired or deleted)", param=f"{param}.records")
        return rows
    if isinstance(dataset, PathDataset):
        return read_rows(resolve_dataset_path(dataset.path, settings, param=f"{param}.path"))
    if isinstance(dataset, FileDataset):
        try:
            path = FileStore.from_settings(settings).path(dataset.file_id)
        except NotFound as exc:
            raise InvalidRequest(
                f"{param}.file_id {dataset.file_id!r}: {exc.message}", param=f"{param}.file_id"
            ) from None
        return read_rows(path, label=dataset.file_id)
    source = hf_dataset_source(dataset.hf_dataset, settings, param=f"{param}.hf_dataset")
    return _load_with_datasets(
        source, settings, label=dataset.hf_dataset, split=dataset.split, revision=dataset.revision
    )


def resolve_dataset_path(relative: str, settings: Settings, *, param: str = "dataset.path") -> Path:
    """A ``{"path": ...}`` dataset: a file inside the datasets dir (core.paths holds the rule)."""
    return dataset_file(relative, datasets_dir=settings.datasets_dir, suffixes=SUFFIXES, param=param)


def hf_dataset_source(name: str, settings: Settings, *, param: str = "dataset.hf_dataset") -> str:
    """What ``datasets.load_dataset`` gets: a folder inside the datasets dir, or a hub id where the operator
    allows them. Never anything else: ``load_dataset`` would read any local folder (core.paths holds the rule)."""
    return dataset_source(name, datasets_dir=settings.datasets_dir, allow_hub=settings.allow_hub_datasets, param=param)


def _load_with_datasets(name: str, settings: Settings, *, label: str, **kwargs: Any) -> list[dict[str, Any]]:
    import datasets

    # A private cache per load: the Arrow files are only needed until the rows are in memory, and a shared
    # cache keyed by path could serve a stale copy of a file that was replaced under the same name.
    cache = Path(tempfile.mkdtemp(prefix="datasets-", dir=_ensure(settings.jobs_dir)))
    try:
        kwargs.setdefault("split", "train")
        loaded = datasets.load_dataset(name, cache_dir=str(cache), **kwargs)
        return loaded.to_list()
    except InvalidRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - a parse error is the user's data, say so in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidRequest(f"cannot read dataset {label!r}: {first}", param="dataset") from exc
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- one row -> one example -------------------------------------------------------------------------------
def encode_text(tokenizer, text: str) -> Example:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return Example(ids, list(ids))


def encode_prompt_completion(tokenizer, prompt: str, completion: str) -> Example:
    # Tokenized apart so the boundary is exact: no completion token is ever half prompt.
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def encode_messages(tokenizer, messages: list[dict[str, str]]) -> Example:
    """Render the whole conversation once, find each assistant turn's characters by rendering the prefix up
    to it, and take the loss on the tokens that start inside those spans. Tokenizing the full string once
    (instead of gluing pieces) keeps the tokens exactly those the model sees at inference.

    A span is what the model must produce after the generation prompt: the turn's content through the EOS
    that ends it. Not the role header (also when the conversation opens with an assistant turn, or the
    template has no generation prompt), nor what the template writes after the EOS (a newline before the
    next turn): the model stops at the EOS, so it never generates that."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    eos = tokenizer.eos_token
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_generation_prefix(tokenizer, messages[:i], full))
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        content_at = full.find(message["content"], start, end) if message["content"] else -1
        if content_at >= 0:  # a role header the generation prompt did not cover (e.g. "assistant: ")
            start = content_at
        if eos and eos in full[start:end]:
            end = full.rindex(eos, start, end) + len(eos)
        spans.append((start, end))
    # The template already writes any special tokens (BOS, EOS) as text.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if any(s <= a < e for s, e in spans) else IGNORE_INDEX for tok, (a, _) in zip(ids, enc["offset_mapping"])
    ]
    # Templates that end each turn with EOS already teach the model to stop; the others get one appended.
    if eos not in full:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if messages[-1]["role"] == "assistant" else IGNORE_INDEX)
    return Example(ids, labels)


def _generation_prefix(tokenizer, before: list[dict[str, str]], full: str) -> str:
    """The conversation up to an assistant turn, with the generation prompt (its role header). For an
    opening assistant turn that is the template's header on an empty conversation, when the template can
    render one that ``full`` starts with; else nothing (the content search above then skips the header)."""
    try:
        prefix = tokenizer.apply_chat_template(before, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates that index messages[0] cannot render an empty conversation
        return ""
    return prefix if full.startswith(prefix) else ""


ENCODERS: dict[str, Callable[[Any, dict[str, Any]], Example]] = {
    "text": lambda tok, row: encode_text(tok, row["text"]),
    "prompt_completion": lambda tok, row: encode_prompt_completion(tok, row["prompt"], row["completion"]),
    "messages": lambda tok, row: encode_messages(tok, row["messages"]),
}


def tokenize_rows(
    rows: list[dict[str, Any]],
    tokenizer,
    max_seq_length: int,
    *,
    format: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_every: int = 64,
    param_prefix: str = "dataset.records",
    into: ExampleSink | None = None,
) -> TokenizedData:
    """Every row, validated (as ``format`` when given) and encoded. ``should_stop`` is polled every
    ``poll_every`` rows so a cancel lands during a long tokenization too (it raises ``worker.train.Cancelled``).
    With ``into`` the examples are streamed there (and ``examples`` is what it finishes as), else kept in a list."""
    if tokenizer.eos_token_id is None:
        raise InvalidRequest(
            "the base model's tokenizer has no EOS token; cannot mark where examples end", param="base_model"
        )
    data = TokenizedData(examples=[], rows=len(rows))
    kept: list[Example] = []
    add = into.add if into is not None else kept.append
    count = 0
    try:
        for index, row in enumerate(rows):
            if should_stop is not None and index % poll_every == 0 and should_stop():
                raise Cancelled()
            kind = detect_format(row, index, format, param_prefix=param_prefix)
            data.formats[kind] = data.formats.get(kind, 0) + 1
            example = ENCODERS[kind](tokenizer, row)
            if len(example.input_ids) > max_seq_length:
                data.truncated += 1
                example = Example(example.input_ids[:max_seq_length], example.labels[:max_seq_length])
            if all(label == IGNORE_INDEX for label in example.labels[1:]):  # label 0 is never predicted
                data.dropped += 1
                continue
            add(example)
            count += 1
        if not count:
            raise InvalidRequest(
                f"no row has a token to learn from within max_seq_length={max_seq_length} "
                f"({data.rows} rows, {data.dropped} without trainable tokens)",
                param="training.max_seq_length",
            )
    except BaseException:
        if into is not None:
            into.abort()
        raise
    data.examples = into.finish() if into is not None else kept
    return data


# --- after tokenizing ---------------------------------------------------------------------------------------
def split_eval(examples: Sequence[Example], fraction: float, seed: int) -> tuple[Sequence[Example], Sequence[Example]]:
    """(train, eval): a seeded random ``fraction`` held out (at least one example, never all of them). On-disk
    examples stay on disk: both parts are views of the same file."""
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    if n_eval < 1:
        raise InvalidRequest("eval_fraction needs at least 2 training examples", param="training.eval_fraction")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    held = set(order[:n_eval])
    train_rows = [i for i in range(len(examples)) if i not in held]
    select = getattr(examples, "select", None)  # worker.tokenized.ArrowExamples: a view, no copy
    if select is not None:
        return select(train_rows), select(sorted(held))
    return [examples[i] for i in train_rows], [examples[i] for i in sorted(held)]


def pack(
    examples: Sequence[Example], max_seq_length: int, seed: int, *, into: ExampleSink | None = None
) -> Sequence[Example]:
    """Whole examples (seeded order) placed one after another into blocks of at most ``max_seq_length``
    tokens; a block is closed when the next example does not fit, so no example is ever cut in two. Each block
    records its examples' lengths (``segments``): collation restarts the positions at 0 for each and lets no
    token attend across examples, so a packed example computes exactly what it computes alone. The first
    token of every example but the block's first is no target (the previous example's last token must not
    learn to predict the next example); the block's own first token never is one anyway. With ``into`` the
    blocks are streamed there instead of kept in a list."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 2)).tolist()
    blocks: list[Example] = []
    add = into.add if into is not None else blocks.append
    # the open block's columns, as lists (an Example's fields may be read-only arrays)
    ids: list[int] = []
    block_labels: list[int] = []
    segments: list[int] = []
    try:
        for i in order:
            example = examples[i]
            if segments and len(ids) + len(example.input_ids) > max_seq_length:
                add(Example(ids, block_labels, segments))
                ids, block_labels, segments = [], [], []
            labels = [int(label) for label in example.labels]
            if segments:
                labels[0] = IGNORE_INDEX
            ids.extend(int(token) for token in example.input_ids)
            block_labels.extend(labels)
            segments.append(len(example.input_ids))
        if segments:
            add(Example(ids, block_labels, segments))
    except BaseException:
        if into is not None:
            into.abort()
        raise
    return into.finish() if into is not None else blocks
