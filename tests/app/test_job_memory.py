"""POST /jobs estimates one training process's device memory (core/memory_estimate.py) and refuses a job no
advertised device can hold. The adverts are real ones in Redis (core.fleet.advertise), as a worker writes them.

The default job on the embedded model needs 80,142,848 bytes per device (tests/core/test_memory_estimate.py
counts it by hand); sharded over 2 processes (per-device batch 2) 44,460,800."""

from __future__ import annotations

from core.fleet import advertise

RECORDS = [{"prompt": "2+2=", "completion": "4"}, {"text": "plain text row"}]
WHOLE, SHARDED = 80_142_848, 44_460_800


def _post(client, name, training=None, queue=None):
    body = {"adapter_name": name, "dataset": {"records": RECORDS}, "training": training or {}}
    if queue:
        body["queue"] = queue
    return client.post("/jobs", json=body)


def _gpu_worker(redis_conn, name, memory, queues=("bone-training",)):
    advertise(
        redis_conn,
        name,
        {
            "device": "cuda:0",
            "gpu_name": "Tiny GPU",
            "device_memory_bytes": memory,
            "gpu_memory_bytes": [memory],
            "queues": list(queues),
        },
        ttl_s=60,
    )


def test_the_estimate_is_in_the_job_and_cpu_workers_set_no_limit(client, redis_conn):
    advertise(redis_conn, "cpu-worker", {"device": "cpu", "memory_bytes": 1000, "queues": ["bone-training"]}, ttl_s=60)
    reply = _post(client, "est")
    assert reply.status_code == 202, reply.text
    assert reply.json()["estimated_device_bytes"] == WHOLE
    assert client.get(f"/jobs/{reply.json()['id']}").json()["estimated_device_bytes"] == WHOLE


def test_a_job_no_advertised_device_holds_is_refused_naming_the_estimate(client, redis_conn):
    _gpu_worker(redis_conn, "small-a", 60_000_000)
    _gpu_worker(redis_conn, "small-b", 70_000_000)
    _gpu_worker(redis_conn, "big-elsewhere", 10**12, queues=("other",))  # serves another queue: no help
    reply = _post(client, "too-big")
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["code"] == "insufficient_device_memory" and error["param"] == "training", error
    assert "about 0.07 GiB per device" in error["message"]  # the estimate
    assert "0.07 GiB (Tiny GPU of worker small-b)" in error["message"]  # the largest device advertised
    assert "training.sharding='full'" in error["message"]

    # sharded over two processes the same job fits the 70 MB device
    fits = _post(client, "sharded", {"num_processes": 2, "per_device_batch_size": 2, "sharding": "full"})
    assert fits.status_code == 202, fits.text
    assert fits.json()["estimated_device_bytes"] == SHARDED

    _gpu_worker(redis_conn, "big", 81_000_000)  # one device that holds it is enough
    assert _post(client, "now-fits").status_code == 202
