"""The console app in-process: an HTTPS client on it, its database, and the admin token.

The app runs with its lifespan on an event loop in a thread of its own (so the inbox writer's
thread wakes requests as under uvicorn), reached through httpx's ASGI transport. The base URL
is https because the session cookie is Secure: httpx, like a browser, keeps it off plain http.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson
from sqlalchemy import Engine
from starlette.applications import Starlette

from kamiyo.config import Settings
from kamiyo.processing.worker import Worker
from kamiyo.web.app import WEBHOOK_PATH
from support import signed

ADMIN_TOKEN = "test-admin-token-5f1c9e7a3b2d"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
T = TypeVar("T")


class AppClient:
    """A synchronous client for an ASGI app with its lifespan; cookies are kept like a browser's."""

    def __init__(self, app: Starlette, base_url: str = "https://testserver") -> None:
        self.app = app
        self._base_url = base_url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="admin-test-loop", daemon=True)
        self._lifespan: Any = None
        self._client: httpx.AsyncClient | None = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    def __enter__(self) -> AppClient:
        self._thread.start()
        self._lifespan = self.app.router.lifespan_context(self.app)
        self._call(self._lifespan.__aenter__())
        transport = httpx.ASGITransport(app=self.app)
        self._client = httpx.AsyncClient(transport=transport, base_url=self._base_url)
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._client is not None
        self._call(self._client.aclose())
        self._call(self._lifespan.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    @property
    def cookies(self) -> httpx.Cookies:
        assert self._client is not None
        return self._client.cookies

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        assert self._client is not None, "use AppClient as a context manager"
        return self._call(self._client.request(method, path, **kwargs))

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)


@dataclass
class Console:
    """An app with the console on, its database, and a client on it."""

    client: AppClient
    engine: Engine
    settings: Settings

    def deliver(self, event: dict[str, Any]) -> httpx.Response:
        body, headers = signed(event)
        response = self.client.post(WEBHOOK_PATH, content=body, headers=headers)
        assert response.status_code == 200, response.text
        return response

    def drain(self, settings: Settings | None = None) -> None:
        worker = Worker(self.engine, settings or self.settings)
        while worker.run_once():
            pass

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, headers=BEARER, **kwargs)

    def post(self, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
        return self.client.post(
            path, content=orjson.dumps(body), headers={**BEARER, "Content-Type": "application/json", **headers}
        )
