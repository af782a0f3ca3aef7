"""The yardstick: a raw ASGI app that reads the request body and answers 200, nothing else.

Served by exactly the server stack of ``kamiyo serve`` (uvicorn, one process, uvloop, httptools
with kamiyo's bounded protocol, no access log), so that the ratio kamiyo / bare isolates what
kamiyo itself costs per delivery: Starlette's routing, the signature check, the JSON envelope,
the durable commit and the log line. ``--protocol httptools`` serves it with uvicorn's own
protocol instead (what the bounded one costs: bench/edge_overhead.py).

    .venv/bin/python bench/bare_app.py --port 8001 [--protocol bounded|httptools]
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_BODY = b'{"received":true}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode())]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Read the whole body, answer 200 with a small JSON body (kamiyo's answer is about as small)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    chunks: list[bytes] = []
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    _body = b"".join(chunks)  # read in full, as kamiyo does, then dropped
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--protocol", choices=("bounded", "httptools"), default="bounded")
    args = parser.parse_args()
    http: Any = "httptools"
    keep_alive = 5  # uvicorn's default
    if args.protocol == "bounded":
        from kamiyo.config import Settings
        from kamiyo.web.server import HttpLimits, bounded_protocol

        defaults = Settings()
        http, keep_alive = bounded_protocol(HttpLimits.from_settings(defaults)), defaults.http_keepalive_seconds
    # The same options as kamiyo.cli.serve.serve.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        access_log=False,
        log_config=None,
        loop="uvloop",
        http=http,
        ws="none",
        timeout_keep_alive=keep_alive,
        timeout_graceful_shutdown=20,
    )


if __name__ == "__main__":
    main()
