"""Adapters for serving, in two tiers: resident in the model on the device (bounded by count AND bytes —
count alone does not bound memory once adapters differ in rank or targets) and, below that, host-memory
copies (bounded by bytes) that make a re-load skip disk, sha256 check and parsing. Both tiers are LRU.

Entries are keyed by (name, sha256). A per-request mix of adapters (``"adapters": {"a": 0.7, "b": 0.3}``) is a
virtual adapter, never written to the registry: its blocks are ``Σ wᵢ Bᵢ`` of the sources' (exact for Bone),
built by the loader threads from the verified sources, and it is cached and evicted like any adapter under
``(mix_name(mix), mix_sha256(mix))``, both derived from the sorted (name, sha256, weight) tuples — so a
re-published source makes a new key, and evicting a source (deleted, overwritten) evicts its mixes too. The
sha comes from the registry metadata read for every request, so a re-published adapter is a new key and a
deleted one is never found.

Reading an adapter (registry, sha256, safetensors) is slow and runs on the ``AdapterLoader`` threads, never
on the model thread; only ``install`` (copy the blocks into the model) runs there, between decode steps.
So a cold adapter never stalls requests for other adapters. ``AdapterCache`` itself is used by the model
thread only; slots in use by running rows are never evicted (``in_use``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from app import metrics
from core.adapter_loading import read_adapter
from core.names import AdapterName
from core.registry import AdapterRegistry

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (name, sha256)


class AdapterHost(Protocol):
    """Where adapters live: the Bone-wrapped base model (``ModelHost``)."""

    def add_adapter(self, slot: str, config: Any, tensors: dict[str, Any]) -> None: ...

    def delete_adapter(self, slot: str) -> None: ...


@dataclass
class FetchedAdapter:
    """An adapter read from the registry into host memory, checked, not yet in the model."""

    name: str
    sha256: str
    config: Any
    tensors: dict[str, Any]
    size_bytes: int  # of the tensors: what it costs in memory, not on disk
    fetch_s: float
    sources: tuple[str, ...] = ()  # a mix: the adapters it sums (evicting one of them evicts the mix)


@dataclass
class CachedAdapter:
    name: str
    sha256: str
    slot: str  # the adapter's key inside the model (``slot_name``)
    size_bytes: int
    loaded_in_s: float
    sources: tuple[str, ...] = ()


def slot_name(name: str, sha256: str) -> str:
    """The key of a cache entry inside the served model: an adapter version's ``AdapterName.slot``; a mix's
    name is no adapter name (``MIX_PREFIX``), so its slot has a prefix of its own and never meets one."""
    if name.startswith(MIX_PREFIX):
        return f"m_{name.removeprefix(MIX_PREFIX)}_{sha256[:12]}"
    return AdapterName(name).slot(sha256)


def fetch_adapter(registry: AdapterRegistry, name: str) -> FetchedAdapter:
    """Registry → host memory: sha256-verified, finite weights and the Bone config (raises NotFound /
    CorruptAdapter, or Conflict for an adapter that trained biases). Non-finite weights (published before
    imports and jobs were checked) are refused here, so such an adapter fails its own requests at admission
    and never a batch."""
    from bone.adapter_files import NonFiniteTensorError, check_finite
    from core.errors import CorruptAdapter

    started = time.perf_counter()
    config, tensors, info = read_adapter(registry, name)
    try:
        check_finite(tensors)
    except NonFiniteTensorError as exc:
        raise CorruptAdapter(
            f"adapter {name!r} cannot be served: {exc}", param="adapter", code="non_finite_adapter"
        ) from None
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return FetchedAdapter(name, info.sha256, config, tensors, size, time.perf_counter() - started)


Mix = tuple[tuple[str, str, float], ...]  # sorted (source name, sha256, weight)
MIX_PREFIX = "~mix-"  # registry names cannot hold '~', so a mix never collides with a published adapter


def mix_name(mix: Mix) -> str:
    """The cache name of a mix: the same sources with the same weights, whatever their versions."""
    spec = json.dumps([[name, repr(float(weight))] for name, _, weight in sorted(mix)])
    return MIX_PREFIX + hashlib.sha256(spec.encode()).hexdigest()[:16]


def mix_sha256(mix: Mix) -> str:
    """The version of a mix: changes when any source is re-published."""
    spec = json.dumps([[name, sha, repr(float(weight))] for name, sha, weight in sorted(mix)])
    return hashlib.sha256(spec.encode()).hexdigest()


def fetch_mix(registry: AdapterRegistry, mix: Mix, out_features: dict[str, int] | None = None) -> FetchedAdapter:
    """Registry → host memory for a mix: every source sha256-verified, then ``Σ wᵢ Bᵢ`` in float32, in the
    sorted order of the sources (the same bits for the same mix). Versions are those read now: if a source
    was re-published since the request resolved it, the mix is built from (and keyed by) the new one."""
    from bone import BoneConfigError, combine_bone_adapters
    from bone.adapter_files import NonFiniteTensorError, check_finite
    from core.errors import InvalidRequest

    started = time.perf_counter()
    items, read = [], []
    for name, _, weight in sorted(mix):
        source = fetch_adapter(registry, name)
        items.append((name, source.config, source.tensors, float(weight)))
        read.append((name, source.sha256, float(weight)))
    try:
        config, tensors = combine_bone_adapters(items, out_features=out_features)
    except BoneConfigError as exc:  # a source re-published as Bat / another r since the request was checked
        raise InvalidRequest(str(exc), param="adapters", code="invalid_adapter_mix") from None
    try:
        check_finite(tensors)  # finite sources, |w| <= 100: only sources near float32's edge overflow
    except NonFiniteTensorError as exc:
        raise InvalidRequest(
            f"the weighted sum of these adapters is not finite: {exc}", param="adapters", code="non_finite_weights"
        ) from None
    read_mix = tuple(read)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return FetchedAdapter(
        mix_name(read_mix),
        mix_sha256(read_mix),
        config,
        tensors,
        size,
        time.perf_counter() - started,
        sources=tuple(name for name, _, _ in read_mix),
    )


class AdapterLoader:
    """Fetches adapters on its own threads; ``on_done(name, fetched, error)`` is called from a loader thread
    (the engine turns it into a message for the model thread). One fetch per name at a time."""

    def __init__(
        self,
        registry: AdapterRegistry,
        on_done: Callable[[str, FetchedAdapter | None, BaseException | None], None],
        workers: int = 2,
    ) -> None:
        self.registry, self._on_done = registry, on_done
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="adapter-loader")
        self._inflight: set[str] = set()  # touched by the model thread only (fetch / finished)

    def fetch(self, name: str, read: Callable[[], FetchedAdapter] | None = None) -> None:
        """Read adapter ``name`` (or, for a mix, call ``read``) on a loader thread."""
        if name in self._inflight:
            return
        self._inflight.add(name)
        future = self._pool.submit(read) if read is not None else self._pool.submit(fetch_adapter, self.registry, name)
        future.add_done_callback(lambda f: self._report(name, f))

    def _report(self, name: str, future: Future) -> None:
        error = future.exception()
        self._on_done(name, None if error else future.result(), error)

    def finished(self, name: str) -> None:
        self._inflight.discard(name)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class AdapterCache:
    def __init__(
        self,
        registry: AdapterRegistry,
        host: AdapterHost,
        *,
        max_count: int,
        max_bytes: int,
        cpu_bytes: int = 0,
        device: Any = "cpu",
        dtype: Any = None,
        pinned: Iterable[str] = (),
    ) -> None:
        self.registry, self.host = registry, host
        self.max_count, self.max_bytes, self.cpu_bytes = max_count, max_bytes, cpu_bytes
        self.device = device
        self.dtype = dtype  # the base model's: blocks are cast to it once, on install (None: kept as read)
        self.pinned_names = set(pinned)  # by name: a re-published pinned adapter stays pinned
        self._entries: OrderedDict[Key, CachedAdapter] = OrderedDict()
        self._bytes = 0
        # What the running batch takes beyond the resident blocks (index tensors, scratch, held Bat weights;
        # ``ModelHost.working_bytes``): counted against ``max_bytes``, so the pool's free room shrinks by it.
        self.working_bytes = 0
        self._cpu: OrderedDict[Key, FetchedAdapter] = OrderedDict()
        self._cpu_used = 0
        self._doomed: set[Key] = set()  # evicted while rows still used them: dropped once they finish
        self.installs = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    @property
    def free_bytes(self) -> int:
        """Room left under ``max_bytes`` after the resident adapters and the running batch's working bytes."""
        return max(0, self.max_bytes - self._bytes - self.working_bytes)

    @property
    def batch_room(self) -> int:
        """What a batch may take beyond the resident adapters (the running batch's own bytes included)."""
        return max(0, self.max_bytes - self._bytes)

    def slots(self) -> dict[Key, str]:
        return {key: entry.slot for key, entry in self._entries.items()}

    # --- lookups ---------------------------------------------------------------------------------------
    def resident(self, key: Key) -> str | None:
        entry = self._entries.get(key)
        if entry is None or key in self._doomed:
            return None
        self._entries.move_to_end(key)
        return entry.slot

    def holds(self, key: Key) -> bool:
        """Whether ``key`` is resident or in the host tier (LRU order untouched: a look, not a use)."""
        return (key in self._entries and key not in self._doomed) or key in self._cpu

    def cpu_get(self, key: Key) -> FetchedAdapter | None:
        fetched = self._cpu.get(key)
        if fetched is not None:
            self._cpu.move_to_end(key)
        return fetched

    def cpu_put(self, fetched: FetchedAdapter) -> None:
        key = (fetched.name, fetched.sha256)
        if key in self._cpu or fetched.size_bytes > self.cpu_bytes:
            return
        self._cpu[key] = fetched
        self._cpu_used += fetched.size_bytes
        while self._cpu_used > self.cpu_bytes:
            _, old = self._cpu.popitem(last=False)
            self._cpu_used -= old.size_bytes

    def device_bytes(self, fetched: FetchedAdapter) -> int:
        """What ``fetched`` costs once installed: its floating tensors in the pool's dtype (a bf16 pool holds
        half the bytes of the float32 checkpoint), the rest as read."""
        if self.dtype is None:
            return fetched.size_bytes
        item = self.dtype.itemsize
        return sum(t.numel() * (item if t.is_floating_point() else t.element_size()) for t in fetched.tensors.values())

    def has_room(self, size: int, in_use: AbstractSet[str]) -> bool:
        """Whether ``size`` more bytes fit after evicting everything evictable (not pinned, not in use)."""
        keep = [e for k, e in self._entries.items() if not self._evictable(k, e, in_use)]
        return (
            len(keep) + 1 <= self.max_count
            and sum(e.size_bytes for e in keep) + self.working_bytes + size <= self.max_bytes
        )

    # --- changes -----------------------------------------------------------------------------------------
    def acquire(self, name: str, sha256: str, in_use: AbstractSet[str] = frozenset()) -> str:
        """Synchronous load-if-needed (tests, benchmarks, tools): the slot of ``name`` at ``sha256``."""
        slot = self.resident((name, sha256))
        if slot is not None:
            return slot
        fetched = self.cpu_get((name, sha256)) or fetch_adapter(self.registry, name)
        self.cpu_put(fetched)
        return self.install(fetched, in_use)

    def install(self, fetched: FetchedAdapter, in_use: AbstractSet[str] = frozenset()) -> str:
        """Put a fetched adapter into the model (the only step on the model thread); older versions of the
        same name go, then LRU entries until the limits hold again."""
        key = (fetched.name, fetched.sha256)
        self._doomed.discard(key)
        if key in self._entries:  # a use: to the end of the LRU order, as ``resident`` does
            self._entries.move_to_end(key)
            return self._entries[key].slot
        started = time.perf_counter()
        self.evict(fetched.name, keep_sha=fetched.sha256, in_use=in_use)
        slot = slot_name(*key)
        self.host.add_adapter(slot, fetched.config, fetched.tensors)  # copies (and casts) the blocks onto the device
        took = fetched.fetch_s + time.perf_counter() - started
        size = self.device_bytes(fetched)
        self._entries[key] = CachedAdapter(fetched.name, fetched.sha256, slot, size, took, fetched.sources)
        self._bytes += size
        self.installs += 1
        metrics.ADAPTER_LOAD_SECONDS.observe(took)
        log.info(
            "loaded adapter %r (sha256 %s…, %d bytes) in %.1f ms", fetched.name, fetched.sha256[:12], size, took * 1000
        )
        self.shrink(in_use | {slot})
        return slot

    def evict(self, name: str, keep_sha: str | None = None, in_use: Iterable[str] = frozenset()) -> int:
        """Drop every version of ``name`` (except ``keep_sha``) from both tiers — and, when every version goes
        (``keep_sha`` None: deleted or overwritten), the mixes that sum it; entries still used by running rows
        are dropped as soon as those rows finish. Returns how many left the device now."""
        in_use = set(in_use)

        def doomed(key: Key, sources: tuple[str, ...]) -> bool:
            return (key[0] == name and key[1] != keep_sha) or (keep_sha is None and name in sources)

        for key in [k for k, f in self._cpu.items() if doomed(k, f.sources)]:
            self._cpu_used -= self._cpu.pop(key).size_bytes
        dropped = 0
        for key, entry in list(self._entries.items()):
            if doomed(key, entry.sources):
                if entry.slot in in_use:
                    self._doomed.add(key)
                else:
                    self._drop(key)
                    dropped += 1
        return dropped

    def shrink(self, in_use: AbstractSet[str] = frozenset()) -> None:
        """Drop doomed entries no longer in use, then least recently used ones while over a limit."""
        for key in [k for k in self._doomed if self._entries[k].slot not in in_use]:
            self._drop(key)
        for key in list(self._entries):
            if len(self._entries) <= self.max_count and self._bytes + self.working_bytes <= self.max_bytes:
                break
            if self._evictable(key, self._entries[key], in_use):
                self._drop(key)
        self._publish_gauges()

    def _evictable(self, key: Key, entry: CachedAdapter, in_use: AbstractSet[str]) -> bool:
        return entry.slot not in in_use and key[0] not in self.pinned_names

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self._doomed.discard(key)
        self._bytes -= entry.size_bytes
        self.host.delete_adapter(entry.slot)
        self.evictions += 1
        metrics.ADAPTER_CACHE_EVICTIONS.inc()
        self._publish_gauges()
        log.info("evicted adapter %r (sha256 %s…) from the device", entry.name, entry.sha256[:12])

    def _publish_gauges(self) -> None:
        metrics.ADAPTERS_RESIDENT.set(len(self._entries))
        metrics.ADAPTERS_RESIDENT_BYTES.set(self._bytes)
