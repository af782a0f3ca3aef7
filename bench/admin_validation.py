"""What validating an admin request through the pydantic models costs, against the hand-written
parsing it replaced: both in one process, side by side.

    .venv/bin/python bench/admin_validation.py [--base e5c73ee] [--repeat 7] [--number 300]

The old ``web/admin.py`` and ``web/admin_input.py`` are read from git at ``--base`` (the commit
before the models) and loaded beside today's modules. Two measures, each the fastest of
``--repeat`` rounds (the two sides alternate within a round), in microseconds of this process's
CPU time (all its threads: the thread pool's database calls too), which other work on a shared
machine disturbs less than the wall clock:

- ``parse``: reading one request's inputs alone (no HTTP, no database): the old handler's
  parsing statements against ``parse_query`` / ``parse_body`` through the model;
- ``request``: one whole admin request through the ASGI app (bearer check, handler, JSON,
  scrubber) on an empty SQLite file, the old routes against today's. A replay that runs is
  left out: its snapshot and apply (milliseconds) would hide what the parsing costs.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kamiyo.db.engine import make_engine  # noqa: E402
from kamiyo.db.migrate import upgrade  # noqa: E402
from kamiyo.web import admin as new_admin  # noqa: E402
from kamiyo.web import admin_input as new_input  # noqa: E402
from kamiyo.web.admin_models import DeliveriesQuery, ReplayBody, parse_body, parse_query, since_time  # noqa: E402
from support import make_settings  # noqa: E402

TOKEN = "bench-admin-token-5f1c9e7a3b2d"
DELIVERIES_QUERY = b"status=failed&type=customer.subscription.updated&customer=cus_ann&limit=50"
REPLAY_BODY = orjson.dumps(
    {"type": "customer.subscription.updated", "since": "2h", "dry_run": True, "reason": "after the fix", "limit": 50}
)
UNKNOWN_REPLAY_BODY = orjson.dumps({"event_id": "evt_1NotInTheInbox", "reason": "after the fix"})
BAD_REPLAY_BODY = orjson.dumps({"failed": True, "dry_run": True, "limit": 1001})


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", default="e5c73ee", help="the commit whose admin code is the old side (e5c73ee)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=300, help="requests per round and side (300)")
    return parser.parse_args()


def _old_modules(base: str) -> tuple[types.ModuleType, types.ModuleType]:
    """``web/admin_input.py`` and ``web/admin.py`` as they were at ``base``, loaded under other names."""

    def source(path: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{base}:{path}"], check=True, capture_output=True, text=True
        ).stdout

    def load(name: str, path: str) -> types.ModuleType:
        module = types.ModuleType(name)
        sys.modules[name] = module
        exec(compile(source(path), f"{base}:{path}", "exec"), module.__dict__)
        return module

    old_input = load("bench_old_admin_input", "src/kamiyo/web/admin_input.py")
    sys.modules["kamiyo.web.admin_input"] = old_input  # what the old admin.py imports
    try:
        old_admin = load("bench_old_admin", "src/kamiyo/web/admin.py")
    finally:
        sys.modules["kamiyo.web.admin_input"] = new_input
    return old_input, old_admin


def _request(method: str, path: str, query: bytes = b"", body: bytes = b"") -> Request:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "path_params": {},
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def _parsers(old_input: types.ModuleType, old_admin: types.ModuleType) -> dict[str, dict[str, Callable[[], Any]]]:
    """The inputs of a deliveries query and of a replay body, read the old way and through the models."""

    def old_deliveries() -> Any:  # the statements of the old _deliveries handler
        request = _request("GET", "/admin/api/deliveries", DELIVERIES_QUERY)
        status = request.query_params.get("status")
        if status is not None and status not in old_admin.MARKS:
            raise old_input.BadRequest("status")
        event_type = old_admin._matching(
            old_input.query_text(request, "type", 255), "type", old_admin.TYPE_PATTERN, "an event type"
        )
        customer = old_admin._text(request.query_params.get("customer"), "customer")
        limit = old_input.query_count(request, "limit", old_admin.DELIVERIES_DEFAULT, 1, old_admin.DELIVERIES_MAX)
        return status, event_type, customer, limit

    def new_deliveries() -> Any:
        return parse_query(DeliveriesQuery, _request("GET", "/admin/api/deliveries", DELIVERIES_QUERY).query_params)

    def old_replay() -> Any:  # the old _replay handler's checks, on the same bytes
        body = orjson.loads(REPLAY_BODY)
        if not isinstance(body, dict) or set(body) - old_admin._REPLAY_FIELDS:
            raise old_input.BadRequest("body")
        event_type = old_admin._matching(body.get("type"), "type", old_admin.TYPE_PATTERN, "an event type")
        since = old_admin._since(body.get("since"))
        failed, dry_run = body.get("failed", False), body.get("dry_run", False)
        if not isinstance(failed, bool) or not isinstance(dry_run, bool):
            raise old_input.BadRequest("failed")
        limit = body.get("limit", old_admin.REPLAY_DEFAULT)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= old_admin.REPLAY_MAX:
            raise old_input.BadRequest("limit")
        reason = body.get("reason")
        if len(reason) > old_admin.MAX_REASON or old_input._TEXT.search(reason) is None:
            raise old_input.BadRequest("reason")
        return event_type, since, failed, dry_run, limit, reason

    def new_replay() -> Any:
        body = parse_body(ReplayBody, REPLAY_BODY)
        return body, since_time(body.since)

    return {
        "deliveries query": {"old": old_deliveries, "models": new_deliveries},
        "replay body": {"old": old_replay, "models": new_replay},
    }


def _app(module: types.ModuleType, settings: Any, engine: Any) -> Starlette:
    return Starlette(routes=module.admin_routes(settings, {"engine": engine}))


async def _call(app: Starlette, method: str, path: str, query: bytes = b"", body: bytes = b"") -> int:
    status = 0
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [
            (b"host", b"bench"),
            (b"authorization", f"Bearer {TOKEN}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("bench", 443),
    }
    await app(scope, receive, send)
    return status


REQUESTS: dict[str, tuple[str, str, bytes, bytes, int]] = {
    "GET deliveries (4 filters)": ("GET", "/admin/api/deliveries", DELIVERIES_QUERY, b"", 200),
    "GET audit (since, limit)": ("GET", "/admin/api/audit", b"since=2h&limit=100", b"", 200),
    "POST replay (unknown id: 404)": ("POST", "/admin/api/replay", b"", UNKNOWN_REPLAY_BODY, 404),
    "POST replay (limit over)": ("POST", "/admin/api/replay", b"", BAD_REPLAY_BODY, 400),
}


def _best(fn: Callable[[], Any], number: int) -> float:
    start = time.process_time()
    for _ in range(number):
        fn()
    return (time.process_time() - start) / number * 1e6


async def _best_async(app: Starlette, request: tuple[str, str, bytes, bytes], number: int) -> float:
    start = time.process_time()
    for _ in range(number):
        await _call(app, *request)
    return (time.process_time() - start) / number * 1e6


def main() -> None:
    options = _options()
    old_input, old_admin = _old_modules(options.base)
    print(f"old: {options.base}; pydantic models: this checkout; fastest of {options.repeat} rounds, µs")
    parsers = _parsers(old_input, old_admin)
    for name, sides in parsers.items():
        best = {side: float("inf") for side in sides}
        for _ in range(options.repeat):
            for side, fn in sides.items():
                best[side] = min(best[side], _best(fn, options.number * 10))
        extra = best["models"] - best["old"]
        print(f"parse   {name:30} old {best['old']:7.1f}  models {best['models']:7.1f}  ({extra:+.1f})")

    with tempfile.TemporaryDirectory() as workdir:
        settings = make_settings(f"sqlite:///{Path(workdir) / 'kamiyo.db'}", admin_token=TOKEN)
        engine = make_engine(settings)
        upgrade(engine)
        apps = {"old": _app(old_admin, settings, engine), "models": _app(new_admin, settings, engine)}

        async def run() -> None:
            for name, (method, path, query, body, expected) in REQUESTS.items():
                for side, app in apps.items():
                    status = await _call(app, method, path, query, body)
                    assert status == expected, (side, name, status)
                best = {side: float("inf") for side in apps}
                for _ in range(options.repeat):
                    for side, app in apps.items():
                        took = await _best_async(app, (method, path, query, body), options.number)
                        best[side] = min(best[side], took)
                print(
                    f"request {name:30} old {best['old']:7.1f}  models {best['models']:7.1f}"
                    f"  ({best['models'] - best['old']:+.1f})"
                )

        asyncio.run(run())
        engine.dispose()


if __name__ == "__main__":
    main()
