"""/metrics, request ids and the /ui dashboard's static files on the real server."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.app.conftest import publish_adapter


def scrape(client) -> dict[str, float]:
    """Every sample of /metrics by name and labels, e.g. ``bone_generated_tokens_total{adapter_kind="base"}``."""
    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_metrics_cover_http_queue_jobs_and_engine(live, client):
    client.get("/healthz")
    publish_adapter(live.settings, "metrics-a", seed=1)
    body = {"adapter": "metrics-a", "prompt": "hi", "max_new_tokens": 3, "temperature": 0}
    before = scrape(client)
    assert client.post("/generate", json=body).status_code == 200  # cold: a miss and a load
    cold = scrape(client)
    assert client.post("/generate", json=body).status_code == 200  # warm: a hit
    warm = scrape(client)

    def delta(a, b, name):
        return b.get(name, 0.0) - a.get(name, 0.0)

    assert delta(before, cold, "bone_adapter_cache_misses_total") == 1
    assert delta(before, cold, "bone_adapter_cache_hits_total") == 0
    assert delta(before, cold, "bone_adapter_load_seconds_count") == 1
    assert delta(cold, warm, "bone_adapter_cache_hits_total") == 1
    assert delta(cold, warm, "bone_adapter_cache_misses_total") == 0
    assert delta(before, warm, 'bone_generated_tokens_total{adapter_kind="adapter"}') == 6
    assert delta(before, warm, "bone_time_to_first_token_seconds_count") == 2
    assert delta(before, warm, "bone_engine_batch_size_count") >= 2  # one observation per decode step
    assert warm["bone_adapters_resident"] >= 1 and warm["bone_adapters_resident_bytes"] > 0

    client.post("/jobs", json={"adapter_name": "queued-one", "dataset": {"records": [{"text": "x"}]}})
    text = client.get("/metrics").text
    assert 'bone_http_request_duration_seconds_count{method="GET",route="/healthz",status="200"}' in text
    assert "bone_queue_depth 1.0" in text
    assert 'bone_jobs{status="queued"} 1.0' in text
    for name in (
        "bone_generation_tokens_per_second",
        "bone_adapter_cache_evictions_total",
        "bone_engine_batch_working_bytes",
    ):
        assert name in text


def test_unmatched_paths_do_not_explode_label_cardinality(client):
    for i in range(3):
        client.get(f"/no-such-route-{i}")
    text = client.get("/metrics").text
    assert "no-such-route" not in text and 'route="unmatched"' in text


def test_request_id_is_echoed_or_minted(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc123"}).headers["x-request-id"] == "abc123"
    assert len(client.get("/healthz").headers["x-request-id"]) == 16


def test_dashboard_is_served_without_a_build_step(client):
    page = client.get("/ui", follow_redirects=True)
    assert page.status_code == 200 and '<canvas id="loss-chart"' in page.text
    assert client.get("/ui/app.js").status_code == 200
    assert client.get("/ui/style.css").status_code == 200


def test_worker_training_figures_reach_metrics_through_redis(client, redis_conn):
    from core.jobstore import JobStore

    store = JobStore(redis_conn)  # what a worker's ProgressReporter calls after each optimizer step
    store.record_training_step(tokens_per_s=1234.5, step_time_s=0.25)
    store.record_training_step(tokens_per_s=1000.0, step_time_s=0.5)
    text = client.get("/metrics").text
    assert "bone_training_tokens_per_s 1000.0" in text
    assert "bone_training_step_time_s 0.5" in text
    assert "bone_training_steps_total 2.0" in text


def test_log_lines_of_a_request_carry_its_request_id(live, client):
    import io
    import json
    import logging

    from core.logs import ContextFilter, JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("app.routes.adapters")  # logs "deleted adapter ..." inside the request
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        publish_adapter(live.settings, "logged", seed=1)
        assert client.delete("/adapters/logged", headers={"X-Request-ID": "req-for-logs"}).status_code == 200
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert any("deleted adapter" in line["message"] for line in lines)
    assert all(line.get("request_id") == "req-for-logs" for line in lines)
