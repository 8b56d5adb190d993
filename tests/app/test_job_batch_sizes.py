"""POST /jobs and the global batch of a multi-process job: a batch_size every process can share evenly, or a
per_device_batch_size that sets it; anything else is a 422 naming the field."""

from __future__ import annotations

import pytest

RECORDS = [{"prompt": "2+2=", "completion": "4"}, {"text": "plain text row"}]


@pytest.mark.parametrize(
    "training, param, words",
    [
        ({"num_processes": 2, "batch_size": 3}, "training.batch_size", "multiple of num_processes=2"),
        ({"num_processes": 3}, "training.batch_size", "batch_size=4"),  # the default 4 does not split over 3
        ({"num_processes": 2, "per_device_batch_size": 2, "batch_size": 3}, "training", "contradicts"),
    ],
)
def test_a_global_batch_the_processes_cannot_share_is_refused(client, training, param, words):
    reply = client.post("/jobs", json={"adapter_name": "x", "dataset": {"records": RECORDS}, "training": training})
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_per_device_batch_size_sets_the_global_batch(client):
    reply = client.post(
        "/jobs",
        json={
            "adapter_name": "pd",
            "dataset": {"records": RECORDS},
            "training": {"num_processes": 2, "per_device_batch_size": 3},
        },
    )
    assert reply.status_code == 202, reply.text
    assert reply.json()["training"]["batch_size"] == 6 and reply.json()["training"]["per_device_batch_size"] == 3


@pytest.mark.parametrize(
    "training, batch_size",
    [
        ({"num_nodes": 2, "processes_per_node": 2}, 4),  # processes_per_node: the alias of num_processes
        ({"num_nodes": 2, "num_processes": 2, "per_device_batch_size": 3}, 12),
        ({"num_nodes": 3, "batch_size": 6}, 6),
    ],
)
def test_a_multi_node_job_shares_the_global_batch_over_every_node_s_processes(client, training, batch_size):
    reply = client.post("/jobs", json={"adapter_name": "nodes", "dataset": {"records": RECORDS}, "training": training})
    assert reply.status_code == 202, reply.text
    stored = reply.json()["training"]
    assert stored["batch_size"] == batch_size and stored["num_nodes"] == training["num_nodes"]
    assert stored["num_processes"] == training.get("processes_per_node", training.get("num_processes", 1))


@pytest.mark.parametrize(
    "training, param, words",
    [
        ({"num_nodes": 2, "num_processes": 2, "batch_size": 6}, "training.batch_size", "num_nodes x num_processes=4"),
        ({"num_nodes": 3}, "training.batch_size", "batch_size=4"),
        ({"num_nodes": 9, "batch_size": 9}, "training.num_nodes", "BONE_MAX_NUM_NODES"),
    ],
)
def test_a_multi_node_job_the_server_cannot_run_is_refused(client, training, param, words):
    reply = client.post("/jobs", json={"adapter_name": "x", "dataset": {"records": RECORDS}, "training": training})
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error
