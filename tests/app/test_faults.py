"""Faults injected into a running API, each with what the service promises about it:

- Redis stopped while the API runs → 503 in the envelope, /readyz not ready, generation keeps serving, and
  everything recovers by itself once Redis is back (no restart).
- The registry's publisher killed mid-write → no partial adapter is ever listed or served; an older version
  stays intact; the leftovers are swept.
- A weights file corrupted on disk → refused on load with an error naming it (sha256), the rest keep serving.
- An adapter whose shapes do not fit the base model → refused at import (POST /adapters), naming the module;
  nothing is published. A fitting PEFT Bone or MiSS import serves exactly what it was trained to.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
import torch

from core.registry import CONFIG_FILE, WEIGHTS_FILE, AdapterRegistry
from tests.app.conftest import TEST_LIMITS, LiveServer, free_port, make_settings, publish_adapter

ROOT = Path(__file__).resolve().parents[2]


class RedisProcess:
    """A private real redis-server on a free port with its data in ``folder`` (AOF on request)."""

    def __init__(self, folder: Path, *, appendonly: bool = False, port: int | None = None) -> None:
        self.folder, self.appendonly, self.port = folder, appendonly, port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> RedisProcess:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
        ]
        self.proc = subprocess.Popen(args, stdout=open(self.folder / "redis.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start: " + (self.folder / "redis.log").read_text()[-2000:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path):
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.stop(signal.SIGKILL)


def poll(predicate, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


# --- Redis down --------------------------------------------------------------------------------------------------
def test_redis_down_is_503_and_recovers_without_restart(tmp_path, own_redis, shared_models_dir):
    settings = make_settings(tmp_path / "data", shared_models_dir, redis_url=own_redis.url, **TEST_LIMITS)
    with LiveServer(settings) as server, server.client(timeout=30) as client:
        body = {"adapter_name": "before", "dataset": {"records": [{"text": "row"}]}}
        assert client.post("/jobs", json=body).status_code == 202
        assert client.get("/readyz").status_code == 200

        own_redis.stop()
        for method, path, json_body in (
            ("GET", "/jobs", None),
            ("POST", "/jobs", {**body, "adapter_name": "during"}),
            ("GET", "/readyz", None),
        ):
            started = time.monotonic()
            reply = client.request(method, path, json=json_body)
            assert reply.status_code == 503, (path, reply.text)
            error = reply.json()["error"]
            assert error["type"] == "service_unavailable" and error["code"] == "redis_unavailable", error
            assert time.monotonic() - started < 5  # answered, not hung
        assert client.get("/healthz").status_code == 200  # alive: no reason to restart it
        gen = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 3, "temperature": 0})
        assert gen.status_code == 200, gen.text  # generation needs no Redis

        own_redis.start()  # same port; the API reconnects by itself
        assert poll(lambda: client.get("/readyz").status_code == 200, timeout=30)
        after = client.post("/jobs", json={**body, "adapter_name": "after"})
        assert after.status_code == 202, after.text
        assert client.get(f"/jobs/{after.json()['id']}").json()["status"] == "queued"


# --- publish interrupted -----------------------------------------------------------------------------------------
PUBLISH_THEN_STALL = """
import shutil, sys, time
from pathlib import Path
import core.registry as reg

real_copy = shutil.copyfile
def stalling_copy(src, dst, *args, **kwargs):
    if Path(dst).name != reg.WEIGHTS_FILE:
        return real_copy(src, dst, *args, **kwargs)
    data = Path(src).read_bytes()
    with open(dst, "wb") as out:
        out.write(data[: len(data) // 2])  # half the weights are on disk...
        out.flush()
    print("mid-write", flush=True)
    time.sleep(120)  # ... when the process is killed
shutil.copyfile = stalling_copy  # wherever the registry's storage copies from
reg.AdapterRegistry(Path(sys.argv[1])).publish(sys.argv[2], Path(sys.argv[3]), {"base_model": "embedded", "bone": {}},
                                                overwrite=True)
"""


def kill_mid_publish(registry_dir: Path, name: str, source: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISH_THEN_STALL, str(registry_dir), name, str(source)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "mid-write"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def adapter_files(settings, name: str, folder: Path, seed: int) -> Path:
    """An adapter's PEFT folder (made by publishing to a scratch registry)."""
    scratch = make_settings(folder / "scratch", settings.models_dir.resolve())
    publish_adapter(scratch, name, seed=seed)
    return AdapterRegistry(scratch.registry_dir).path(name)


def test_a_publish_killed_mid_write_never_shows_a_partial_adapter(client, live, tmp_path):
    source = adapter_files(live.settings, "x", tmp_path, seed=5)
    old = publish_adapter(live.settings, "kept", seed=6)
    before = client.post("/generate", json={"adapter": "kept", "prompt": "abc", "max_new_tokens": 4, "temperature": 0})

    kill_mid_publish(live.settings.registry_dir, "fresh", source)  # a new name
    kill_mid_publish(live.settings.registry_dir, "kept", source)  # a new version over an existing one

    leftovers = [p.name for p in live.settings.registry_dir.iterdir() if p.name.startswith(".staging-")]
    assert len(leftovers) == 2  # the half-written folders exist ...
    assert [a["name"] for a in client.get("/adapters").json()["data"]] == ["kept"]  # ... but are never listed
    assert client.get("/adapters/fresh").status_code == 404
    assert client.get("/adapters/kept").json()["sha256"] == old.sha256  # the old version, whole
    gen = client.post("/generate", json={"adapter": "fresh", "prompt": "abc", "max_new_tokens": 4})
    assert gen.status_code == 404
    again = client.post("/generate", json={"adapter": "kept", "prompt": "abc", "max_new_tokens": 4, "temperature": 0})
    assert again.status_code == 200 and again.json()["text"] == before.json()["text"]

    registry = AdapterRegistry(live.settings.registry_dir)
    assert registry.sweep() == 0  # what the API does at start: young leftovers may be publishes still copying
    assert registry.sweep(grace_s=0) == 2  # once past the grace period; their publishers are dead (no flock held)
    assert not [p for p in live.settings.registry_dir.iterdir() if p.name.startswith((".staging-", ".trash-"))]


# --- corrupted weights -------------------------------------------------------------------------------------------
def test_corrupted_weights_are_refused_by_name_and_the_rest_keep_serving(client, live):
    publish_adapter(live.settings, "healthy", seed=7)
    publish_adapter(live.settings, "damaged", seed=8)
    weights = live.settings.registry_dir / "damaged" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor: still loads as safetensors, wrong numbers
    weights.write_bytes(bytes(data))

    reply = client.post("/generate", json={"adapter": "damaged", "prompt": "hi", "max_new_tokens": 3})
    assert 400 <= reply.status_code < 600 and reply.status_code != 200
    error = reply.json()["error"]
    assert error["code"] == "corrupt_adapter" and "damaged" in error["message"] and "sha256" in error["message"]
    assert "damaged/adapter_model.safetensors" in error["message"]  # named inside the registry ...
    assert str(live.settings.data_dir) not in error["message"]  # ... never by a server path
    assert "Traceback" not in reply.text

    for adapter in ("healthy", None):
        ok = client.post("/generate", json={"adapter": adapter, "prompt": "hi", "max_new_tokens": 3})
        assert ok.status_code == 200, ok.text
    batch = [
        client.post("/generate", json={"adapter": a, "prompt": "hi", "max_new_tokens": 2})
        for a in ("healthy", "damaged", "healthy")
    ]
    assert [r.status_code == 200 for r in batch] == [True, False, True]


# --- import: shapes checked before publishing ------------------------------------------------------------------
def peft_folder(
    folder: Path,
    *,
    hidden: int = 256,
    intermediate: int = 688,
    r: int = 4,
    seed: int = 0,
    fmt: str = "bone",
    **config_fields,
) -> Path:
    """A Bone adapter for a Llama with these sizes, saved in PEFT's layout (BONE or MISS)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bone import BoneConfig, get_bone_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=264,
                hidden_size=hidden,
                intermediate_size=intermediate,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
        config = BoneConfig(r=r, target_modules=["q_proj", "v_proj"], init_weights=False, **config_fields)
        bone_model = get_bone_model(model, config, adapter_name="default")
    bone_model.save_pretrained(folder, **({"format": fmt} if fmt != "bone" else {}))
    return folder


def import_adapter(client: httpx.Client, name: str, folder: Path, **form) -> httpx.Response:
    return client.post(
        "/adapters",
        data={"name": name, **form},
        files={
            "adapter_config": (CONFIG_FILE, (folder / CONFIG_FILE).read_bytes(), "application/json"),
            "adapter_model": (WEIGHTS_FILE, (folder / WEIGHTS_FILE).read_bytes(), "application/octet-stream"),
        },
    )


def test_an_adapter_that_does_not_fit_the_base_model_is_refused_at_import(client, live, tmp_path):
    wrong = peft_folder(tmp_path / "wrong", hidden=128, intermediate=352)  # another model's shapes
    reply = import_adapter(client, "misfit", wrong)
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["param"] == "adapter_model" and error["code"] == "adapter_mismatch"
    assert "model.layers.0.self_attn.q_proj" in error["message"] and "shape" in error["message"]
    assert client.get("/adapters/misfit").status_code == 404
    assert client.get("/adapters").json()["data"] == []
    assert not [p for p in live.settings.data_dir.iterdir() if p.name.startswith(".import-")]  # nothing left behind


@pytest.mark.parametrize(
    "damage, param",
    [
        ("config-json", "adapter_config"),
        ("peft-type", "adapter_config"),
        ("pickle", "adapter_model"),
        ("missing-key", "adapter_model"),
        ("extra-key", "adapter_model"),
        ("r-over-limit", "adapter_config"),
    ],
)
def test_broken_imports_are_refused_naming_the_part(client, tmp_path, damage, param):
    folder = peft_folder(tmp_path / "a", r=TEST_LIMITS["max_r"] * 2 if damage == "r-over-limit" else 4)
    from safetensors.torch import load_file, save_file

    config = json.loads((folder / CONFIG_FILE).read_text())
    tensors = {k: v.clone() for k, v in load_file(folder / WEIGHTS_FILE).items()}  # not the mmap we overwrite
    if damage == "config-json":
        (folder / CONFIG_FILE).write_text("{not json")
    elif damage == "peft-type":
        (folder / CONFIG_FILE).write_text(json.dumps({**config, "peft_type": "LORA"}))
    elif damage == "pickle":
        torch.save(tensors, folder / WEIGHTS_FILE)  # a pickled checkpoint under the safetensors name
    elif damage == "missing-key":
        save_file(dict(list(tensors.items())[1:]), folder / WEIGHTS_FILE)
    elif damage == "extra-key":
        save_file({**tensors, "base_model.model.lm_head.bone_block": torch.zeros(4, 264)}, folder / WEIGHTS_FILE)
    reply = import_adapter(client, "broken", folder)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["param"] == param
    assert client.get("/adapters").json()["data"] == []


@pytest.mark.parametrize("fmt", ["bone", "miss"])
def test_a_fitting_peft_adapter_imports_and_serves_what_it_learned(client, live, tmp_path, fmt):
    from bone import BoneModel
    from core.base_model import load_base_model

    folder = peft_folder(tmp_path / fmt, seed=11, fmt=fmt)
    reply = import_adapter(client, f"imported-{fmt}", folder)
    assert reply.status_code == 201, reply.text
    info = reply.json()
    assert info["name"] == f"imported-{fmt}" and info["base_model"] == "embedded" and len(info["sha256"]) == 64
    assert [a["name"] for a in client.get("/adapters").json()["data"]] == [f"imported-{fmt}"]
    again = import_adapter(client, f"imported-{fmt}", folder)
    assert again.status_code == 409  # no silent overwrite
    assert import_adapter(client, f"imported-{fmt}", folder, overwrite="true").status_code == 201

    # Served output == the same checkpoint loaded with the bone library onto the base model.
    base = load_base_model("embedded", live.settings, device=torch.device("cpu"))
    reference = BoneModel.from_pretrained(base.model, folder)
    prompt = "The capital"
    ids = torch.tensor([base.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        want = reference.generate(
            input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=base.tokenizer.pad_token_id
        )
    want_text = base.tokenizer.decode(want[0, ids.shape[1] :], skip_special_tokens=True)
    served = client.post(
        "/generate", json={"adapter": f"imported-{fmt}", "prompt": prompt, "max_new_tokens": 6, "temperature": 0}
    )
    assert served.status_code == 200, served.text
    assert served.json()["text"] == want_text


# --- generation overload -----------------------------------------------------------------------------------------
def test_generation_overload_answers_429_with_retry_after_not_timeouts(tmp_path, redis_url, shared_models_dir):
    from concurrent.futures import ThreadPoolExecutor

    settings = make_settings(
        tmp_path / "data", shared_models_dir, **{**TEST_LIMITS, "max_queue": 2, "max_batch_size": 2}
    )
    with LiveServer(settings) as server, server.client(timeout=60) as client:

        def one(i):
            started = time.monotonic()
            reply = client.post("/generate", json={"prompt": f"story {i}", "max_new_tokens": 64, "temperature": 0})
            return reply, time.monotonic() - started

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(one, range(24)))
    codes = sorted({reply.status_code for reply, _ in results})
    assert codes == [200, 429], codes
    for reply, seconds in results:
        if reply.status_code == 429:
            assert reply.json()["error"]["type"] == "rate_limit_error" and int(reply.headers["retry-after"]) >= 1
            assert seconds < 5  # refused at once, not after waiting in line
