"""HEAD on every GET route: the GET's status and headers, without its body.

FastAPI routes answer only the methods they declare, so HEAD would be refused (405) wherever
a route declares GET alone; uptime checkers, load balancers and download managers probe with
it. One middleware answers it for every route, the dashboard's files and the docs included.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    """Run a HEAD request as a GET and send only its status and headers (Content-Length
    included). The GET is stopped once they are sent, so that a stream (a running job's
    events, a large result file) is not read to its end for nobody."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        with anyio.CancelScope() as answered:

            async def headers_only(message: Message) -> None:
                if message["type"] == "http.response.start":
                    await send(message)
                    await send({"type": "http.response.body", "body": b""})
                    answered.cancel()

            # A copy: the server's own scope still says HEAD, for its log and its framing.
            await self.app({**scope, "method": "GET"}, receive, headers_only)
