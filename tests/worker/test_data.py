import io
import json
import os

import pytest

from core.errors import InvalidRequest
from worker.data import (
    IGNORE_INDEX,
    Example,
    detect_format,
    load_rows,
    pack,
    resolve_dataset_path,
    split_eval,
    tokenize_rows,
)
from worker.train import Cancelled


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- formats and loss masks ------------------------------------------------------------------------------
def test_text_rows_take_the_loss_on_every_token_and_end_with_eos(base):
    tok = base.tokenizer
    (example,) = tokenize_rows([{"text": "hello"}], tok, 64).examples
    assert example.input_ids == ids(tok, "hello") + [tok.eos_token_id]
    assert example.labels == example.input_ids


def test_prompt_completion_masks_exactly_the_prompt(base):
    tok = base.tokenizer
    (example,) = tokenize_rows([{"prompt": "Q: 2+2?\nA:", "completion": " 4"}], tok, 64).examples
    prompt, completion = ids(tok, "Q: 2+2?\nA:"), ids(tok, " 4") + [tok.eos_token_id]
    assert example.input_ids == prompt + completion
    assert example.labels == [IGNORE_INDEX] * len(prompt) + completion


def test_messages_take_the_loss_on_assistant_turns_only(base):
    tok = base.tokenizer
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hey"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    (example,) = tokenize_rows([{"messages": messages}], tok, 256).examples
    assert example.input_ids == ids(tok, tok.apply_chat_template(messages, tokenize=False))
    learned = tok.decode([t for t in example.labels if t != IGNORE_INDEX])
    # Each assistant turn's content and the EOS that ends it: not the newline the template writes after the
    # EOS (the model stops at the EOS and never generates it), nothing of system or user.
    assert learned == "hey<|eos|>ciao<|eos|>"
    # The masked positions are contiguous runs that start right after "<|assistant|>\n".
    text_before_first = tok.decode(example.input_ids[: example.labels.index(ids(tok, "h")[0])])
    assert text_before_first.endswith("<|assistant|>\n")


def test_messages_get_an_eos_when_the_template_has_none(base):
    import copy

    tok = copy.deepcopy(base.tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (example,) = tokenize_rows(
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], tok, 64
    ).examples
    assert example.input_ids[-1] == tok.eos_token_id
    # This template has no generation prompt: its role line is still not learned, only what follows it.
    assert tok.decode([t for t in example.labels if t != IGNORE_INDEX]) == "b\n<|eos|>"


@pytest.mark.parametrize(
    "messages, learned",
    [
        (
            [
                {"role": "assistant", "content": "Hi, how can I help?"},
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y"},
            ],
            "Hi, how can I help?<|eos|>y<|eos|>",
        ),
        ([{"role": "assistant", "content": "opening"}], "opening<|eos|>"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "<|eos|>"),
    ],
)
def test_an_opening_assistant_turn_learns_no_role_header(base, messages, learned):
    tok = base.tokenizer
    (example,) = tokenize_rows([{"messages": messages}], tok, 256).examples
    assert tok.decode([t for t in example.labels if t != IGNORE_INDEX]) == learned
    assert example.labels[0] == IGNORE_INDEX  # "<" of "<|assistant|>"


@pytest.mark.parametrize(
    "row, message, field",
    [
        (
            {"foo": "x"},
            "dataset row 3: missing field 'text' (expected 'text', 'prompt'+'completion' or 'messages')",
            "",
        ),
        ({"prompt": "x"}, "dataset row 3: missing field 'completion'", ""),
        ({"prompt": "x", "completion": ""}, "dataset row 3: field 'completion' is empty", ".completion"),
        ({"text": 5}, "dataset row 3: field 'text' must be a non-empty string", ".text"),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            "dataset row 3: 'messages' has no assistant turn",
            ".messages",
        ),
        (
            {"messages": [{"role": "user"}]},
            "dataset row 3: messages[0] needs string 'role' and 'content'",
            ".messages.0",
        ),
        (["not", "a", "dict"], "dataset row 3: is a list", ""),
    ],
)
def test_a_bad_row_is_named(base, row, message, field):
    rows = [{"text": "ok"}] * 3 + [row]
    with pytest.raises(InvalidRequest) as info:
        tokenize_rows(rows, base.tokenizer, 64)
    assert info.value.message.startswith(message)
    assert info.value.param == "dataset.records.3" + field


@pytest.mark.parametrize(
    "fmt, row, message",
    [
        ("text", {"prompt": "p", "completion": "c"}, "dataset row 1: missing field 'text' (expected format 'text')"),
        ("messages", {"text": "t"}, "dataset row 1: field 'messages' must be a non-empty list"),
        ("prompt_completion", {"text": "t", "prompt": "p"}, "dataset row 1: missing field 'completion'"),
    ],
)
def test_an_explicit_format_is_required_of_every_row(base, fmt, row, message):
    good = {
        "text": {"text": "t"},
        "messages": {"messages": [{"role": "assistant", "content": "a"}]},
        "prompt_completion": {"prompt": "p", "completion": "c"},
    }[fmt]
    assert tokenize_rows([good], base.tokenizer, 64, format=fmt).formats == {fmt: 1}
    with pytest.raises(InvalidRequest) as info:
        tokenize_rows([good, row], base.tokenizer, 64, format=fmt)
    assert info.value.message.startswith(message)


def test_an_explicit_format_overrides_detection(base):
    # Detected, {"text", "prompt", "completion"} is a text row anyway; asked for prompt_completion it is one.
    row = {"text": "ignored", "prompt": "ab", "completion": "cd"}
    (example,) = tokenize_rows([row], base.tokenizer, 64, format="prompt_completion").examples
    assert example.labels[: len(ids(base.tokenizer, "ab"))] == [IGNORE_INDEX] * len(ids(base.tokenizer, "ab"))


def test_format_detection_ignores_empty_columns():
    # CSV / Parquet files give every row every column; missing values arrive as None.
    assert detect_format({"text": None, "prompt": "p", "completion": "c"}, 0) == "prompt_completion"
    assert detect_format({"text": "t", "prompt": None, "completion": None}, 0) == "text"


def test_long_rows_are_cut_and_counted_and_rows_left_without_targets_are_dropped(base):
    rows = [{"text": "x" * 50}, {"prompt": "p" * 40, "completion": "c"}, {"text": "short"}]
    data = tokenize_rows(rows, base.tokenizer, 16)
    assert (data.rows, data.truncated, data.dropped, len(data.examples)) == (3, 2, 1, 2)
    assert all(len(ex.input_ids) <= 16 for ex in data.examples)
    assert data.formats == {"text": 2, "prompt_completion": 1}


def test_no_trainable_row_at_all_is_an_error(base):
    with pytest.raises(InvalidRequest, match="no row has a token to learn from"):
        tokenize_rows([{"prompt": "p" * 40, "completion": "c"}], base.tokenizer, 16)


def test_tokenizing_stops_when_cancelled(base):
    with pytest.raises(Cancelled):
        tokenize_rows([{"text": "a"}] * 10, base.tokenizer, 16, should_stop=lambda: True)


# --- where rows come from ---------------------------------------------------------------------------------
ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def write_dataset(path, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        path.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in ROWS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_path_datasets_load_from_the_datasets_dir(settings, store, make_job, fmt):
    write_dataset(settings.datasets_dir / "sub" / f"train.{fmt}", fmt)
    job = make_job(dataset={"path": f"sub/train.{fmt}"})
    assert load_rows(job, store, settings) == ROWS


def test_inline_records_come_from_the_job_store(settings, store, make_job):
    job = make_job(ROWS)
    assert load_rows(job, store, settings) == ROWS


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.jsonl", "sub/../../outside.jsonl", "~/x.jsonl"])
def test_paths_outside_the_datasets_dir_are_refused(settings, path):
    (settings.data_dir / "outside.jsonl").write_text('{"text": "secret"}\n')
    with pytest.raises(InvalidRequest) as info:
        resolve_dataset_path(path, settings)
    assert info.value.param == "dataset.path"


def test_a_symlink_leading_out_of_the_datasets_dir_is_refused(settings, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "secret"}\n')
    settings.datasets_dir.mkdir(parents=True)
    os.symlink(secret, settings.datasets_dir / "link.jsonl")
    with pytest.raises(InvalidRequest, match="is not available") as info:
        resolve_dataset_path("link.jsonl", settings)
    assert info.value.param == "dataset.path"


def test_an_unreadable_file_is_a_one_line_dataset_error(settings, store, make_job):
    settings.datasets_dir.mkdir(parents=True)
    (settings.datasets_dir / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    job = make_job(dataset={"path": "bad.jsonl"})
    with pytest.raises(InvalidRequest, match="cannot read dataset 'bad.jsonl': line 2 is not valid JSON") as info:
        load_rows(job, store, settings)
    assert "\n" not in info.value.message


def test_csv_cells_stay_text(settings, store, make_job):
    # datasets' CSV reader would make "4" an integer, which is no completion; ours keeps what was written.
    settings.datasets_dir.mkdir(parents=True)
    (settings.datasets_dir / "sums.csv").write_text("prompt,completion,text\n2+2=,4,\n")
    assert load_rows(make_job(dataset={"path": "sums.csv"}), store, settings) == [
        {"prompt": "2+2=", "completion": "4", "text": None}
    ]


def test_uploaded_files_load_by_id(settings, store, make_job):
    from core.files import FileStore

    info = FileStore(settings.files_dir).save(io.BytesIO(b'{"text": "a"}\n{"text": "b"}\n'), "t.jsonl", max_bytes=1000)
    assert load_rows(make_job(dataset={"file_id": info.id}), store, settings) == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(InvalidRequest, match="no file with id") as missing:
        load_rows(make_job(dataset={"file_id": "file-gone"}), store, settings)
    assert missing.value.param == "dataset.file_id"


def test_hf_dataset_loads_a_local_folder_through_load_dataset(settings, store, make_job):
    """No hub here: a dataset folder inside the datasets dir goes through the same datasets.load_dataset call."""
    folder = settings.datasets_dir / "my-hf-set"
    write_dataset(folder / "train.jsonl", "jsonl")
    (folder / "test.jsonl").write_text(json.dumps({"prompt": "held", "completion": "out"}) + "\n")
    job = make_job(dataset={"hf_dataset": "my-hf-set", "split": "train"})
    assert load_rows(job, store, settings) == ROWS
    assert load_rows(make_job(dataset={"hf_dataset": "my-hf-set", "split": "test"}), store, settings) == [
        {"prompt": "held", "completion": "out"}
    ]


@pytest.mark.parametrize("name", ["/etc", "../x", "./x", "~/x"])
def test_hf_dataset_paths_outside_the_datasets_dir_are_refused(settings, store, make_job, name):
    with pytest.raises(InvalidRequest) as info:
        load_rows(make_job(dataset={"hf_dataset": name}), store, settings)
    assert info.value.param == "dataset.hf_dataset"


def test_a_missing_hub_dataset_is_a_one_line_error(settings, store, make_job, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # No hub here; offline mode fails at once instead of retrying the network for ~20 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = settings.model_copy(update={"allow_hub_datasets": True})  # hub ids only where the operator allows them
    with pytest.raises(InvalidRequest, match="cannot read dataset 'nobody/nothing'") as info:
        load_rows(make_job(dataset={"hf_dataset": "nobody/nothing"}), store, hub)
    assert "\n" not in info.value.message


# --- after tokenizing ---------------------------------------------------------------------------------------
def examples_of(n):
    return [Example([i, i + 1, 2], [IGNORE_INDEX, i + 1, 2]) for i in range(n)]


def test_split_eval_is_seeded_and_disjoint():
    train, held = split_eval(examples_of(20), 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert {e.input_ids[0] for e in train}.isdisjoint({e.input_ids[0] for e in held})
    assert [e.input_ids for e in split_eval(examples_of(20), 0.25, seed=1)[1]] == [e.input_ids for e in held]
    assert [e.input_ids for e in split_eval(examples_of(20), 0.25, seed=2)[1]] != [e.input_ids for e in held]
    assert len(split_eval(examples_of(2), 0.9, seed=1)[0]) == 1  # never everything


def test_packing_fills_blocks_with_whole_examples_that_keep_every_token_and_label():
    examples = examples_of(10)
    blocks = pack(examples, 8, seed=0)
    assert [len(b.input_ids) for b in blocks] == [
        6,
        6,
        6,
        6,
        6,
    ]  # two 3-token examples per block: a third would not fit
    assert all(b.segments == [3, 3] for b in blocks)
    assert sorted(t for b in blocks for t in b.input_ids) == sorted(t for e in examples for t in e.input_ids)
    assert sum(t == IGNORE_INDEX for b in blocks for t in b.labels) == 10  # each example's masked first token
