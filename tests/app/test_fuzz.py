"""Schemathesis against the server's own OpenAPI schema, on a live server with API keys on: every operation,
a bounded number of generated requests each, valid and invalid ones. No response may be a 5xx, and every
response must match what the schema documents (status code, content type, body, headers); invalid requests
must be refused, and requests without a key must be refused where the schema says a key is needed.

(schemathesis' own pytest plugin does not run on pytest 9, so each operation is a plain parametrized test
that drives hypothesis directly.)"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from app.main import create_app
from core.auth import KeyEntry, generate_key, hash_key
from core.settings import Settings

ADMIN = generate_key()
SERVER_SETTINGS = {"api_keys": [KeyEntry("fuzzer", "admin", hash_key(ADMIN)).line()],
                   "rate_limit_training": 0, "rate_limit_generation": 0, "max_prompt_tokens": 256}
EXAMPLES = {GenerationMode.POSITIVE: 15, GenerationMode.NEGATIVE: 8}  # per operation; the run stays well under a minute
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance, checks.negative_data_rejection,
          checks.ignored_auth]
OPERATIONS = [(method.upper(), path) for path, ops in create_app(Settings(_env_file=None)).openapi()["paths"].items()
              for method in ops]


@pytest.fixture(scope="module")
def api_schema(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    schema.config.update(base_url=live.url)
    return schema


def test_every_route_is_fuzzed():
    assert len(OPERATIONS) >= 15 and ("POST", "/jobs") in OPERATIONS and ("POST", "/generate") in OPERATIONS


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms_to_the_schema(api_schema, live, redis_url, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(base_url=live.url, headers={"Authorization": f"Bearer {ADMIN}"}, checks=CHECKS,
                               timeout=30)

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no invalid request to make
