"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis + Hypothesis).

The app is cluster/api/'s, in-process, over a real Replica with a fake engine (tests/fake_backend.py), a real
drafter registry on a real redis-server and a trainer state; the schema is ``app.openapi()``, which declares every
route's request body, answers and refusals. For every operation, positive and negative examples (derandomized:
the same examples every run) must get no 5xx, only declared status codes, content types and headers, and bodies
that match the declared schemas. Once without keys, once with keys configured (an admin key sent, and the schema's
bearer security checked: without the key, a protected operation must refuse).
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from onspec.actors.registry import DrafterRegistry
from onspec.cluster.api import create_app
from onspec.actors.config import OnspecConfig
from schemathesis import GenerationMode
from schemathesis.specs.openapi import checks as oc

from tests.fake_backend import ReplicaBackend

PREFIX = "fuzz:drafters"
API_KEY, ADMIN_KEY = "sk-fuzz-api-0123456789", "sk-fuzz-admin-0123456789"
# Examples per operation and mode: bounded so that both runs take ~30 s on a small CI machine.
EXAMPLES = {GenerationMode.POSITIVE: 15, GenerationMode.NEGATIVE: 10}
EXAMPLES_WITH_KEYS = {GenerationMode.POSITIVE: 6}
CHECKS = [schemathesis.checks.not_a_server_error, oc.status_code_conformance, oc.content_type_conformance,
          oc.response_schema_conformance, oc.response_headers_conformance, oc.negative_data_rejection]
TRAINER = {"steps": 3, "records_read": 10, "records_acked": 10, "serving_version": "base", "paused": False}


@pytest.fixture(scope="module")
def registry(module_redis_server, tmp_path_factory):
    """A real registry with no version (fuzzed versions are unknown anyway; tests/test_admin_api.py covers the
    registry's own answers): list, 404s, 409s, with Redis behind them."""
    reg = DrafterRegistry.from_url(module_redis_server.url, tmp_path_factory.mktemp("data"), PREFIX)
    yield reg
    reg.r.close()


# A body over server.max_body_bytes is rejected before it is parsed: 413 is a rejection of invalid data too.
CONFIG = {"checks": {"negative_data_rejection": {"expected-statuses": [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]}}}


def runner(op, mode, n: int, headers: dict | None, checks: list, seen: set):
    """A Hypothesis test of ``n`` derandomized examples of ``op``; the answers' status codes go to ``seen``."""
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=n, derandomize=True, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    def run(case):
        seen.add(case.call_and_validate(headers=headers, checks=checks).status_code)
    return run


def fuzz(app, headers: dict | None, extra_checks=(), examples=EXAMPLES):
    schema = schemathesis.openapi.from_dict(app.openapi(), config=schemathesis.Config.from_dict(CONFIG))
    schema.app = app
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    failures, statuses = [], {}
    for op in operations:
        for mode, n in examples.items():
            if mode is GenerationMode.NEGATIVE and not (op.body or op.query):
                continue  # nothing to make invalid (a path parameter here is any string)

            run = runner(op, mode, n, headers, CHECKS + list(extra_checks), statuses.setdefault(op.label, set()))
            try:
                run()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 -- schemathesis' FailureGroup is a BaseExceptionGroup
                failures.append(f"{op.label} ({mode.value}): {type(e).__name__}: {str(e)[:1500]}")
    assert not failures, "\n\n".join(failures)
    return statuses


def test_fuzz_without_keys(registry, tmp_path):
    cfg = OnspecConfig(data_dir=tmp_path).merged(**{"registry.prefix": PREFIX, "server.max_body_bytes": 16384,
                                                    "server.max_prompt_tokens": 24})
    app = create_app(cfg, ReplicaBackend(cfg, TRAINER), registry=registry)
    assert "securitySchemes" not in app.openapi().get("components", {})
    statuses = fuzz(app, headers=None)
    # The examples reach generation (the schema declares what the handlers accept), not only refusals.
    assert 200 in statuses["POST /v1/completions"] and 200 in statuses["POST /v1/chat/completions"], statuses


def test_fuzz_with_keys(registry, tmp_path):
    cfg = OnspecConfig(data_dir=tmp_path).merged(**{
        "registry.prefix": PREFIX, "server.max_body_bytes": 16384, "server.max_prompt_tokens": 24,
        "server.api_keys": [API_KEY], "server.admin_keys": [ADMIN_KEY]})
    app = create_app(cfg, ReplicaBackend(cfg, TRAINER), registry=registry)
    schema = app.openapi()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "security" in schema["paths"]["/v1/admin/drafters"]["get"]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    # ignored_auth: each protected operation is also sent without the key (and with a wrong one): it must refuse.
    fuzz(app, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, extra_checks=[oc.ignored_auth],
         examples=EXAMPLES_WITH_KEYS)
