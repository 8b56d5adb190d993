"""Tokenized examples on disk: int32 Arrow columns (the ``datasets`` file format), memory-mapped by every reader.

A job's examples are written once, streamed in batches, into ``<job work dir>/tokens/<name>.arrow`` and read
back through ``datasets.Dataset.from_file`` (a memory map, never a copy). Every rank of a distributed job opens
the same file: pickling an ``ArrowExamples`` carries only its path (and, for a subset, its row indices), so the
token bytes are held once per machine, in the page cache, whatever the number of ranks. Python lists of ints
cost ~48 bytes a token and were copied into each rank.

A row reads as an ``Example`` of read-only numpy int32 views into the map: micro-batches are collated from
them directly, and only the rows a batch holds are ever touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from worker.data import Example, Ints

WRITE_BATCH_ROWS = 1000  # rows buffered as Python lists before they are written out as one Arrow record batch


def _features(packed: bool):
    from datasets import Features, Sequence, Value

    columns = {"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))}
    if packed:
        columns["segments"] = Sequence(Value("int32"))
    return Features(columns)


class ExampleWriter:
    """Streams examples into an Arrow file (written under a temporary name, renamed into place on ``finish``)."""

    def __init__(self, path: Path, *, packed: bool = False) -> None:
        from datasets.arrow_writer import ArrowWriter

        self.path, self.packed = Path(path), packed
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._writer = ArrowWriter(features=_features(packed), path=str(self._partial))
        self._pending: list[Example] = []

    def add(self, example: Example) -> None:
        self._pending.append(example)
        if len(self._pending) >= WRITE_BATCH_ROWS:
            self._flush()

    def finish(self) -> ArrowExamples:
        self._flush()
        self._writer.finalize()
        self._writer.close()
        os.replace(self._partial, self.path)
        return ArrowExamples(self.path)

    def abort(self) -> None:
        self._writer.close()
        self._partial.unlink(missing_ok=True)

    def _flush(self) -> None:
        if not self._pending:
            return
        batch: dict[str, list[Any]] = {
            "input_ids": [list(ex.input_ids) for ex in self._pending],
            "labels": [list(ex.labels) for ex in self._pending],
        }
        if self.packed:
            batch["segments"] = [list(ex.segments or [len(ex.input_ids)]) for ex in self._pending]
        self._writer.write_batch(batch)
        self._pending = []


def write_examples(examples: Iterable[Example], path: Path, *, packed: bool = False) -> ArrowExamples:
    writer = ExampleWriter(path, packed=packed)
    try:
        for example in examples:
            writer.add(example)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


class ArrowExamples(Sequence[Example]):
    """The examples of one Arrow file (or a subset of its rows, ``indices``), memory-mapped."""

    def __init__(self, path: Path | str, indices: np.ndarray | None = None) -> None:
        from datasets import Dataset

        self.path = Path(path)
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        table = Dataset.from_file(str(self.path)).data.table  # memory-mapped
        self.packed = "segments" in table.column_names
        # Per record batch: its first row, and zero-copy numpy views of each column's offsets and values.
        self._starts = np.cumsum([0] + [len(chunk) for chunk in table.column("input_ids").chunks])
        self._columns = {
            name: [(chunk.offsets.to_numpy(), chunk.values.to_numpy()) for chunk in table.column(name).chunks]
            for name in ("input_ids", "labels", *(("segments",) if self.packed else ()))
        }

    def __reduce__(self):  # what crosses a process boundary: the path, never the tokens
        return (ArrowExamples, (str(self.path), self.indices))

    def __len__(self) -> int:
        return int(self._starts[-1]) if self.indices is None else len(self.indices)

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        row = int(index if self.indices is None else self.indices[index])
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        local = row - int(self._starts[chunk])
        ids, labels = (self._row(name, chunk, local) for name in ("input_ids", "labels"))
        return Example(ids, labels, self._row("segments", chunk, local) if self.packed else None)

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]

    def _row(self, name: str, chunk: int, local: int) -> np.ndarray:
        offsets, values = self._columns[name][chunk]
        return values[offsets[local] : offsets[local + 1]]

    def lengths(self) -> np.ndarray:
        """Tokens of every example (from the offsets alone: no token is read)."""
        every = np.concatenate([np.diff(offsets) for offsets, _ in self._columns["input_ids"]])
        return every if self.indices is None else every[self.indices]

    def select(self, indices: Sequence[int]) -> ArrowExamples:
        """A subset in the given order, on the same file."""
        chosen = np.asarray(indices, dtype=np.int64)
        return ArrowExamples(self.path, chosen if self.indices is None else self.indices[chosen])

    def token_bytes(self) -> int:
        """Bytes of the token columns (input_ids and labels, int32) of the whole file."""
        return sum(int(values.nbytes) for name in ("input_ids", "labels") for _, values in self._columns[name])


def example_lengths(examples: Sequence[Example]) -> Ints:
    if isinstance(examples, ArrowExamples):
        return examples.lengths()
    return [len(ex.input_ids) for ex in examples]
