"""Authentication and per-key limits (docs/security.md): which paths need which key, the keys (kept as digests,
compared in constant time), and the ASGI middleware that answers 401 / 403 / 429 before a handler runs."""
from __future__ import annotations

import hashlib
import hmac

from onspec.cluster.api.errors import error_response
from onspec.cluster.api.protocol import ENDPOINTS

# No key needed, like vLLM's /health.
OPEN_PATHS = frozenset({"/healthz", "/health", "/readyz", "/version", "/metrics", "/dashboard"})
OPEN_PREFIXES = ("/dashboard/static/",)
ADMIN_PREFIX = "/v1/admin"


def required_scope(path: str) -> str | None:
    """None (open), "api" (an API or an admin key) or "admin" (an admin key). Anything not listed as open needs
    a key: an unknown path answers 401 to a client without one, 404 to one with one."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return None
    if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
        return "admin"
    return "api"


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class Keys:
    """The configured keys, held as SHA-256 digests. A presented key is hashed and compared with every one of
    them (hmac.compare_digest over equal-length digests, no early exit): the time taken says neither which key
    nor how much of one matched."""

    def __init__(self, api_keys: list[str], admin_keys: list[str]):
        self.api = [_digest(k.encode()) for k in api_keys]
        self.admin = [_digest(k.encode()) for k in admin_keys]

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)

    def check(self, presented: bytes) -> tuple[str | None, str]:
        """(scope of the key: "admin", "api" or None for no valid key, an id for the key: a hash, not the key)."""
        d = _digest(presented)
        admin = api = False
        for k in self.admin:
            admin |= hmac.compare_digest(d, k)
        for k in self.api:
            api |= hmac.compare_digest(d, k)
        return ("admin" if admin else "api" if api else None), d.hex()[:16]


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key of ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``); None if neither is there."""
    found = {}
    for name, value in headers:
        if name in (b"authorization", b"x-api-key") and name not in found:
            found[name] = value
    if b"authorization" in found:
        scheme, _, token = found[b"authorization"].strip().partition(b" ")
        return (token.strip() or None) if scheme.lower() == b"bearer" else None
    return found.get(b"x-api-key", b"").strip() or None


class Limiter:
    """Requests in flight per key on the generation endpoints (one event loop: no lock needed)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight: dict[str, int] = {}  # key id (a hash) -> requests

    def acquire(self, key_id: str) -> bool:
        n = self.in_flight.get(key_id, 0)
        if self.limit and n >= self.limit:
            return False
        self.in_flight[key_id] = n + 1
        return True

    def release(self, key_id: str) -> None:
        n = self.in_flight.get(key_id, 0) - 1
        if n > 0:
            self.in_flight[key_id] = n
        else:
            self.in_flight.pop(key_id, None)


def _route_path(scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class AuthMiddleware:
    """Bearer keys and the per-key concurrency limit, as plain ASGI: a streaming response stays inside
    ``__call__`` until its last byte or the client's disconnect, so the slot is released exactly then."""

    def __init__(self, app, keys: Keys, limiter: Limiter, refused=None):
        self.app, self.keys, self.limiter, self.refused = app, keys, limiter, refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys.enabled:
            return await self.app(scope, receive, send)
        path = _route_path(scope)
        need = required_scope(path)
        if need is None:
            return await self.app(scope, receive, send)
        token = presented_key(scope["headers"])
        if token is None:
            return await self._refuse(scope, receive, send, path, 401, "no API key: send the header "
                                      "'Authorization: Bearer <key>'", "invalid_api_key")
        have, key_id = self.keys.check(token)
        if have is None:
            return await self._refuse(scope, receive, send, path, 401, "the API key is not valid",
                                      "invalid_api_key")
        if need == "admin" and have != "admin":
            return await self._refuse(scope, receive, send, path, 403, f"{path} needs the admin scope: an admin "
                                      "key (server.admin_keys, --admin-key-file); the key sent is an API key",
                                      "insufficient_scope", type="permission_error")
        if not (path in ENDPOINTS and scope["method"] == "POST" and self.limiter.limit):
            return await self.app(scope, receive, send)
        if not self.limiter.acquire(key_id):
            return await self._refuse(scope, receive, send, path, 429, "too many concurrent requests with this "
                                      f"key: at most {self.limiter.limit} in flight (server.max_concurrent_per_"
                                      "key); retry once one has finished", "rate_limit_exceeded",
                                      type="rate_limit_error")
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release(key_id)

    async def _refuse(self, scope, receive, send, path: str, status: int, message: str, code: str,
                      type: str = "invalid_request_error"):
        headers = {401: {"WWW-Authenticate": "Bearer"},
                   403: {"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="admin"'},
                   429: {"Retry-After": "1"}}[status]
        if self.refused is not None:
            self.refused(path, status)
        error = {"message": message, "type": type, "param": None, "code": code}
        await error_response(status, error, headers)(scope, receive, send)
