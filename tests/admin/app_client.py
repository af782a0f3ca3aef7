"""The console app in-process: a client on it (``appclient.AppClient``), its database, and the admin token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from sqlalchemy import Engine

from appclient import AppClient
from kamiyo.config import Settings
from kamiyo.processing.worker import Worker
from kamiyo.web.app import WEBHOOK_PATH
from support import signed

ADMIN_TOKEN = "test-admin-token-5f1c9e7a3b2d"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


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
