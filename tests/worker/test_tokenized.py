"""Tokenized examples on disk (int32 Arrow, memory-mapped) read back as the lists they were written from, cross
process boundaries as their path, and train to the same bytes; length-grouped batches."""

import copy
import pickle

import numpy as np
import pytest
import torch

from bone import BoneConfig, get_bone_model
from core.jobs import TrainingSpec
from worker.batches import BatchStream, collate, length_grouped_order
from worker.data import Cancelled, Example, pack, split_eval, tokenize_rows
from worker.tokenized import ArrowExamples, ExampleWriter, write_examples
from worker.train import train

CPU = torch.device("cpu")
ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(5)]


def as_lists(examples):
    return [
        (
            list(map(int, ex.input_ids)),
            list(map(int, ex.labels)),
            None if ex.segments is None else list(map(int, ex.segments)),
        )
        for ex in examples
    ]


def test_tokenized_rows_read_back_from_arrow_as_written(base, tmp_path):
    in_memory = tokenize_rows(ROWS, base.tokenizer, 32)
    on_disk = tokenize_rows(ROWS, base.tokenizer, 32, into=ExampleWriter(tmp_path / "train.arrow"))
    assert isinstance(on_disk.examples, ArrowExamples)
    assert as_lists(on_disk.examples) == as_lists(in_memory.examples)
    assert (on_disk.rows, on_disk.truncated, on_disk.dropped) == (
        in_memory.rows,
        in_memory.truncated,
        in_memory.dropped,
    )
    row = on_disk.examples[0]
    assert row.input_ids.dtype == np.int32 and row.labels.dtype == np.int32
    assert list(on_disk.examples.lengths()) == [len(ex.input_ids) for ex in in_memory.examples]
    assert as_lists(on_disk.examples[2:5]) == as_lists(in_memory.examples[2:5])


def test_split_and_pack_on_disk_match_the_lists(base, tmp_path):
    examples = tokenize_rows(ROWS, base.tokenizer, 32).examples
    arrow = write_examples(examples, tmp_path / "train.arrow")
    (train_l, eval_l), (train_a, eval_a) = split_eval(examples, 0.2, 7), split_eval(arrow, 0.2, 7)
    assert as_lists(train_a) == as_lists(train_l) and as_lists(eval_a) == as_lists(eval_l)
    assert isinstance(train_a, ArrowExamples) and train_a.path == arrow.path  # a view, not a copy
    blocks_l = pack(train_l, 24, seed=3)
    blocks_a = pack(train_a, 24, seed=3, into=ExampleWriter(tmp_path / "packed.arrow", packed=True))
    assert as_lists(blocks_a) == as_lists(blocks_l)
    for got, want in zip(collate(blocks_a[:4], 0, CPU).items(), collate(blocks_l[:4], 0, CPU).items()):
        assert got[0] == want[0] and (got[1] is None and want[1] is None or torch.equal(got[1], want[1]))


def test_only_the_path_crosses_a_process_boundary(tmp_path):
    big = write_examples([Example(list(range(500)), list(range(500)))] * 3000, tmp_path / "big.arrow")
    assert len(pickle.dumps(big)) < 300 + len(str(big.path))  # 12 MB of tokens
    view = big.select([5, 1, 2999])
    copied = pickle.loads(pickle.dumps(view))
    assert as_lists(copied) == as_lists([big[5], big[1], big[2999]])
    assert len(pickle.dumps(view)) < 300  # the path and three row numbers


def test_a_cancelled_tokenization_leaves_no_file(base, tmp_path):
    with pytest.raises(Cancelled):
        tokenize_rows(
            ROWS * 10, base.tokenizer, 32, should_stop=lambda: True, into=ExampleWriter(tmp_path / "train.arrow")
        )
    assert list(tmp_path.iterdir()) == []


def test_training_on_arrow_examples_gives_the_same_bytes_as_on_lists(base, tmp_path):
    examples = tokenize_rows(ROWS, base.tokenizer, 32).examples
    arrow = write_examples(examples, tmp_path / "train.arrow")
    spec = TrainingSpec(max_steps=4, batch_size=4, learning_rate=1e-2, group_by_length=True)
    results = []
    for data in (examples, arrow):
        model = get_bone_model(copy.deepcopy(base.model), BoneConfig(r=8))
        result = train(model, base.tokenizer, data, spec, device=CPU)
        results.append((result.losses, model.get_adapter_state_dict("default")))
    assert results[0][0] == results[1][0]
    for key, value in results[0][1].items():
        assert torch.equal(value, results[1][1][key])


# --- length-grouped batches ---------------------------------------------------------------------------------
def padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def epoch(stream, n_batches):
    return [stream._take() for _ in range(n_batches)]


def test_length_grouped_batches_use_every_row_once_per_epoch_and_pad_less():
    lengths = torch.randint(1, 500, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [Example([0] * n, [0] * n) for n in lengths]
    grouped = BatchStream(examples, 8, seed=1, lengths=lengths)
    plain = BatchStream(examples, 8, seed=1)
    for _ in range(2):  # two epochs: each a fresh grouping of a fresh permutation
        batches = epoch(grouped, 125)
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch runs first
        assert padding(batches, lengths) < padding(epoch(plain, 125), lengths) / 10
    assert grouped.epochs_done == 2


def test_length_grouping_is_seeded_and_resumes_where_it_stopped():
    lengths = [(i * 37) % 101 + 1 for i in range(300)]
    examples = [Example([0] * n, [0] * n) for n in lengths]
    whole = epoch(BatchStream(examples, 4, seed=5, lengths=lengths), 200)
    assert whole == epoch(BatchStream(examples, 4, seed=5, lengths=lengths), 200)
    assert whole != epoch(BatchStream(examples, 4, seed=6, lengths=lengths), 200)
    resumed = BatchStream(examples, 4, seed=5, lengths=lengths)
    resumed.skip(90)
    assert epoch(resumed, 110) == whole[90:]


def test_length_grouping_sorts_within_megabatches_of_fifty_batches():
    lengths = list(range(1, 1001))
    order = length_grouped_order(
        torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist(), lengths, batch_size=4
    )
    megabatches = [order[i : i + 200] for i in range(0, 1000, 200)]
    assert sorted(order) == list(range(1000))
    for megabatch in megabatches:  # a head may have been swapped with the longest row of all
        rest = megabatch[1:]
        assert [lengths[i] for i in rest] == sorted((lengths[i] for i in rest), reverse=True)
    assert lengths[order[0]] == 1000


def test_group_by_length_is_off_by_default():
    assert TrainingSpec().group_by_length is False
