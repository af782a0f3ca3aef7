"""The yardstick: a raw ASGI app that reads the request body and answers 200, nothing else.

Served by exactly the server stack of ``kamiyo serve`` (uvicorn, one process, uvloop, httptools,
no access log), so that the ratio kamiyo / bare isolates what kamiyo itself costs per delivery:
Starlette's routing, the signature check, the JSON envelope, the durable commit and the log line.

    .venv/bin/python bench/bare_app.py --port 8001
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
    args = parser.parse_args()
    # The same options as kamiyo.cli.commands.serve().
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        access_log=False,
        log_config=None,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=20,
    )


if __name__ == "__main__":
    main()
