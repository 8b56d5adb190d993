"""Everything ``POST /jobs`` checks before a job is queued, so a bad request fails in milliseconds with the
field named instead of minutes later in a worker.

The Bone config is checked against the base model's module shapes on a *meta-device skeleton* built from
the model's config: no weights, no memory, and no reading of the live model the inference thread owns. The
same skeleton gives the estimate of one training process's device memory (core/memory_estimate.py), which
must fit the largest device a live worker of the job's queue advertises.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from core.base_model import resolve_base_model
from core.errors import Conflict, InvalidRequest, NotFound
from core.files import SUFFIXES, FileStore, InvalidFile, validate_rows
from core.fleet import live_workers
from core.formats import detect_format
from core.jobs import DatasetSpec, FileDataset, HFDataset, JobCreate, PathDataset, RecordsDataset, check_job_size
from core.memory_estimate import DeviceMemoryEstimate, ModelShape, device_memory, estimate_device_memory, model_shape
from core.names import max_length_with_checkpoints
from core.paths import dataset_file, dataset_source
from core.registry import AdapterRegistry
from core.settings import Settings

_SKELETONS_KEPT = 4
_FITS_KEPT = 1024  # (base model, Bone config) pairs known to fit; most jobs repeat a handful of configs


class JobChecker:
    def __init__(self, settings: Settings, registry: AdapterRegistry, server_model_config: Any | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self._server_config = server_model_config  # the loaded base model's config, when the API has one
        self._skeletons: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self._lock = threading.Lock()
        self._fits: set[tuple[str, str]] = set()
        self._shapes: dict[tuple[str, str], tuple[ModelShape, int]] = {}  # same key: (shape, trainable params)

    def check(self, body: JobCreate) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
        """Raise a ServiceError naming the field at fault; return the inline (records, validation records)."""
        s = self.settings
        if body.bone.r > s.max_r:
            raise InvalidRequest(
                f"bone.r={body.bone.r} exceeds the server's limit of {s.max_r} (BONE_MAX_R)", param="bone.r"
            )
        if body.training.max_seq_length > s.max_seq_length:
            raise InvalidRequest(
                f"training.max_seq_length={body.training.max_seq_length} exceeds the server's limit of "
                f"{s.max_seq_length} (BONE_MAX_SEQ_LENGTH)",
                param="training.max_seq_length",
            )
        check_job_size(body.training, s)
        room = max_length_with_checkpoints(s.max_train_steps)
        if body.training.publish_checkpoints and len(body.adapter_name) > room:
            raise InvalidRequest(
                f"adapter_name is too long for checkpoint names '<name>-step-<n>' (at most {room} "
                "characters with publish_checkpoints)",
                param="adapter_name",
            )
        records = self._check_dataset(body)
        if not body.overwrite and self.registry.exists(body.adapter_name):
            raise Conflict(
                f"adapter {body.adapter_name!r} already exists; pass overwrite=true to replace it",
                param="adapter_name",
                code="adapter_exists",
            )
        self.check_bone_config(body)
        return records

    # --- dataset ---------------------------------------------------------------------------------------
    def _check_dataset(self, body: JobCreate) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
        """(records, validation records) to store with the job; file references are checked to exist."""
        return (
            self._check_one(body.dataset, "dataset"),
            None if body.validation_dataset is None else self._check_one(body.validation_dataset, "validation_dataset"),
        )

    def _check_one(self, dataset: DatasetSpec, param: str) -> list[dict[str, Any]] | None:
        if isinstance(dataset, RecordsDataset):
            if len(dataset.records) > self.settings.max_inline_records:
                raise InvalidRequest(
                    f"{param} has {len(dataset.records)} inline records; "
                    f"the limit is {self.settings.max_inline_records} "
                    "(BONE_MAX_INLINE_RECORDS): upload a file instead",
                    param=f"{param}.records",
                )
            for index, record in enumerate(dataset.records):
                detect_format(record, index, dataset.format, param_prefix=f"{param}.records")
            return dataset.records
        if isinstance(dataset, PathDataset):
            path = self.dataset_path(dataset.path, param=f"{param}.path")
            if dataset.format is not None:
                self._check_format(path, dataset.format, param, label=dataset.path)
        if isinstance(dataset, FileDataset):
            store = FileStore.from_settings(self.settings)
            try:
                path = store.path(dataset.file_id)
            except NotFound as exc:
                raise InvalidRequest(exc.message, param=f"{param}.file_id", code="not_found") from None
            if dataset.format is not None:
                self._check_format(
                    path, dataset.format, param, label=dataset.file_id, detected=store.get(dataset.file_id).formats
                )
        if isinstance(dataset, HFDataset):
            dataset_source(
                dataset.hf_dataset,
                datasets_dir=self.settings.datasets_dir,
                allow_hub=self.settings.allow_hub_datasets,
                param=f"{param}.hf_dataset",
            )
        return None

    @staticmethod
    def _check_format(path: Path, fmt: str, param: str, *, label: str, detected: dict[str, int] | None = None) -> None:
        """A ``format`` override must fit every row of the file now, not fail in a worker on row 0. An upload
        whose rows were all detected as ``fmt`` fits without reading it again."""
        if detected and set(detected) == {fmt}:
            return
        try:
            validate_rows(path, fmt, label=label)
        except InvalidFile as exc:
            raise InvalidRequest(
                f"{param}.format={fmt!r} does not fit {label!r}: {exc.message}",
                param=f"{param}.format",
                code="format_mismatch",
            ) from None

    def dataset_path(self, relative: str, *, param: str = "dataset.path") -> Path:
        """The file a ``{"path": ...}`` dataset names, which must lie inside the datasets dir."""
        return dataset_file(relative, datasets_dir=self.settings.datasets_dir, suffixes=SUFFIXES, param=param)

    # --- bone config vs the base model ---------------------------------------------------------------
    def check_bone_config(self, body: JobCreate) -> None:
        from bone import validate_config_for_model

        fields = body.bone.model_dump(exclude_none=True)
        key = (body.base_model or self.settings.base_model, json.dumps(fields, sort_keys=True))
        if key in self._fits:
            return  # walking the model's modules is most of POST /jobs' own work: do it once per config
        config = body.bone.to_config()  # BoneConfigError → 422 bone.<field>
        validate_config_for_model(self._skeleton(key[0]), config)
        with self._lock:
            if len(self._fits) >= _FITS_KEPT:
                self._fits.clear()
            self._fits.add(key)

    # --- device memory vs the fleet ----------------------------------------------------------------------
    def check_device_memory(self, body: JobCreate, conn: Any, queue: str) -> DeviceMemoryEstimate:
        """The job's estimated bytes per device; refused (422) when the live workers of ``queue`` advertise
        device memory and none has enough. Workers without a device limit (CPU) or no live worker: accepted."""
        estimate = self.estimate_device_memory(body)
        devices: list[tuple[int, dict[str, Any]]] = []
        for worker in live_workers(conn):
            size = device_memory(worker)
            if size is not None and queue in worker.get("queues", []):
                devices.append((size, worker))
        if not devices or any(size >= estimate.total for size, _ in devices):
            return estimate
        size, largest = max(devices, key=lambda d: d[0])
        label = largest.get("gpu_name") or (largest.get("gpu_names") or ["GPU"])[0]
        raise InvalidRequest(
            f"the job needs {estimate.describe()}; the largest device advertised on queue {queue!r} is "
            f"{size / 1024**3:.2f} GiB ({label} of worker {largest['name']}). Shard the base over more processes "
            "(training.sharding='full', training.num_processes), turn on training.gradient_checkpointing, or lower "
            "training.per_device_batch_size / training.max_seq_length",
            param="training",
            code="insufficient_device_memory",
        )

    def estimate_device_memory(self, body: JobCreate) -> DeviceMemoryEstimate:
        from bone import BoneConfig
        from bone.adapter_files import expected_entries

        fields = body.bone.model_dump(exclude_none=True)
        key = (body.base_model or self.settings.base_model, json.dumps(fields, sort_keys=True))
        known = self._shapes.get(key)
        if known is None:
            skeleton = self._skeleton(key[0])
            config = BoneConfig.from_dict(fields)
            required, optional = expected_entries(skeleton, config)
            entries = [*required.values(), *(optional.values() if config.bias != "none" else [])]
            known = (model_shape(skeleton), sum(math.prod(e.shape) for e in entries))
            with self._lock:
                if len(self._shapes) >= _FITS_KEPT:
                    self._shapes.clear()
                self._shapes[key] = known
        shape, trainable = known
        # the worker trains in bf16 on CUDA (core.base_model.resolve_dtype "auto"): 2 bytes per base parameter
        return estimate_device_memory(shape, trainable, body.training, base_bytes_per_param=2)

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
                skeleton = AutoModelForCausalLM.from_config(
                    model_config, trust_remote_code=self.settings.trust_remote_code
                )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRequest(
                f"base model {name!r} is not a causal language model: {exc}", param="base_model"
            ) from None
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
