"""An ASGI app with its lifespan, driven synchronously from a test (what Starlette's TestClient did).

The app runs on an event loop in a thread of its own, so the inbox writer's thread wakes the
requests exactly as under uvicorn; every call waits for its answer. The base URL is https by
default because the console's session cookie is Secure: httpx, like a browser, keeps it off
plain http.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
from starlette.applications import Starlette

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
