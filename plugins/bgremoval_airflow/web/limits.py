"""Guards enforced before any route (and so before the login check) reads a request: a cap on request
bodies, and no state-changing request from another site.

FastAPI reads a body before a route's dependencies run, and Starlette spools uploads to disk
without a limit: without this, anyone could send gigabytes to an upload route. The cap answers
413 from the ``Content-Length`` header before a byte of the body is read, and stops a body sent
without one (chunked) as soon as it passes the cap.
"""

from __future__ import annotations

import json

from tasks.data.config import MAX_FIXED_MASK_BYTES
from tasks.feedback.config import MAX_MASK_BYTES

#: The largest body a page sends: a correction's mask as base64 in JSON, or a mask file with its
#: multipart framing; a megabyte of headroom for the form's other fields.
MAX_BODY_BYTES = max(4 * MAX_MASK_BYTES // 3, MAX_FIXED_MASK_BYTES) + 2**20


class BodyTooLarge(Exception):
    """Raised inside the app when a streamed body passes the cap."""


class BodySizeLimit:
    """ASGI middleware: 413 for any HTTP request whose body is larger than ``max_bytes``."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _answer(send, 400, "invalid Content-Length")
                return
            if length > self.max_bytes:
                await _answer(send, 413, self._too_large())
                return
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _answer(send, 413, self._too_large())

    def _too_large(self) -> str:
        return f"request body larger than {self.max_bytes / 2**20:.0f} MiB"


#: Methods that change state: refused when a browser says another site sent them.
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class CrossSiteRefusal:
    """ASGI middleware: 403 for a state-changing request that a browser sent from another origin.

    The pages log in with Airflow's cookie, and a plain HTML form (``multipart/form-data``) from any
    page of the same site (another port or subdomain) would be sent with it, without a preflight.
    Browsers say where a request comes from: ``Sec-Fetch-Site`` (``same-origin`` for the pages' own
    ``fetch`` calls, ``none`` when typed by the user) or, from older ones, ``Origin``. A request with
    neither (a script, ``curl``) carries no browser cookie it did not set itself and passes.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in _WRITES:
            headers = dict(scope.get("headers") or [])
            site = headers.get(b"sec-fetch-site")
            origin = headers.get(b"origin")
            if site is not None and site not in (b"same-origin", b"none"):
                await _answer(send, 403, f"refused: a {site.decode(errors='replace')} request may not change anything")
                return
            hosts = {headers.get(b"host"), headers.get(b"x-forwarded-host")}  # behind a proxy: the name it was called by
            if site is None and origin is not None and origin.split(b"://", 1)[-1] not in hosts:
                await _answer(send, 403, "refused: a request from another origin may not change anything")
                return
        await self.app(scope, receive, send)


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
