"""Access control: Bearer keys for the OpenAI API, admin keys for operating the router.

- ``/health``, the dashboard page and its assets (``/ui``) and ``/openapi.json`` are always open.
- ``/v1/*`` (and any other route): open unless ``auth.api_keys`` is set; then a client key or an admin key.
- ``/admin/*``: with ``auth.admin_keys`` set, an admin key (a client key gets 403); with only
  ``api_keys`` set, any valid key; with no keys at all, open.
- ``/metrics``: an admin key when ``auth.admin_keys`` is set, else open (for Prometheus).

A key is read from ``Authorization: Bearer KEY`` or ``x-api-key: KEY``. A browser's ``EventSource``
cannot send headers, so the two read-only admin streams the dashboard opens (``GET /admin/events`` and
``GET /admin/models/{name}/logs``) also take ``?key=KEY``; nowhere else is a key read from the URL.

Every presented key is compared with every configured key with ``hmac.compare_digest`` (no early exit),
so timing says nothing about which key, or which prefix, matched. Keys are never logged:
:class:`RedactKeys` scrubs them from every log record, and malformed requests (which aiohttp would log
with their raw header bytes) are logged without their content by server.py.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from enum import Enum
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware

from vllm_model_router.config import AuthConfig
from vllm_model_router.errors import Forbidden, Unauthorized

log = logging.getLogger("vllm_model_router.security")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/ui", "/ui/"})
# read-only streams a browser EventSource opens: the only routes that take the key as ?key=
QUERY_KEY_ROUTES = (re.compile(r"^/admin/events$"), re.compile(r"^/admin/models/[^/]+/logs$"))
WWW_AUTHENTICATE = 'Bearer realm="vllm-model-router"'


class Role(Enum):
    NONE = 0
    CLIENT = 1
    ADMIN = 2


def _encode(keys: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(k.encode("utf-8") for k in keys)


def _matches(candidate: bytes, keys: tuple[bytes, ...]) -> bool:
    """Constant-time membership: every configured key is compared, whatever matched before."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key)
    return found


class KeyChecker:
    def __init__(self, auth: AuthConfig) -> None:
        self.api = _encode(auth.api_keys)
        self.admin = _encode(auth.admin_keys)

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)

    def role(self, key: str | None) -> Role:
        if key is None:
            return Role.NONE
        candidate = key.encode("utf-8", "surrogateescape")
        is_admin = _matches(candidate, self.admin)
        is_client = _matches(candidate, self.api)  # both lists are always compared
        return Role.ADMIN if is_admin else Role.CLIENT if is_client else Role.NONE


def presented_key(request: web.Request) -> str | None:
    """The key the client sent: ``Authorization: Bearer``, else ``x-api-key``, else (on the two
    EventSource routes, GET only) ``?key=``."""
    auth = request.headers.get("Authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = request.headers.get("x-api-key")
    if api_key is not None:
        return api_key.strip()
    if auth is not None:
        return ""  # credentials of another kind (Basic, say): not a key
    if request.method == "GET" and any(r.match(request.path) for r in QUERY_KEY_ROUTES):
        return request.query.get("key")
    return None


def _unauthorized(message: str) -> Unauthorized:
    return Unauthorized(message, code="invalid_api_key", headers={"WWW-Authenticate": WWW_AUTHENTICATE})


def auth_middleware(auth: AuthConfig) -> Middleware:
    checker = KeyChecker(auth)
    admin_only = bool(checker.admin)  # with admin keys, a client key is not enough on admin routes

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in OPEN_PATHS or path.startswith("/ui/"):
            return await handler(request)
        if path == "/metrics":
            needs = Role.ADMIN if admin_only else Role.NONE
        elif path == "/admin" or path.startswith("/admin/"):
            needs = Role.ADMIN if admin_only else Role.CLIENT if checker.api else Role.NONE
        else:
            needs = Role.CLIENT if checker.api else Role.NONE
        if needs is Role.NONE:
            return await handler(request)
        key = presented_key(request)
        if key is None:
            raise _unauthorized("Missing API key: send it as 'Authorization: Bearer KEY'.")
        role = checker.role(key)
        if role is Role.NONE:
            raise _unauthorized("Invalid API key.")
        if needs is Role.ADMIN and role is not Role.ADMIN:
            raise Forbidden(f"{request.method} {path} needs an admin key.", code="admin_key_required")
        return await handler(request)

    return check


def install_auth(app: web.Application, auth: AuthConfig) -> None:
    """Add the key check to ``app`` (inside the OpenAI-error middleware, so refusals use its envelope);
    without any key configured, nothing (every route is open)."""
    if not auth.enabled:
        return
    if auth.api_keys and not auth.admin_keys:
        log.warning("auth: api_keys are set but no admin_keys: every API key may use the admin API, and "
                    "/metrics is open; set auth.admin_keys to separate operators from clients")
    app.middlewares.append(auth_middleware(auth))


class KeyScrubber:
    """Replaces every configured key by ``***`` in what leaves the router: error messages, the admin
    API's views, model logs and lifecycle events (a model's output may print a key, and a failed load
    quotes that output to the client that waited for it), and the router's own log."""

    def __init__(self, keys: Iterable[str]) -> None:
        ordered = sorted({k for k in keys if k}, key=len, reverse=True)  # a key inside a longer one: longer first
        self._pattern = re.compile("|".join(re.escape(k) for k in ordered)) if ordered else None

    def text(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub("***", text)

    def value(self, value: T) -> T:
        """``value`` with every string in it scrubbed (dicts and lists are copied, not changed)."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self._pattern.sub("***", value)  # type: ignore[return-value]
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}  # type: ignore[return-value]
        if isinstance(value, list | tuple):
            return type(value)(self.value(v) for v in value)
        return value


def scrubber(auth: AuthConfig) -> KeyScrubber:
    return KeyScrubber([*auth.api_keys, *auth.admin_keys])


class RedactKeys(logging.Filter):
    """Replace every configured key in a log record (message, arguments, exception text) by ``***``."""

    def __init__(self, keys: Iterable[str]) -> None:
        super().__init__()
        self._scrub = KeyScrubber(keys)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = self._scrub.text(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        text = record.exc_text or (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        scrubbed = self._scrub.text(text)
        if scrubbed != text:  # the traceback goes into the message, scrubbed
            record.msg, record.args = f"{record.getMessage()}\n{scrubbed}", None
            record.exc_info, record.exc_text = None, None
        return True


def install_redaction(auth: AuthConfig) -> None:
    """Scrub the configured keys from everything the root logger's handlers write."""
    if not auth.enabled:
        return
    redact = RedactKeys([*auth.api_keys, *auth.admin_keys])
    for handler in logging.getLogger().handlers:
        handler.addFilter(redact)
