"""Everything ``POST /jobs`` checks before a job is queued, so a bad request fails in milliseconds with the
field named instead of minutes later in a worker.

The Bone config is checked against the base model's module shapes on a *meta-device skeleton* built from
the model's config: no weights, no memory, and no reading of the live model the inference thread owns.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from core.base_model import resolve_base_model
from core.errors import Conflict, InvalidRequest
from core.jobs import FileDataset, JobCreate, PathDataset, RecordsDataset
from core.registry import AdapterRegistry
from core.settings import Settings

DATASET_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_SKELETONS_KEPT = 4


class JobChecker:
    def __init__(self, settings: Settings, registry: AdapterRegistry, server_model_config: Any | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self._server_config = server_model_config  # the loaded base model's config, when the API has one
        self._skeletons: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, body: JobCreate) -> list[dict[str, Any]] | None:
        """Raise a ServiceError naming the field at fault; return the inline records (if any) to store."""
        s = self.settings
        if body.bone.r > s.max_r:
            raise InvalidRequest(f"bone.r={body.bone.r} exceeds the server's limit of {s.max_r} (BONE_MAX_R)", param="bone.r")
        if body.training.max_seq_length > s.max_seq_length:
            raise InvalidRequest(
                f"training.max_seq_length={body.training.max_seq_length} exceeds the server's limit of "
                f"{s.max_seq_length} (BONE_MAX_SEQ_LENGTH)", param="training.max_seq_length")
        records = self._check_dataset(body)
        if not body.overwrite and self.registry.exists(body.adapter_name):
            raise Conflict(f"adapter {body.adapter_name!r} already exists; pass overwrite=true to replace it",
                           param="adapter_name", code="adapter_exists")
        self.check_bone_config(body)
        return records

    # --- dataset -------------------------------------------------------------------------------------
    def _check_dataset(self, body: JobCreate) -> list[dict[str, Any]] | None:
        dataset = body.dataset
        if isinstance(dataset, RecordsDataset):
            if len(dataset.records) > self.settings.max_inline_records:
                raise InvalidRequest(
                    f"dataset has {len(dataset.records)} inline records; the limit is {self.settings.max_inline_records} "
                    "(BONE_MAX_INLINE_RECORDS): upload a file instead", param="dataset.records")
            for index, record in enumerate(dataset.records):
                check_record(record, index)
            return dataset.records
        if isinstance(dataset, PathDataset):
            self.dataset_path(dataset.path)
        if isinstance(dataset, FileDataset) and not _is_plain_name(dataset.file_id):
            raise InvalidRequest(f"file_id {dataset.file_id!r} is not a file id", param="dataset.file_id")
        return None

    def dataset_path(self, relative: str) -> Path:
        """The file a ``{"path": ...}`` dataset names, which must lie inside the datasets dir."""
        pure = PurePosixPath(relative)
        if pure.is_absolute() or relative.startswith("~") or ".." in pure.parts or "\\" in relative:
            raise InvalidRequest(
                f"dataset path {relative!r} must be relative to the datasets dir ({self.settings.datasets_dir}) "
                "without '..'", param="dataset.path")
        root = self.settings.datasets_dir.resolve()
        path = (root / pure).resolve()
        if not path.is_relative_to(root):  # a symlink pointing out of the datasets dir
            raise InvalidRequest(f"dataset path {relative!r} leads outside the datasets dir", param="dataset.path")
        if not path.is_file():
            raise InvalidRequest(f"dataset file {relative!r} does not exist in {root}", param="dataset.path",
                                 code="not_found")
        if path.suffix.lower() not in DATASET_SUFFIXES:
            raise InvalidRequest(f"dataset file {relative!r} must be one of {', '.join(DATASET_SUFFIXES)}",
                                 param="dataset.path")
        return path

    # --- bone config vs the base model ---------------------------------------------------------------
    def check_bone_config(self, body: JobCreate) -> None:
        from bone import BoneConfig, validate_config_for_model

        config = BoneConfig.from_dict(body.bone.model_dump(exclude_none=True))  # BoneConfigError → 422 bone.<field>
        validate_config_for_model(self._skeleton(body.base_model or self.settings.base_model), config)

    def _skeleton(self, name: str) -> torch.nn.Module:
        with self._lock:
            if name in self._skeletons:
                self._skeletons.move_to_end(name)
                return self._skeletons[name]
        model_config = self._server_config if name == self.settings.base_model and self._server_config else None
        if model_config is None:
            model_config = self._load_config(name)
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=self.settings.trust_remote_code)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRequest(f"base model {name!r} is not a causal language model: {exc}", param="base_model") from None
        with self._lock:
            self._skeletons[name] = skeleton
            while len(self._skeletons) > _SKELETONS_KEPT:
                self._skeletons.popitem(last=False)
        return skeleton

    def _load_config(self, name: str) -> Any:
        from transformers import AutoConfig

        source = resolve_base_model(name, self.settings)  # refuses local paths outside the allowed dirs
        try:
            return AutoConfig.from_pretrained(source, trust_remote_code=self.settings.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"cannot load the config of base model {name!r}: {exc}", param="base_model") from None


def _is_plain_name(value: str) -> bool:
    return all(ch.isalnum() or ch in "-_." for ch in value) and ".." not in value and not value.startswith(".")


def check_record(record: dict[str, Any], index: int) -> None:
    """One inline training row: {"text"}, {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]}."""
    param = f"dataset.records.{index}"
    if isinstance(record.get("text"), str):
        return
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        for turn, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise InvalidRequest(f"row {index}: messages[{turn}] needs string 'role' and 'content'",
                                     param=f"{param}.messages.{turn}")
        return
    keys = ", ".join(sorted(record)) or "none"
    raise InvalidRequest(
        f"row {index} (0-based) has keys {{{keys}}}; each row needs a string 'text', or string 'prompt' and "
        "'completion', or a non-empty 'messages' list", param=param)
