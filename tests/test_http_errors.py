"""Every HTTP error of the API is JSON ``{"error", "detail"}``, Starlette's own 404/405 too."""

from __future__ import annotations

from typing import Any, cast

import httpx
import pytest

from meshpush.observe.metrics import Metrics
from meshpush.server.api import Api, message_id, new_message_id
from meshpush.settings import Settings


def client() -> httpx.AsyncClient:
    # 404/405 are answered by the router before any handler: the services are never used
    # (and a handler that does use them fails: the 500 test)
    unused = cast(Any, None)
    api = Api(Settings(node_id="n1", api_keys=("k",)), unused, unused, Metrics("n1"))
    transport = httpx.ASGITransport(app=api.app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://n1")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("GET", "/v1/nope", 404, "not_found"),
        ("POST", "/v1/publish/extra", 404, "not_found"),
        ("GET", "/v1/publish", 405, "method_not_allowed"),
        ("DELETE", "/v1/broadcast", 405, "method_not_allowed"),
        ("POST", "/metrics", 405, "method_not_allowed"),
        ("PUT", "/healthz", 405, "method_not_allowed"),
    ],
)
async def test_router_errors_are_json(method: str, path: str, status: int, code: str) -> None:
    async with client() as http:
        resp = await http.request(method, path)
    assert resp.status_code == status
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["error"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    if status == 405:
        assert resp.headers["allow"]


async def test_handler_errors_stay_json() -> None:
    async with client() as http:
        resp = await http.post("/v1/publish", content=b"{}")
    assert resp.status_code == 401
    assert resp.json()["error"] == "missing_api_key"


async def test_unexpected_errors_are_json_without_details() -> None:
    async with client() as http:
        resp = await http.get("/v1/route", params={"user": "alice"})  # no router: a bug
    assert resp.status_code == 500
    assert resp.json() == {"error": "internal_error", "detail": "unexpected server error"}


def test_generated_message_ids_are_unique_32_hex_characters() -> None:
    ids = {new_message_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert message_id({"data": 1}) not in ids
    assert message_id({"id": "mine", "data": 1}) == "mine"
