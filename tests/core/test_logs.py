import io
import json
import logging

import pytest

from core.logs import ContextFilter, JsonFormatter, job_id_var, redact, request_id_var


@pytest.mark.parametrize(
    "text,secret",
    [
        ("Authorization: Bearer sk-abc123.def", "sk-abc123.def"),
        ("connecting to redis://user:hunter2@redis:6379/0", "hunter2"),
        ("api_key=supersecret rest", "supersecret"),
        ('{"password": "p4ss"}', "p4ss"),
    ],
)
def test_secrets_are_masked(text, secret):
    assert secret not in redact(text)


def _capture(message: str) -> dict:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.warning(message)
    return json.loads(stream.getvalue())


def test_json_lines_carry_request_and_job_ids():
    token_r = request_id_var.set("req-1")
    token_j = job_id_var.set("job-9")
    try:
        entry = _capture("hello Bearer tok123")
    finally:
        request_id_var.reset(token_r)
        job_id_var.reset(token_j)
    assert entry["request_id"] == "req-1" and entry["job_id"] == "job-9"
    assert entry["level"] == "warning" and "tok123" not in entry["message"]
    assert "request_id" not in _capture("outside any request")
