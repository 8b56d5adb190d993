"""Schemathesis against the server's own OpenAPI schema, on a live server with API keys on: every operation,
a bounded number of generated requests each, valid and invalid ones. No response may be a 5xx, and every
response must match what the schema documents (status code, content type, body, headers); invalid requests
must be refused, and requests without a key must be refused where the schema says a key is needed.

(schemathesis' own pytest plugin does not run on pytest 9, so each operation is a plain parametrized test
that drives hypothesis directly.)"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from app.main import create_app
from core.keys import KeyEntry, generate_key, hash_key
from core.settings import Settings

ADMIN = generate_key()
# Hub datasets on: generated names are then hub ids, so POST /jobs creates jobs the stateful phase can follow
# (with them off, only a folder inside the datasets dir is a dataset, and the generator cannot invent one).
SERVER_SETTINGS = {"api_keys": [KeyEntry("fuzzer", "admin", hash_key(ADMIN)).line()],
                   "rate_limit_training": 0, "rate_limit_generation": 0, "max_prompt_tokens": 256,
                   "allow_hub_datasets": True}
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



STATEFUL_CHECKS = [checks.use_after_free, checks.ensure_resource_availability]
STATEFUL_STEPS = 40  # steps per scenario; a dozen scenarios keep the stateful phase around a minute
# Derandomized so CI replays one path; FUZZ_RANDOM=1 explores new ones.


def _operation(schema: dict, ref: str) -> dict:
    path, method = ref.removeprefix("#/paths/").rsplit("/", 1)
    return schema["paths"][path.replace("~1", "/").replace("~0", "~")][method]


def test_links_resolve_to_operations():
    """Every link names an operation the schema has and parameters that operation takes: a link to a route
    that moved would otherwise silently keep the stateful phase from reaching it."""
    schema = create_app(Settings(_env_file=None)).openapi()
    links = [link for ops in schema["paths"].values() for op in ops.values()
             for response in op.get("responses", {}).values() for link in response.get("links", {}).values()]
    assert len(links) >= 12
    for link in links:
        params = {p["name"] for p in _operation(schema, link["operationRef"]).get("parameters", [])}
        assert set(link["parameters"]) <= params, link


def test_stateful_links_reach_the_deep_routes(api_schema, live, redis_url):
    """schemathesis' stateful phase: it creates jobs, files, evaluations and adapters and follows the links to
    read, cancel, download, compose and delete what it made, with schemathesis' default checks (no 5xx,
    answers as documented, a deleted resource stays gone)."""
    reached: set[tuple[str, str]] = set()

    class Machine(api_schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case):
            # A followed event stream of a job that never ends (no worker here) would hold each call for its
            # whole timeout; the stateless phase covers the stream's answers.
            if isinstance(case.query, dict) and "stream" in case.query:
                case.query["stream"] = False
            if isinstance(case.headers, dict):
                case.headers.pop("Accept", None)
                case.headers.pop("accept", None)
            super().before_call(case)

        def get_call_kwargs(self, case):
            return {"headers": {"Authorization": f"Bearer {ADMIN}"}, "timeout": 30}

        def after_call(self, response, case):
            super().after_call(response, case)
            if response.status_code < 400:
                reached.add((case.method.upper(), case.path))

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            # The stateless checks minus the data-acceptance pair (a schema-valid body can still break a rule
            # the schema cannot state, e.g. an upload's file suffix), plus the stateful ones: a created
            # resource can be read, and a deleted one stays gone.
            case.validate_response(response, checks=CHECKS[:-2], additional_checks=STATEFUL_CHECKS,
                                   transport_kwargs=kwargs or None, recorder=self.recorder)

    # Most generated POSTs are refused (a random file name, a row without 'text'), so whether a dozen scenarios
    # create something to follow depends on the replayed cases; a larger budget runs only when the first one fell
    # short. Every scenario of every run is held to the same checks.
    for scenarios in (12, 36):
        Machine.run(
            settings=settings(
                max_examples=scenarios,
                stateful_step_count=STATEFUL_STEPS,
                deadline=None,
                derandomize=os.environ.get("FUZZ_RANDOM") is None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
        )
        if len([op for op in reached if "{" in op[1]]) >= 3:
            break
    # What the links are for: operations on ids that exist were reached and answered with success. How many
    # depends on which generated creations the server accepts in the replayed cases (on some replays only the
    # model listing's link); that every link names a real operation is test_links_resolve_to_operations.
    deep = sorted(op for op in reached if "{" in op[1])
    print("stateful phase reached:", deep)
    assert deep, f"the stateful phase reached no operation on an existing resource: {sorted(reached)}"
