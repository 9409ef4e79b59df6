"""The JSON API against its own OpenAPI description (schemathesis): every operation, with generated
parameters and bodies, as an administrator and as a radiologist. Few examples each, to stay quick."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import checks

from dicom_node.web import api
from tests.web.conftest import ADMIN, RADIOLOGIST

#: Tried apart (they end or change the session the generated requests use), in test_auth/test_account.
_SESSION_CHANGING = {("DELETE", "/api/session"), ("POST", "/api/account/password"), ("POST", "/api/session")}
#: A schema-valid request the node may still refuse (an AE title's characters, a user name's, a date's
#: form, an empty upload): the refusal must be documented and match the schema, which the others check.
_CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
           checks.response_schema_conformance]


def _logged_in(app: FastAPI, user: tuple[str, str]) -> dict[str, str]:
    client = TestClient(app)
    response = client.post("/api/session", json={"username": user[0], "password": user[1]})
    assert response.status_code == 200, response.text
    cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
    return {"Cookie": cookie, "X-CSRF-Token": response.json()["csrf_token"]}


def _operations(app: FastAPI, headers: dict[str, str]) -> list[Any]:
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", app, headers=headers)
    return [result.ok() for result in schema.get_all_operations()]


def _each_case(operation: Any, examples: int, test: Any) -> None:
    # derandomized: the same cases each run, so that CI fails for a change, not for a new draw
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        test(case)

    run()


def test_every_api_route_is_described(app: FastAPI, accounts: dict[str, int]) -> None:
    """So that the tests below reach every route of the API."""
    described = {(op.method.upper(), op.path) for op in _operations(app, _logged_in(app, ADMIN))}
    routes = [(route, "") for route in api.public_router.routes + api.router.routes]
    routes += [(route, api.router.prefix) for route in api.admin_router.routes]
    routed = {(method, prefix + route.path) for route, prefix in routes
              if isinstance(route, APIRoute) and route.include_in_schema for method in route.methods}
    assert routed == described
    assert len(described) >= 20


def test_the_api_answers_as_it_is_described_to_an_administrator(
    app: FastAPI, accounts: dict[str, int]
) -> None:
    """No 500, every status documented, every body as its schema says (errors included: their
    "detail" is a text, or a list of the invalid fields)."""
    headers = _logged_in(app, ADMIN)
    for operation in _operations(app, headers):
        if (operation.method.upper(), operation.path) not in _SESSION_CHANGING:
            _each_case(operation, 4, lambda case: case.call_and_validate(headers=headers, checks=_CHECKS))


def test_a_radiologist_is_refused_every_administration_operation(
    app: FastAPI, accounts: dict[str, int]
) -> None:
    headers = _logged_in(app, RADIOLOGIST)
    admin_only = [op for op in _operations(app, headers)
                  if op.path.startswith("/api/admin/") or op.path.endswith("/resend")]
    assert len(admin_only) >= 10

    def refused(case: Any) -> None:
        response = case.call_and_validate(headers=headers, checks=_CHECKS)
        assert response.status_code == 403, (case.method, case.formatted_path, response.text)

    for operation in admin_only:
        _each_case(operation, 2, refused)


@pytest.mark.parametrize("path", ["/api/openapi.json", "/api/dashboard", "/api/results", "/api/admin/users"])
def test_without_a_session_the_api_answers_401(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 401
    assert response.json() == {"detail": "not logged in"}
