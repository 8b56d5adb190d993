"""The fine-tuning job: what a client asks for (``JobCreate``) and what the service records (``Job``).

Both processes import this: the API validates and stores a ``Job``; the worker reads it back, runs it and
updates status, progress and metrics.
"""

from __future__ import annotations

import time
import uuid
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from bone.config import MIN_R, Bias, BoneConfig, check_r
from core.formats import FormatName
from core.names import AdapterName
from core.paths import DATASET_NAME_PATTERN, check_dataset_name
from core.patterns import MAX_PATTERN_CHARS, check_pattern
from core.requests import SEED_BOUND, RequestModel

# Validation context for records read back from the store: rules that apply to new requests only (e.g. a
# batch that splits evenly over the processes) are not re-judged on what was accepted under older rules.
STORED = {"stored": True}


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


# Length bounds of request strings. Generous for real use; they exist so no field can carry megabytes.
MAX_NAME_CHARS = 256  # ids, hub names, splits, revisions, queue names
MAX_PATH_CHARS = 1024  # paths inside the data dir, base-model directories
MAX_MODULE_NAMES = 1024  # entries of a target/exclude list
SEED_LIMIT = SEED_BOUND  # seeds are 0 <= seed < 2**63: what torch.manual_seed and numpy take without overflow

ShortStr = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]
PathStr = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATH_CHARS)]
PatternStr = Annotated[str, StringConstraints(max_length=MAX_PATTERN_CHARS)]
ModuleNames = Annotated[list[ShortStr], Field(max_length=MAX_MODULE_NAMES)]


class _Strict(RequestModel):
    # Requests only: inf/nan never cross the boundary (``1e309`` parses as inf in JSON; core.requests). Stored
    # records that the workers fill (metrics, eta) are plain models, since a diverged loss may legitimately be nan.
    model_config = ConfigDict(extra="forbid")


# --- datasets: exactly one form -------------------------------------------------------------------------------
class _Dataset(_Strict):
    format: FormatName | None = Field(None, description="row format for every row; detected per row when unset")


class RecordsDataset(_Dataset):
    records: list[dict[str, Any]] = Field(
        min_length=1, description="rows: {'text'} or {'prompt','completion'} or {'messages'}"
    )


class PathDataset(_Dataset):
    path: PathStr = Field(description="JSONL/CSV/Parquet file inside the data dir's datasets folder")


class FileDataset(_Dataset):
    file_id: ShortStr


class HFDataset(_Dataset):
    hf_dataset: ShortStr = Field(
        description="a dataset folder inside the datasets dir, named relative to it; a hub "
        "id only where the operator allows it (BONE_ALLOW_HUB_DATASETS)",
        json_schema_extra={"pattern": DATASET_NAME_PATTERN},
    )
    split: ShortStr = "train"
    revision: ShortStr | None = None

    @field_validator("hf_dataset")
    @classmethod
    def _name_shape(cls, value: str, info: ValidationInfo) -> str:
        # A stored record keeps the name it was accepted with: the worker meets it with the same rule
        # (core.paths.dataset_source), as a one-line job error rather than an unreadable record.
        if info.context and info.context.get("stored"):
            return value
        return check_dataset_name(value)


DatasetSpec = RecordsDataset | PathDataset | FileDataset | HFDataset


class InlineRecords(_Dataset):
    """What a job record keeps of inline rows: how many (the rows themselves are stored apart, see JobStore)."""

    records: int = Field(ge=0)


# What a job record holds: the request's dataset, with inline rows replaced by their count. Typed all the way
# to the worker, which dispatches on the class (each form has its own required key, so exactly one fits).
DatasetRef = InlineRecords | PathDataset | FileDataset | HFDataset


# The API's default rank. BoneConfig's is PEFT's 64, sized for 7B models; the service's jobs default to small
# models (the README's walk-through trains r=8), and 8 is what the API has always documented. The one default
# where a job differs from BoneConfig.
API_DEFAULT_R = 8


class BoneSpec(_Strict):
    """The fields of ``bone.BoneConfig`` a job may set, with BoneConfig's names, defaults (except ``r``:
    ``API_DEFAULT_R``) and rules: ``r`` is checked by ``bone.config.check_r``, and ``to_config`` builds the
    BoneConfig that validates the rest (the API does it on POST /jobs, with the shapes of the base model).
    The bounds here only keep requests small; `r` is also bounded by settings (BONE_MAX_R)."""

    r: int = Field(API_DEFAULT_R, json_schema_extra={"minimum": MIN_R})
    target_modules: ModuleNames | PatternStr | None = Field(
        BoneConfig.target_modules,
        description="module names, or one regex (RE2 syntax: no look-around or back-references)",
    )
    exclude_modules: ModuleNames | PatternStr | None = BoneConfig.exclude_modules
    # "mini" is left out on purpose: it exists only in the MiSS format, and the service stores PEFT's BONE one
    init_weights: bool | Literal["bat"] = True  # BoneConfig's (its type is wider: it includes "mini")
    layers_to_transform: (
        Annotated[list[Annotated[int, Field(ge=0, le=100_000)]], Field(max_length=MAX_MODULE_NAMES)]
        | Annotated[int, Field(ge=0, le=100_000)]
        | None
    ) = BoneConfig.layers_to_transform
    layers_pattern: ModuleNames | ShortStr | None = BoneConfig.layers_pattern
    bias: Bias = BoneConfig.bias

    @field_validator("r")
    @classmethod
    def _r(cls, value: int) -> int:
        return check_r(value)

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _bounded_regex(cls, value: Any) -> Any:
        if isinstance(value, str):  # a string is a regex matched against every module name (core/patterns.py)
            check_pattern(value)
        return value

    def to_config(self, **fields: Any) -> BoneConfig:
        """The ``BoneConfig`` of this spec plus ``fields`` (task type, base model); raises ``BoneConfigError``
        naming the field at fault."""
        return BoneConfig(**self.model_dump(), **fields)


class TrainingSpec(_Strict):
    # Upper bounds here are only what no job could mean; the server's own (BONE_MAX_EPOCHS,
    # BONE_MAX_TRAIN_STEPS, BONE_MAX_TRAIN_TOKENS) are checked by app/job_checks.py and again by the worker.
    epochs: float = Field(3.0, gt=0, le=1_000_000)
    max_steps: int | None = Field(None, ge=1, le=10**12, description="overrides epochs when set")
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(0, ge=0, le=10**12)
    # -- one job on several devices (PyTorch distributed; bounded by BONE_MAX_NUM_PROCESSES). Declared before
    #    batch_size: its check reads them.
    num_nodes: int = Field(
        1,
        ge=1,
        le=64,
        description="machines (fleet workers) that run the job together, each with num_processes processes "
        "(worker/nodes.py); bounded by BONE_MAX_NUM_NODES",
    )
    num_processes: int = Field(
        1,
        ge=1,
        le=64,
        validation_alias=AliasChoices("num_processes", "processes_per_node"),
        description="training processes per node (alias processes_per_node; one per GPU; gloo on CPU); each of "
        "the num_nodes x num_processes ranks takes a disjoint shard of every global batch, so the loss curve "
        "matches one process",
    )
    per_device_batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="examples per process per micro-batch; sets batch_size = per_device_batch_size x num_processes",
    )
    sharding: Literal["none", "full"] = Field(
        "none",
        description="none: every process holds the whole base (DistributedDataParallel); full: FSDP2 "
        "fully_shard over the processes, each holding 1/num_processes of the base and of the Bone blocks, so a "
        "base bigger than one device trains (checkpoints and the adapter gather only the blocks). With "
        "num_processes=1 there is nothing to shard over and full trains like none",
    )
    batch_size: int = Field(
        4,
        ge=1,
        le=1024,
        validate_default=True,
        description="global micro-batch (all processes together); a multiple of num_processes; "
        "one optimizer step sees batch_size x gradient_accumulation_steps examples",
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_seq_length: int = Field(512, ge=8, le=1 << 20)
    packing: bool = Field(False, description="concatenate examples into max_seq_length blocks (no padding)")
    group_by_length: bool = Field(
        False,
        description="batch examples of similar length together (less padding; transformers' megabatch "
        "grouping, seeded); off by default, as in transformers, since it changes the batches",
    )
    weight_decay: float = Field(0.0, ge=0, le=100.0)
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6)
    seed: int = Field(42, ge=0, lt=SEED_LIMIT)
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, ~30% slower"
    )
    # -- evaluation: on `validation_dataset` if the job has one, else on a seeded `eval_fraction` of the rows
    eval_fraction: float | None = Field(None, gt=0, lt=1)
    eval_every: int | None = Field(None, ge=1, le=10**12, description="steps between evaluations (and one at the end)")
    early_stopping_patience: int | None = Field(
        None, ge=1, le=1_000_000, description="evaluations without a better eval loss"
    )
    # -- checkpoints under the job's work dir; a retried job resumes from the newest
    save_every: int | None = Field(None, ge=1, le=10**12, description="steps between checkpoints")
    publish_checkpoints: bool = Field(False, description="also publish each checkpoint as adapter <name>-step-<n>")

    @field_validator("batch_size")
    @classmethod
    def _whole_shards(cls, value: int, info: ValidationInfo) -> int:
        """Every process gets the same number of rows of each micro-batch (none gets an empty one). A rule for
        new jobs only: a record stored before it still loads (the trainer copes with uneven shards)."""
        if info.context and info.context.get("stored"):
            return value
        nodes, per_node = info.data.get("num_nodes", 1), info.data.get("num_processes", 1)
        if info.data.get("per_device_batch_size") is None and value % (nodes * per_node):
            ranks = f"num_processes={per_node}" if nodes == 1 else f"num_nodes x num_processes={nodes * per_node}"
            raise ValueError(
                f"batch_size={value} is the global micro-batch and must be a multiple of {ranks} "
                "(or set per_device_batch_size)"
            )
        return value

    @model_validator(mode="after")
    def _per_device_sets_batch_size(self) -> TrainingSpec:
        if self.per_device_batch_size is not None:
            derived = self.per_device_batch_size * self.world_size
            if "batch_size" in self.model_fields_set and self.batch_size != derived:
                raise ValueError(
                    f"batch_size={self.batch_size} contradicts per_device_batch_size="
                    f"{self.per_device_batch_size} x world size {self.world_size} (num_nodes x num_processes) "
                    f"= {derived}; set one of them"
                )
            self.batch_size = derived
        return self

    @property
    def world_size(self) -> int:
        """Training processes in all: num_nodes x num_processes (processes_per_node)."""
        return self.num_nodes * self.num_processes

    @model_validator(mode="after")
    def _early_stopping_needs_eval(self) -> TrainingSpec:
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("early_stopping_patience needs eval_every")
        if self.publish_checkpoints and self.save_every is None:
            raise ValueError("publish_checkpoints needs save_every")
        return self


class JobCreate(_Strict):
    adapter_name: AdapterName
    dataset: DatasetSpec
    base_model: PathStr | None = Field(
        None,
        description="defaults to the server's base model; else a Hugging Face "
        "id or a directory inside the allowed model dirs (BONE_ALLOWED_MODEL_DIRS)",
    )
    bone: BoneSpec = Field(default_factory=BoneSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    validation_dataset: DatasetSpec | None = Field(None, description="rows to evaluate on (instead of eval_fraction)")
    overwrite: bool = False
    queue: ShortStr | None = Field(
        None,
        description="worker queue (e.g. gpu-24g, cpu); default: chosen from the base "
        "model (BONE_RESOURCE_QUEUES), else the server's default queue",
    )

    @model_validator(mode="after")
    def _eval_needs_rows(self) -> JobCreate:
        if (
            self.training.eval_every is not None
            and self.validation_dataset is None
            and self.training.eval_fraction is None
        ):
            raise ValueError("training.eval_every needs validation_dataset or training.eval_fraction")
        return self


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    phase: str | None = None  # loading, tokenizing, training, evaluating, checkpointing, publishing
    eta_s: float | None = None  # seconds left, from this attempt's mean step time


class Job(BaseModel):
    """The job record as stored in Redis and returned by the API."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    status: JobStatus = JobStatus.QUEUED
    adapter_name: AdapterName
    base_model: str
    dataset: DatasetRef  # inline records are stored apart (see JobStore)
    bone: BoneSpec
    training: TrainingSpec
    validation_dataset: DatasetRef | None = None
    overwrite: bool = False
    owner: str | None = None
    progress: Progress = Field(default_factory=Progress)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    error: str | None = None
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    queue: str | None = None  # the RQ queue it was (last) put on; None = the server's default queue
    worker: str | None = None  # the worker that ran its latest attempt
    # POST /jobs' estimate of one training process's device memory (core/memory_estimate.py): base / shards,
    # Bone blocks with gradients and AdamW moments, activations at the batch and sequence length asked for
    estimated_device_bytes: int | None = None
    # ... of which the base model (and, sharded, what FSDP gathers): what co-training counts once for a whole
    # group, while every member adds the rest (worker/cotrain_claims.py)
    estimated_base_bytes: int | None = None
    # Co-training: the jobs this one trained with in one batch (any attempt). Only its own owner's ids: another
    # tenant's ids would tell its owner nothing useful and are not theirs to hold, so those are only counted.
    co_trained_with: list[str] = Field(
        default_factory=list,
        description="ids of this owner's jobs it was trained together with in one batch (co-training)",
    )
    co_trained_with_others: int = Field(
        0, description="how many other owners' jobs it was trained together with (their ids are not shown)"
    )
    train_alone: bool = Field(
        False,
        description="set when a co-training group's shared step failed: its next attempts train alone",
    )

    @staticmethod
    def new_id() -> str:
        return "job-" + uuid.uuid4().hex[:20]

    @field_serializer("dataset", "validation_dataset")
    def _dataset_summary(self, dataset: DatasetRef | None) -> dict[str, Any] | None:
        return None if dataset is None else dataset.model_dump(exclude_none=True)


def dataset_summary(dataset: DatasetSpec) -> dict[str, Any]:
    """What a job record shows of its dataset: the reference, never the inline rows themselves."""
    if isinstance(dataset, RecordsDataset):
        return {"records": len(dataset.records), **({"format": dataset.format} if dataset.format else {})}
    return dataset.model_dump(exclude_none=True)


_DATASET_REF: TypeAdapter[DatasetRef] = TypeAdapter(DatasetRef)


def dataset_ref(value: DatasetRef | dict[str, Any]) -> DatasetRef:
    """A stored dataset summary (a dict in records that keep it untyped, e.g. evaluations) as its typed form."""
    if not isinstance(value, dict):
        return value
    try:
        return _DATASET_REF.validate_python(value, context=STORED)
    except ValidationError:
        from core.errors import InvalidRequest

        raise InvalidRequest(f"unknown dataset form {sorted(value)}", param="dataset") from None


def check_job_size(
    training: TrainingSpec, settings: Any, *, steps: int | None = None, tokens_per_example: float | None = None
) -> None:
    """The server's bounds on one job (BONE_MAX_EPOCHS, BONE_MAX_TRAIN_STEPS, BONE_MAX_TRAIN_TOKENS). The API
    checks what the request says (``max_steps`` at the most every token of ``max_seq_length``); the worker,
    once the data is tokenized, checks again with the real ``steps`` and mean ``tokens_per_example``."""
    from core.errors import InvalidRequest

    if training.epochs > settings.max_epochs:
        raise InvalidRequest(
            f"training.epochs={training.epochs:g} exceeds the server's limit of "
            f"{settings.max_epochs:g} (BONE_MAX_EPOCHS)",
            param="training.epochs",
        )
    steps = training.max_steps if steps is None else steps
    if steps is None:
        return  # epochs over a dataset not read yet: the worker checks
    param = "training.max_steps" if training.max_steps is not None else "training.epochs"
    if steps > settings.max_train_steps:
        raise InvalidRequest(
            f"the job would run {steps:,} optimizer steps; the server's limit is "
            f"{settings.max_train_steps:,} (BONE_MAX_TRAIN_STEPS)",
            param=param,
        )
    per_example = training.max_seq_length if tokens_per_example is None else tokens_per_example
    tokens = steps * training.batch_size * training.gradient_accumulation_steps * per_example
    if tokens > settings.max_train_tokens:
        raise InvalidRequest(
            f"the job would train on up to {tokens:,.0f} tokens ({steps:,} steps x batch_size "
            f"{training.batch_size} x gradient_accumulation_steps "
            f"{training.gradient_accumulation_steps} x {per_example:,.0f} tokens per example); the "
            f"server's limit is {settings.max_train_tokens:,} (BONE_MAX_TRAIN_TOKENS)",
            param=param,
        )
