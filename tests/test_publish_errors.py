"""API error paths that need no cluster: an unexpected error is a JSON 500, logged, counted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from meshpush.backends.store import Outcome, Outgoing
from meshpush.observe.metrics import Metrics
from meshpush.server.api import Api
from meshpush.settings import Settings


class BrokenStore:
    async def publish_many(self, items: list[Outgoing]) -> Sequence[Outcome]:
        raise RuntimeError("a bug")


async def test_an_unexpected_error_is_a_json_500_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(node_id="n", api_keys=("k",))
    metrics = Metrics("n")
    app = Api(settings, router=None, store=BrokenStore(), metrics=metrics).app  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://n") as http:
        body: dict[str, Any] = {"user": "u", "data": 1}
        resp = await http.post("/v1/publish", json=body, headers={"authorization": "Bearer k"})
    assert resp.status_code == 500
    assert resp.json() == {"error": "internal_error", "detail": "unexpected server error"}
    assert "RuntimeError: a bug" in caplog.text
    page = metrics.render().decode()
    assert 'meshpush_api_errors_total{path="/v1/publish"} 1.0' in page
