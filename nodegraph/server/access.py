"""Who may use the API: loopback Host names, same-origin pages, and an access token beyond localhost."""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
TOKEN_COOKIE = "nodegraph_token"
TOKEN_QUERY = "token"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def error_response(http_status: int, code: str, message: str, **extra: Any) -> web.Response:
    """The JSON body every API error has: a machine-readable `error` code and a `message` for people
    (`extra` fields may include one named `status`: the HTTP status is `http_status`)."""
    return web.json_response({"error": code, "message": message, **extra}, status=http_status)


def new_token() -> str:
    """A fresh access token: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def _origin_netloc(origin: str) -> str | None:
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:  # not a URL at all (an unbalanced '[', say): no origin it could match
        return None


@web.middleware
async def same_origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse browser requests from other sites: a page elsewhere must not drive a local server."""
    origin = request.headers.get("Origin")
    if origin is not None and _origin_netloc(origin) != request.host.lower():
        log.warning("refused %s %s from origin %s", request.method, request.path, origin[:100])
        return error_response(403, "forbidden_origin", f"requests from origin {origin[:100]!r} are not allowed; "
                                                       f"only pages served by {request.host} may use this API")
    return await handler(request)


# A Host header is a name or IPv4 address, or an IPv6 address in brackets, and an optional port:
# nothing else (no userinfo such as `evil.example@127.0.0.1`, no path, no spaces).
_HOST_HEADER = re.compile(r"(?P<name>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def host_name(header: str | None) -> str | None:
    """The host name of a Host header (`localhost:8188` -> `localhost`, `[::1]:80` -> `::1`), or
    None when the header is missing or is not a plain host[:port]."""
    match = _HOST_HEADER.fullmatch(header) if header else None
    return match["name"].strip("[]").lower() if match else None


@web.middleware
async def host_required(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse requests without a plain `Host: name[:port]` header: every check of where a request
    is meant for (loopback names, same origin) reads it, and HTTP/1.1 requires it."""
    if host_name(request.headers.get("Host")) is None:
        shown = request.headers.get("Host")
        log.warning("refused %s %s with Host %r", request.method, request.path, shown)
        if shown is None:
            return error_response(400, "missing_host", "the request has no Host header")
        return error_response(400, "bad_host", f"Host header {shown[:100]!r} is not a host name with an optional port")
    return await handler(request)


@web.middleware
async def loopback_host_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse Host names other than loopback ones: defeats DNS rebinding, where a foreign site's
    own name resolves to 127.0.0.1 and its pages would then pass the same-origin check."""
    hostname = host_name(request.headers.get("Host"))
    if hostname not in LOOPBACK_NAMES:
        log.warning("refused %s %s for host %s", request.method, request.path, request.host)
        return error_response(403, "forbidden_host", f"host {request.host[:100]!r} is not served; "
                              "use localhost or 127.0.0.1")
    return await handler(request)


def token_required(token: str) -> Middleware:
    """Require `token` on every request: as `Authorization: Bearer`, the cookie, or `?token=`.

    A page opened with `?token=` gets the token as an HttpOnly, same-site cookie, so the editor
    and its WebSocket carry it from then on without handling it themselves.
    """
    expected = token.encode()

    def matches(candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), expected)

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        bearer = header[len("Bearer "):] if header.startswith("Bearer ") else None
        from_query = request.query.get(TOKEN_QUERY)
        if not (matches(bearer) or matches(request.cookies.get(TOKEN_COOKIE)) or matches(from_query)):
            log.warning("refused %s %s without a valid access token", request.method, request.path)
            return error_response(401, "token_required", "this server needs its access token: open the address "
                                  "printed by `nodegraph serve` (it ends in ?token=...), or send "
                                  "'Authorization: Bearer TOKEN'")
        response = await handler(request)
        if matches(from_query) and not response.prepared:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
        return response

    return check_token
