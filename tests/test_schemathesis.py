"""Hostile input: schemathesis against the server's own OpenAPI schema, every operation, with and without auth.

No 5xx, and every response matches the schema (status codes, content types, bodies). Bounded example counts keep
the run short. (schemathesis' pytest fixture loader does not work with pytest 9, so operations are driven directly.)
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.fixtures.server import FakeJobManager, put_random_prefix

KEY = "sk-tenant-acme-0123456789"
ADMIN = "sk-admin-0123456789"
PUBLIC = ("/health", "/ready", "/metrics", "/version", "/tgi/health")
# Schema-valid bodies may still be refused for reasons the schema cannot express (tenant_id is optional in the
# schema because an API key implies it, but an open server needs it; a prompt over the model's context is 413).
# Everything else is checked: no 5xx, documented status codes, content types, response bodies against the schema.
EXCLUDED = [positive_data_acceptance]


def _fuzz(url: str, headers: dict[str, str], max_examples: int, extra_check=None) -> int:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 12, "the schema lost operations"
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case):
            case.headers = {**(case.headers or {}), **headers}
            resp = case.call_and_validate(timeout=30, excluded_checks=EXCLUDED)
            assert resp.status_code < 500, (
                case.method,
                case.formatted_path,
                resp.status_code,
                resp.text[:300],
            )
            if extra_check is not None:
                extra_check(case, resp)

        check()
    return len(operations)


def test_open_server_conforms(server_factory, api_bundle):
    s = server_factory(job_manager=FakeJobManager(), max_model_len=256)
    put_random_prefix(s.store, api_bundle, "acme")
    _fuzz(s.url, {}, max_examples=15)
    assert s.client().get("/health").status_code == 200  # still serving


def test_authenticated_and_anonymous_calls_conform(server_factory, api_bundle):
    s = server_factory(job_manager=FakeJobManager(), keys={"acme": KEY}, admin_key=ADMIN, max_model_len=256)
    put_random_prefix(s.store, api_bundle, "acme")
    _fuzz(s.url, {"Authorization": f"Bearer {KEY}"}, max_examples=10)

    def must_be_401(case, resp):
        if case.path not in PUBLIC:
            assert resp.status_code == 401, (case.method, case.formatted_path, resp.status_code)

    _fuzz(s.url, {}, max_examples=3, extra_check=must_be_401)
