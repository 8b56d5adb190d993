"""Training data: fetch a job's rows, detect each row's format, tokenize it with the right loss mask.

Row formats (checked in this order, the same order as the API's ``check_record``):
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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from core.errors import InvalidRequest
from core.jobs import FileDataset, HFDataset, Job, PathDataset, RecordsDataset
from core.jobstore import JobStore
from core.settings import Settings

IGNORE_INDEX = -100  # what cross-entropy skips: prompt tokens, non-assistant turns, padding
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EXPECTED = "expected 'text', 'prompt'+'completion' or 'messages'"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken


@dataclass
class TokenizedData:
    examples: list[Example]
    rows: int
    truncated: int = 0  # rows cut to max_seq_length
    dropped: int = 0  # rows left with no trainable token after cutting
    formats: dict[str, int] = field(default_factory=dict)  # format -> rows


# --- where the rows come from ------------------------------------------------------------------------------
def load_rows(job: Job, store: JobStore, settings: Settings) -> list[dict[str, Any]]:
    """The job's rows as plain dicts, whichever dataset form it was created with."""
    kind = job.dataset
    if "records" in kind:
        rows = store.records(job.id)
        if rows is None:
            raise InvalidRequest(f"job {job.id} has no stored records (expired or deleted)", param="dataset.records")
        return rows
    if "path" in kind:
        return read_file(resolve_dataset_path(PathDataset(**kind).path, settings), settings)
    if "file_id" in kind:
        return read_file(resolve_uploaded_file(FileDataset(**kind).file_id, settings), settings)
    if "hf_dataset" in kind:
        spec = HFDataset(**kind)
        return _load_with_datasets(spec.hf_dataset, settings, label=spec.hf_dataset, split=spec.split,
                                   revision=spec.revision)
    raise InvalidRequest(f"job {job.id} has an unknown dataset form {sorted(kind)}", param="dataset")


def resolve_dataset_path(relative: str, settings: Settings) -> Path:
    """A ``{"path": ...}`` dataset: relative to the datasets dir, never outside it (no absolute paths, no
    '..', no symlink leading out). The API checks the same before queueing; the worker checks again because
    the file system may have changed since."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or relative.startswith("~") or ".." in pure.parts or "\\" in relative:
        raise InvalidRequest(f"dataset.path {relative!r} must be relative to the datasets dir without '..'",
                             param="dataset.path")
    root = settings.datasets_dir.resolve()
    path = (root / pure).resolve()
    if not path.is_relative_to(root):
        raise InvalidRequest(f"dataset.path {relative!r} leads outside the datasets dir", param="dataset.path")
    if not path.is_file():
        raise InvalidRequest(f"dataset.path {relative!r}: no such file in the datasets dir", param="dataset.path")
    return path


def resolve_uploaded_file(file_id: str, settings: Settings) -> Path:
    """An uploaded file (``POST /files``) stored as ``<files_dir>/<file_id><suffix>``."""
    if not file_id or "/" in file_id or "\\" in file_id or file_id.startswith("."):
        raise InvalidRequest(f"dataset.file_id {file_id!r} is not a file id", param="dataset.file_id")
    candidates = [settings.files_dir / (file_id + suffix) for suffix in ("", *FILE_BUILDERS)]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise InvalidRequest(f"dataset.file_id {file_id!r}: no such uploaded file", param="dataset.file_id")
    return found[0]


def read_file(path: Path, settings: Settings) -> list[dict[str, Any]]:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise InvalidRequest(f"dataset file {path.name!r} must be one of {', '.join(FILE_BUILDERS)}", param="dataset")
    return _load_with_datasets(builder, settings, label=path.name, data_files=str(path))


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
def detect_format(row: Any, index: int) -> str:
    """'text', 'prompt_completion' or 'messages'; anything else raises naming the row and the field."""
    def bad(what: str) -> InvalidRequest:
        return InvalidRequest(f"dataset row {index}: {what} ({EXPECTED})", param=f"dataset.records.{index}")

    if not isinstance(row, dict):
        raise bad(f"is a {type(row).__name__}, not an object")
    present = {k for k, v in row.items() if v is not None}  # CSV/Parquet fill missing columns with None
    if "text" in present:
        if not isinstance(row["text"], str) or not row["text"]:
            raise bad("field 'text' must be a non-empty string")
        return "text"
    if "prompt" in present or "completion" in present:
        for key in ("prompt", "completion"):
            if key not in present:
                raise bad(f"missing field {key!r}")
            if not isinstance(row[key], str):
                raise bad(f"field {key!r} must be a string")
        if not row["completion"]:
            raise bad("field 'completion' is empty: there is nothing to learn")
        return "prompt_completion"
    if "messages" in present:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad("field 'messages' must be a non-empty list")
        for turn, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise bad(f"messages[{turn}] needs string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise bad("'messages' has no assistant turn: there is nothing to learn")
        return "messages"
    raise bad("missing field 'text'")


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
    (instead of gluing pieces) keeps the tokens exactly those the model sees at inference."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    # The template already writes any special tokens (BOS, EOS) as text.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE_INDEX
              for tok, (a, _) in zip(ids, enc["offset_mapping"])]
    # Templates that end each turn with EOS already teach the model to stop; the others get one appended.
    if tokenizer.eos_token not in full:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if messages[-1]["role"] == "assistant" else IGNORE_INDEX)
    return Example(ids, labels)


ENCODERS: dict[str, Callable[[Any, dict[str, Any]], Example]] = {
    "text": lambda tok, row: encode_text(tok, row["text"]),
    "prompt_completion": lambda tok, row: encode_prompt_completion(tok, row["prompt"], row["completion"]),
    "messages": lambda tok, row: encode_messages(tok, row["messages"]),
}


def tokenize_rows(rows: list[dict[str, Any]], tokenizer, max_seq_length: int, *,
                  should_stop: Callable[[], bool] | None = None, poll_every: int = 256) -> TokenizedData:
    """Every row, validated and encoded. ``should_stop`` is polled every ``poll_every`` rows so a cancel
    lands during a long tokenization too (it raises ``worker.train.Cancelled``)."""
    from worker.train import Cancelled

    if tokenizer.eos_token_id is None:
        raise InvalidRequest("the base model's tokenizer has no EOS token; cannot mark where examples end",
                             param="base_model")
    data = TokenizedData(examples=[], rows=len(rows))
    for index, row in enumerate(rows):
        if should_stop is not None and index % poll_every == 0 and should_stop():
            raise Cancelled()
        kind = detect_format(row, index)
        data.formats[kind] = data.formats.get(kind, 0) + 1
        example = ENCODERS[kind](tokenizer, row)
        if len(example.input_ids) > max_seq_length:
            data.truncated += 1
            example = Example(example.input_ids[:max_seq_length], example.labels[:max_seq_length])
        if all(label == IGNORE_INDEX for label in example.labels[1:]):  # label 0 is never predicted
            data.dropped += 1
            continue
        data.examples.append(example)
    if not data.examples:
        raise InvalidRequest(
            f"no row has a token to learn from within max_seq_length={max_seq_length} "
            f"({data.rows} rows, {data.dropped} without trainable tokens)", param="training.max_seq_length")
    return data
