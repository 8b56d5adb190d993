"""Keeps ``BONE_VLLM_EXPORT_DIR`` in sync with the registry, from the API process (which holds the base model a
Bat adapter's LoRA export needs). A daemon thread: every ``vllm_export_interval_s`` it lists the registry and
exports what is new or changed (core/vllm_export.py); adapters that are gone leave the folder.

Several API replicas may point at one shared folder: each write is a rename of a whole folder, so they only
repeat each other's work. An adapter that cannot be exported (trained biases, another base model) is logged
once per version, not every pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from core.vllm_export import SyncResult, serve_command, sync_folder, unzip

log = logging.getLogger(__name__)


class VllmFolderSync:
    def __init__(self, registry, export: Callable[[str], bytes], settings) -> None:
        self.registry = registry
        self.export = export  # adapter name → the LoRA download's zip bytes
        self.settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: set[tuple[str, str]] = set()  # (name, sha256) whose failure was already logged

    def sync_once(self) -> SyncResult:
        listing = {info.name: info.sha256 for info in self.registry.list()}

        def fetch(name: str) -> dict[str, bytes]:
            if (name, listing[name]) in self._reported:
                raise RuntimeError("export failed before for this version")
            return unzip(self.export(name))

        result = sync_folder(
            self.settings.vllm_export_dir, listing, fetch, base_model=self.settings.vllm_export_base_model, prune=True
        )
        for name, why in result.failed.items():
            if (name, listing[name]) not in self._reported:
                self._reported.add((name, listing[name]))
                log.warning("vLLM export of adapter %r skipped: %s", name, why)
        if result.written or result.removed:
            log.info(
                "vLLM folder %s: wrote %s, removed %s; serve with: %s",
                result.directory,
                ", ".join(result.written) or "none",
                ", ".join(result.removed) or "none",
                serve_command(self.settings.vllm_export_base_model or "BASE_MODEL", result),
            )
        return result

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception:  # noqa: BLE001 - a failed pass (Redis, disk) is retried on the next one
                log.exception("vLLM folder sync failed; retrying in %.0f s", self.settings.vllm_export_interval_s)
            self._stop.wait(self.settings.vllm_export_interval_s)

    def start(self) -> VllmFolderSync:
        self._thread = threading.Thread(target=self._run, name="vllm-folder-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
