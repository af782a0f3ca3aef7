"""A Stripe-compatible API on 127.0.0.1 for Step 4: webhook endpoints and undelivered events.

Serves ``GET /v1/webhook_endpoints`` and ``GET /v1/events`` (with ``delivery_success`` and cursor
pagination by ``starting_after``) as Stripe does, so the official ``stripe`` library is the client.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kamiyo.diagnosis.stripe_view import RUNBOOK_EVENTS


def endpoint(url: str, *, status: str = "enabled", events: tuple[str, ...] = RUNBOOK_EVENTS) -> dict[str, Any]:
    return {
        "id": f"we_{abs(hash((url, status))) % 10**8}",
        "object": "webhook_endpoint",
        "url": url,
        "status": status,
        "api_version": "2026-10-28.endive",
        "enabled_events": list(events),
        "livemode": False,
    }


@dataclass
class FakeStripe:
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    undelivered: int = 0
    requests: list[str] = field(default_factory=list)
    base: str = ""

    def _page(self, items: list[dict[str, Any]], query: dict[str, list[str]], path: str) -> dict[str, Any]:
        limit = int(query.get("limit", ["10"])[0])
        after = query.get("starting_after", [None])[0]
        start = next((i + 1 for i, item in enumerate(items) if item["id"] == after), 0)
        page = items[start : start + limit]
        return {"object": "list", "url": path, "has_more": start + limit < len(items), "data": page}

    def answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        if path == "/v1/webhook_endpoints":
            return 200, self._page(self.endpoints, query, path)
        if path == "/v1/events":
            if query.get("delivery_success") != ["false"]:
                return 400, {"error": {"type": "invalid_request_error", "message": "test server: filter expected"}}
            events = [
                {"id": f"evt_undelivered_{n:05d}", "object": "event", "type": "invoice.paid", "created": 1_800_000_000}
                for n in range(self.undelivered)
            ]
            return 200, self._page(events, query, path)
        return 404, {"error": {"type": "invalid_request_error", "message": f"no such route {path}"}}


@contextmanager
def fake_stripe(state: FakeStripe) -> Iterator[FakeStripe]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            state.requests.append(self.path)
            status, body = state.answer(parts.path, parse_qs(parts.query))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
