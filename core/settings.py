"""Service settings: read once from the environment (prefix ``BONE_``), validated, then passed inward.

Nothing below ``get_settings()`` reads ``os.environ``; tests build a ``Settings`` directly or override the
FastAPI dependency.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.keys import parse_key_entries

EMBEDDED_BASE_MODEL = "embedded"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BONE_", extra="ignore", frozen=True)

    # --- where things live -------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: Path = Path("bone-data")
    # The adapter registry: None = <data_dir>/adapters; else an fsspec URL shared by every replica and worker,
    # e.g. s3://bucket/prefix (credentials from the usual AWS_* variables or fsspec's FSSPEC_S3_* config).
    registry_url: str | None = None
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (SeaweedFS, MinIO) for s3:// registry URLs"
    )
    registry_cache_bytes: int = Field(
        10 * 1024**3,
        ge=0,
        description="local copies of object-storage weights "
        "(<data dir>/registry-cache) kept up to this size, least recently used "
        "dropped first; 0 = no bound",
    )
    registry_sweep_grace_s: float = Field(
        3600.0,
        ge=0,
        description="leftovers of interrupted publishes "
        "(staging/trash folders, unreferenced object versions) younger than this "
        "are left alone by the sweep each API start runs",
    )
    # The way out to vLLM (core/vllm_export.py): the API keeps this folder in sync with the registry.
    vllm_export_dir: Path | None = Field(
        None,
        description="keep this folder in sync with the registry: every adapter as its exact LoRA adapter in "
        "the layout vLLM reads (--lora-modules NAME=DIR/NAME, or VLLM_LORA_RESOLVER_CACHE_DIR=DIR)",
    )
    vllm_export_interval_s: float = Field(30.0, gt=0, description="seconds between two syncs of vllm_export_dir")
    vllm_export_base_model: str | None = Field(
        None,
        max_length=4096,
        description="base_model_name_or_path written into vllm_export_dir: the name vLLM serves the base under "
        "(its resolver compares the two); default: what a LoRA download writes",
    )
    base_model: str = Field(
        EMBEDDED_BASE_MODEL,
        description="Hugging Face id or local directory of the shared base model; 'embedded' builds a tiny "
        "Llama-architecture model into the data dir on first use.",
    )
    # Local base-model directories and `path` datasets must resolve inside one of these (the data dir always counts).
    allowed_model_dirs: list[Path] = Field(default_factory=list)
    trust_remote_code: bool = False  # operator-only: never taken from a request

    # --- network -----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    # The HTTP server holds its ground (app/http_server.py): a client has this long to send a request's head
    # (request line + headers) once the connection is ready for one, so slow-header clients (slowloris) are cut
    # off; idle keep-alive connections close after keep_alive; beyond max_connections new requests get 503.
    http_header_timeout_s: float = Field(10.0, gt=0, description="seconds to receive a request's head")
    http_keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections close after this")
    http_max_connections: int = Field(
        1024, ge=1, description="open connections (and running requests) beyond which new requests are answered 503"
    )
    http_max_header_bytes: int = Field(64 * 1024, ge=4096, description="largest request head accepted")
    # Files the server writes (registry, uploads, checkpoints, keys) are not readable by other users.
    umask: str = Field(
        "027", pattern=r"^0?[0-7]{3}$", description="process umask (octal): 027 gives 0640 files, 0750 folders"
    )

    # --- security (core/auth.py) -------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="'owner:role:sha256hex' entries, comma separated or a JSON list; `bone-server keys create` "
        "mints a key and prints its entry. Only hashes are stored.",
    )
    auth_disabled: bool = Field(False, description="serve without keys; refused unless the host is loopback")
    rate_limit_window_s: int = Field(60, ge=1)
    rate_limit_training: int = Field(
        60,
        ge=0,
        description="POST /jobs, /evals, /files, /adapters (import) and "
        "/adapters/{name}/compose per key per window; 0 = off",
    )
    rate_limit_generation: int = Field(
        600, ge=0, description="POST /generate, /v1/*completions per key per window; 0 = off"
    )

    # --- queue / worker ----------------------------------------------------------------------------
    queue_name: str = "bone-training"
    job_timeout_s: int = Field(
        24 * 3600, ge=60, description="RQ job timeout (RQ's own default of 180 s kills training)"
    )
    worker_ttl_s: int = Field(30, ge=5, description="worker heartbeat TTL; a dead worker is noticed within ~3x this")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="auto (CUDA when present), cpu, cuda, or cuda:N to pin this process to one GPU "
        "(`bone-server worker --device cuda:N`: one worker per GPU)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the served base model (adapters are cast to it once, when they enter the "
        "device pool): auto = bfloat16 on CUDA, float32 on CPU",
    )
    # A job's trainer refreshes a heartbeat every heartbeat_ttl_s/5 s; a janitor (in every worker and API
    # process) checks every janitor_interval_s and re-queues a running job whose heartbeat expired, so a
    # killed worker's job resumes within ~ttl + interval (RQ alone notices after 90-810 s).
    heartbeat_ttl_s: float = Field(15.0, ge=1)
    janitor_interval_s: float = Field(5.0, gt=0)
    # A worker whose Redis goes away waits and reconnects (1 s, doubling up to this) instead of exiting;
    # `bone-server up` restarts a worker that exits, with the same backoff.
    reconnect_max_backoff_s: float = Field(
        30.0, ge=0.1, description="longest wait between Redis reconnects / worker restarts"
    )
    max_attempts: int = Field(3, ge=1, description="runs of one job (first + retries after its worker died)")
    checkpoints_kept: int = Field(
        2,
        ge=1,
        description="newest resume checkpoints kept per job, in the registry's store (where a retry on any "
        "worker finds them) and in the work dir's scratch copy",
    )
    # --- fleets (core/fleet.py): queues by resource; a worker serves the queues of `bone-server worker --queues`
    queues: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="resource queues jobs may name besides queue_name, comma separated (e.g. cpu,gpu-24g,gpu-80g)",
    )
    resource_queues: dict[str, str] = Field(
        default_factory=dict, description="JSON {base model: queue}: the queue of a job that names none"
    )
    max_num_processes: int = Field(8, ge=1, description="bound on a job's training.num_processes")
    distributed_timeout_s: float = Field(600.0, gt=0, description="a distributed job's collectives give up after this")
    max_num_nodes: int = Field(8, ge=1, description="bound on a job's training.num_nodes")
    rendezvous_timeout_s: float = Field(
        300.0,
        gt=0,
        description="a multi-node job whose nodes have not all joined its rendezvous after this goes back to "
        "the queue (worker/nodes.py)",
    )
    node_address: str | None = Field(
        None,
        description="the address other machines reach this worker at, published as a multi-node job's "
        "rendezvous endpoint when this worker is its first node; default: this host's address",
    )
    rendezvous_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="the port node 0 of a multi-node job hosts its rendezvous on (default: a "
        "free one); for machines behind a firewall",
    )
    distributed_max_restarts: int = Field(
        1,
        ge=0,
        description="times torch elastic restarts a distributed job's "
        "processes after one failed; the group resumes from the last checkpoint",
    )

    # --- co-training (worker/cotrain_claims.py): a worker that picks a job also takes compatible queued ones and
    #     trains them in one forward/backward
    cotrain_max_jobs: int = Field(
        8,
        ge=1,
        le=64,
        description="jobs one worker trains together in one batch (the job RQ handed it plus queued companions "
        "that can share its forward); 1 turns co-training off",
    )
    cotrain_max_slowdown: float = Field(
        1.2,
        ge=0,
        le=64,
        description="a companion joins a group only while the group's iteration, as timed on the worker's device "
        "(worker/cotrain_cost.py), takes at most this multiple of the smallest member's iteration alone: no job "
        "finishes more than this much later for sharing its batch. A saturated device (a CPU, a GPU at large "
        "batches) then trains jobs one after another; 0 = no bound",
    )
    cotrain_owner_share: int | None = Field(
        None,
        ge=1,
        le=64,
        description="the most members of one group a single owner holds while other owners' compatible jobs "
        "wait in the scan; seats nobody else wants still go to that owner. Default: half of "
        "cotrain_max_jobs, rounded up",
    )

    # --- request bounds ----------------------------------------------------------------------------
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_upload_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="multipart uploads: POST /files, POST /adapters (413 beyond)"
    )
    max_inline_records: int = Field(10_000, ge=1)
    max_r: int = Field(512, ge=1)
    max_seq_length: int = Field(4096, ge=16)
    max_new_tokens: int = Field(512, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1)
    # A prompt is refused by its size before it is tokenized (which is CPU work proportional to its length):
    # at most max_prompt_tokens x this many UTF-8 bytes. 16 covers common tokenizers' longest ordinary tokens.
    prompt_bytes_per_token: int = Field(16, ge=1, le=1024)
    # A job's size. The defaults admit any job that fits the 24 h job timeout on one fast GPU: ~20 optimizer
    # steps/s is the most a tiny model reaches (2M steps = 28 h at that rate), and ~1M tokens/s the most any
    # model trains at (1e11 tokens = 28 h). They refuse only what could never finish (max_steps=10**15).
    max_train_steps: int = Field(
        2_000_000, ge=1, description="bound on a job's optimizer steps (max_steps, or what epochs come to on its data)"
    )
    max_epochs: float = Field(1000.0, gt=0, description="bound on training.epochs")
    max_train_tokens: int = Field(
        100_000_000_000,
        ge=1,
        description="bound on the tokens one job trains on (steps x batch x accumulation x tokens per example)",
    )
    # Datasets named by a request are folders/files inside <data_dir>/datasets; a hub id only if this is on.
    allow_hub_datasets: bool = False

    # --- per-owner quotas (429 naming the quota; 0 = no bound) ------------------------------------------
    max_active_jobs_per_owner: int = Field(32, ge=0, description="queued + running jobs and evaluations")
    max_file_bytes_per_owner: int = Field(20 * 1024**3, ge=0, description="bytes of uploaded files")
    max_adapters_per_owner: int = Field(1000, ge=0, description="adapters in the registry")
    inline_records_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=60,
        description="inline dataset rows of a job expire "
        "after this even if it never ends (they are deleted when it does)",
    )

    # --- inference engine --------------------------------------------------------------------------
    max_batch_size: int | None = Field(
        None, ge=1, description="rows decoding together; default from the device: 64 on CUDA, 16 on CPU"
    )
    batch_wait_ms: float = Field(5.0, ge=0)
    max_queue: int = Field(256, ge=1)
    max_queue_per_key: int | None = Field(
        None,
        ge=1,
        description="waiting generation requests one API key (or, "
        "without keys, one client address) may hold; default max(1, max_queue // 4)",
    )
    kv_budget_tokens: int | None = Field(
        None,
        ge=1,
        description="KV cache tokens the running rows may reserve together (each its prompt + max_new_tokens, "
        "at admission); a request that does not fit waits in the queue. Default max_batch_size x "
        "(max_prompt_tokens + max_new_tokens): the bound the batch size and token limits already imply",
    )
    max_running_per_key: int | None = Field(
        None,
        ge=1,
        description="batch rows one key may be admitted beyond while another key waits (work-conserving: alone, "
        "a key may fill the batch; running rows are never stopped); default half of max_batch_size, rounded up",
    )
    max_kv_tokens_per_key: int | None = Field(
        None,
        ge=1,
        description="... and KV cache tokens it may reserve beyond (a key holding none is always admitted); "
        "default half of kv_budget_tokens, rounded up",
    )
    prefill_chunk: int = Field(
        512,
        ge=0,
        description="a newcomer's prompt longer than this many tokens is prefilled in chunks of it, one between "
        "two decode steps of the running rows, so they keep streaming while it enters (0 = off)",
    )
    request_timeout_s: float = Field(300.0, gt=0)
    adapter_cache_size: int = Field(64, ge=1, description="adapters resident on the device, by count")
    adapter_cache_bytes: int = Field(2 * 1024**3, ge=1, description="... and by bytes")
    adapter_cpu_cache_bytes: int = Field(
        4 * 1024**3,
        ge=0,
        description="adapters kept in host memory below the device pool (evicted ones stay here; 0 = no CPU tier)",
    )
    # Comma-separated or a JSON list: adapters loaded at start; pinned ones are never evicted.
    adapter_preload: Annotated[list[str], NoDecode] = Field(default_factory=list)
    adapter_pin: Annotated[list[str], NoDecode] = Field(default_factory=list)

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("adapter_preload", "adapter_pin", "queues", mode="before")
    @classmethod
    def _name_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = (
                json.loads(value)
                if value.strip().startswith("[")
                else [v.strip() for v in value.split(",") if v.strip()]
            )
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, value: object) -> list[str]:
        return parse_key_entries(value)

    @field_validator("registry_url", "s3_endpoint_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # docker-compose passes `BONE_REGISTRY_URL: ${BONE_REGISTRY_URL:-}`: empty means the local registry.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    # --- derived bounds ---------------------------------------------------------------------------------
    @property
    def queue_share(self) -> int:
        return self.max_queue_per_key or max(1, self.max_queue // 4)

    # The engine resolves max_batch_size / kv_budget_tokens from the device before it reads these two.
    @property
    def running_share(self) -> int:
        """Rows one key may hold while another waits (BONE_MAX_RUNNING_PER_KEY)."""
        return self.max_running_per_key or -(-(self.max_batch_size or 1) // 2)

    @property
    def kv_share(self) -> int:
        """KV cache tokens one key may reserve while another waits (BONE_MAX_KV_TOKENS_PER_KEY)."""
        return self.max_kv_tokens_per_key or -(-(self.kv_budget_tokens or 1) // 2)

    @property
    def cotrain_owner_seats(self) -> int:
        """Seats of a co-training group one owner may hold while others wait (BONE_COTRAIN_OWNER_SHARE)."""
        return min(self.cotrain_owner_share or -(-self.cotrain_max_jobs // 2), self.cotrain_max_jobs)

    @property
    def max_prompt_bytes(self) -> int:
        return self.max_prompt_tokens * self.prompt_bytes_per_token

    @property
    def max_generation_body_bytes(self) -> int:
        """Bodies of the generation routes: room for a prompt at its byte bound, JSON-escaped (up to 6 bytes
        per UTF-8 byte for \\u escapes), plus the other fields; never above max_body_bytes."""
        return min(self.max_body_bytes, max(1 << 20, 6 * self.max_prompt_bytes + (64 << 10)))

    # Derived locations, one place so API and worker agree.
    @property
    def registry_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def registry_cache_dir(self) -> Path:
        """Local copies of weights from an object-storage registry, keyed by sha256."""
        return self.data_dir / "registry-cache"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def datasets_dir(self) -> Path:
        """Where `{"path": ...}` datasets are looked up (relative paths resolve here)."""
        return self.data_dir / "datasets"


@lru_cache
def get_settings() -> Settings:
    return Settings()


def describe_validation_error(error: ValidationError) -> str:
    """One line naming the offending setting as the user spells it (``BONE_PORT``), for start-up failures."""
    parts = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "?"
        parts.append(f"BONE_{field.upper()}: {item['msg']} (got {item.get('input')!r})")
    return "invalid setting " + "; ".join(parts)
