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
CONTEXT_TOKENS = 5  # tokens of context a fresh window keeps after a resync (vLLM's initial prefix offset)


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

    def update(self, ids: list[int]) -> int:
        """Take in the token just appended to ``ids``. Returns where ``text`` may differ from what it was
        before: the committed length, or 0 after a resync."""
        changed_from = len(self.committed)
        window = self._decode(ids[self._prefix :])
        if not window.startswith(self._prefix_text):
            # The new token rewrote text before it (a tokenizer that cleans up spaces, " ." -> "."):
            # decode everything once and start a fresh window, so ``text`` stays a full decode.
            self.committed, self.pending = self._decode(ids), ""
            self._prefix, self._read = max(0, len(ids) - CONTEXT_TOKENS), len(ids)
            self._prefix_text = self._decode(ids[self._prefix :])
            return 0
        if len(window) <= len(self._prefix_text):
            self.pending = ""  # e.g. a skipped special token: nothing new yet
            return changed_from
        new = window[len(self._prefix_text) :]
        if window.endswith(REPLACEMENT):
            self.pending = new
            return changed_from
        self.committed += new
        self.pending = ""
        self._prefix, self._read = self._read, len(ids)
        self._prefix_text = self._decode(ids[self._prefix : self._read])
        return changed_from
