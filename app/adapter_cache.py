"""Adapters resident in the serving model: loaded from the registry on first use, evicted least recently
used when the cache holds more than ``max_count`` adapters or ``max_bytes`` of weights.

Entries are keyed by (name, sha256). The sha comes from the registry metadata read for every request, so a
re-published adapter is a new key (loaded fresh, the old one dropped at once) and a deleted one is never
found. Only the model thread calls into this class: loading and eviction happen between batches, never
under a running one.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from core.registry import AdapterRegistry

log = logging.getLogger(__name__)


class AdapterHost(Protocol):
    """Where adapters live: the Bone-wrapped base model (see ``InferenceEngine``)."""

    def add_adapter(self, slot: str, config: Any, tensors: dict[str, Any]) -> None: ...

    def delete_adapter(self, slot: str) -> None: ...


@dataclass
class CachedAdapter:
    name: str
    sha256: str
    slot: str  # the adapter's name inside the model (module dict keys cannot hold '.')
    size_bytes: int
    loaded_in_s: float


def slot_name(name: str, sha256: str) -> str:
    return "a_" + re.sub(r"[^0-9a-zA-Z_]", "_", name) + "_" + sha256[:12]


class AdapterCache:
    def __init__(self, registry: AdapterRegistry, host: AdapterHost, *, max_count: int, max_bytes: int,
                 device: Any = "cpu") -> None:
        self.registry, self.host = registry, host
        self.max_count, self.max_bytes = max_count, max_bytes
        self.device = device
        self._entries: OrderedDict[tuple[str, str], CachedAdapter] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    def slots(self) -> dict[tuple[str, str], str]:
        return {key: entry.slot for key, entry in self._entries.items()}

    def acquire(self, name: str, sha256: str, pinned: set[str] = frozenset()) -> str:
        """The slot of adapter ``name`` at version ``sha256``, loading it if needed. ``pinned`` slots (the
        rest of the batch being assembled) are never evicted to make room."""
        key = (name, sha256)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self._shrink(pinned | {entry.slot})  # a batch that needed more than the limit left an overflow
            return entry.slot
        entry = self._load(name)
        if (name, entry.sha256) in self._entries:  # the request carried an older sha; the newest is resident
            return self.acquire(name, entry.sha256, pinned)
        # Older versions of this name will never be asked for again (unless this very batch still uses one).
        self.evict(name, keep_sha=entry.sha256, pinned=pinned)
        self._entries[(name, entry.sha256)] = entry
        self._bytes += entry.size_bytes
        self._shrink(pinned | {entry.slot})
        return entry.slot

    def evict(self, name: str, keep_sha: str | None = None, pinned: set[str] = frozenset()) -> int:
        """Drop every resident version of ``name`` (except ``keep_sha``). Returns how many were dropped."""
        stale = [key for key, entry in self._entries.items()
                 if key[0] == name and key[1] != keep_sha and entry.slot not in pinned]
        for key in stale:
            self._drop(key)
        return len(stale)

    def _load(self, name: str) -> CachedAdapter:
        from safetensors.torch import load_file

        from bone import BoneConfig

        started = time.perf_counter()
        weights, info = self.registry.verified_weights(name)  # NotFound / CorruptAdapter name the adapter
        if (name, info.sha256) in self._entries:
            return self._entries[(name, info.sha256)]
        config = BoneConfig.from_dict(self.registry.adapter_config(name))
        tensors = load_file(str(weights), device=str(self.device))
        slot = slot_name(name, info.sha256)
        self.host.add_adapter(slot, config, tensors)
        elapsed = time.perf_counter() - started
        log.info("loaded adapter %r (sha256 %s…, %d bytes) in %.1f ms", name, info.sha256[:12], info.size_bytes,
                 elapsed * 1000)
        return CachedAdapter(name=name, sha256=info.sha256, slot=slot, size_bytes=info.size_bytes, loaded_in_s=elapsed)

    def _shrink(self, pinned: set[str]) -> None:
        if len(self._entries) <= self.max_count and self._bytes <= self.max_bytes:
            return
        for key in list(self._entries):
            if len(self._entries) <= self.max_count and self._bytes <= self.max_bytes:
                return
            if self._entries[key].slot not in pinned:
                self._drop(key)

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size_bytes
        self.host.delete_adapter(entry.slot)
        log.info("evicted adapter %r (sha256 %s…)", entry.name, entry.sha256[:12])
