"""The real API over HTTP: uvicorn on a free loopback port in a thread, real Redis, the embedded model.

``LiveServer`` keeps a handle on the FastAPI app, so tests can look at the engine (e.g. how many batches
ran) while talking HTTP to it.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from app.engine import InferenceEngine
from app.main import create_app
from core.base_model import load_base_model, resolve_base_model
from core.registry import AdapterInfo, AdapterRegistry
from core.settings import Settings
from tests.conftest import TEST_REDIS_URL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start (see the log above)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)


def make_settings(data_dir: Path, models_dir: Path, **overrides) -> Settings:
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "models").exists():
        (data_dir / "models").symlink_to(models_dir, target_is_directory=True)
    # The suite runs with BONE_AUTH_DISABLED=true (tests/conftest.py); a server given keys uses them.
    overrides.setdefault("auth_disabled", not overrides.get("api_keys"))
    return Settings(data_dir=data_dir, redis_url=overrides.pop("redis_url", TEST_REDIS_URL), **overrides)


# Tight bounds, so the limits are cheap to test.
TEST_LIMITS = {
    "max_r": 64,
    "max_inline_records": 5,
    "max_new_tokens": 64,
    "max_seq_length": 1024,
    "max_body_bytes": 64 * 1024,
    "batch_wait_ms": 50,
}


@pytest.fixture(scope="module")
def live(request, tmp_path_factory, shared_models_dir) -> LiveServer:
    """One server per test module (starting one loads the model); tests that need a clean Redis also take
    the ``redis_url`` fixture, which flushes the test database around them. A module may set
    ``SERVER_SETTINGS`` to change settings of its server."""
    overrides = {**TEST_LIMITS, **getattr(request.module, "SERVER_SETTINGS", {})}
    settings = make_settings(tmp_path_factory.mktemp("api") / "data", shared_models_dir, **overrides)
    with LiveServer(settings) as server:
        yield server


@pytest.fixture
def client(live: LiveServer, redis_url: str) -> httpx.Client:
    """A client of the module's server, with Redis flushed and the registry emptied for this test."""
    registry = AdapterRegistry(live.settings.registry_dir)
    for info in registry.list():
        registry.delete(info.name)
        live.engine.evict_adapter(info.name)
    with live.client() as http:
        yield http


# --- adapters built with the bone library on the embedded model -------------------------------------------
def publish_adapter(
    settings: Settings,
    name: str,
    *,
    seed: int,
    r: int = 4,
    init_weights=False,
    base_model: str = "embedded",
    overwrite: bool = False,
    target_modules=("q_proj", "v_proj", "o_proj", "down_proj"),
) -> AdapterInfo:
    """Publish a Bone adapter with random (seeded) blocks, so it visibly changes the model's answers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bone import BoneConfig, get_bone_model

    source = resolve_base_model("embedded", settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
        config = BoneConfig(r=r, target_modules=list(target_modules), init_weights=init_weights)
        bone_model = get_bone_model(model, config, adapter_name="default")
        if init_weights == "bat":  # Bat starts as the identity; give it something to do
            for _, layer in bone_model.bone_layers():
                torch.nn.init.normal_(layer.bone_block["default"], std=0.05)
    with tempfile.TemporaryDirectory() as folder:
        bone_model.save_pretrained(folder)
        registry = AdapterRegistry(settings.registry_dir)
        return registry.publish(
            name, Path(folder), {"base_model": base_model, "bone": config.to_dict()}, overwrite=overwrite
        )


@pytest.fixture
def make_engine(tmp_path: Path, shared_models_dir: Path):
    engines = []
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(shared_models_dir, target_is_directory=True)

    def build(**overrides) -> InferenceEngine:
        settings = Settings(data_dir=data_dir, **{"batch_wait_ms": 20, **overrides})
        base = load_base_model("embedded", settings, device=torch.device("cpu"), dtype=settings.dtype)
        engine = InferenceEngine(base, AdapterRegistry(settings.registry_dir), settings)
        engine.start()
        engines.append(engine)
        return engine

    build.settings = Settings(data_dir=data_dir)
    yield build
    for engine in engines:
        engine.stop()
