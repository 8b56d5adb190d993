"""Incremental detokenization: the text of a growing token sequence in constant work per token.

Decoding the whole sequence again on every token costs time linear in its length, so a row's total cost
grows with the square of its length. Instead (the prefix/read offsets of vLLM and TGI) only a short window
of recent tokens is decoded: ``ids[prefix:read]`` are the tokens before the last committed ones, kept as
context (a SentencePiece token drops its leading space when it comes first; a byte-level token may be half a
character), and the text the window adds past them is committed once it does not end in U+FFFD (a multi-byte
character still missing its last bytes). Until then that text is ``pending``: part of ``text``, so ``text``
equals a full decode at every step, but not yet committed.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """``update(ids)`` after each token appended to ``ids``; then ``text`` is ``decode(ids)``."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._prefix = 0  # first token of the context window
        self._read = 0  # first token whose text is not committed yet
        self._prefix_text = ""  # decode(ids[prefix:read]), kept so each step decodes once
        self.committed = ""  # text that later tokens can no longer change
        self.pending = ""  # text of ids[read:] that may still change (it ends in a partial character)

    @property
    def text(self) -> str:
        return self.committed + self.pending

    def update(self, ids: list[int]) -> None:
        window = self._decode(ids[self._prefix:])
        if len(window) <= len(self._prefix_text):
            self.pending = ""  # e.g. a skipped special token: nothing new yet
            return
        new = window[len(self._prefix_text):]
        if window.endswith(REPLACEMENT):
            self.pending = new
            return
        self.committed += new
        self.pending = ""
        self._prefix, self._read = self._read, len(ids)
        self._prefix_text = self._decode(ids[self._prefix:self._read])
