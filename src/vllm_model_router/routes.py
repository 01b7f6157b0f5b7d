"""Which client requests are forwarded to a model's server, and the one canonical spelling of their path.

The router forwards an **allowlist** of OpenAI-compatible inference routes, never "any POST under /v1":
vLLM serves management routes next to them (``/v1/load_lora_adapter``, ``/sleep``, ``/wake_up``,
``/collective_rpc``, ...), and those are the router's to call, never a client's.

A client's raw path is made canonical before it is matched: percent-escapes are decoded once (``%2e``
is a dot, ``%2f`` a slash), repeated slashes collapse, and dot segments are removed (RFC 3986, 5.2.4).
``/v1/../sleep``, ``/v1/%2e%2e/wake_up`` and ``/v1/..%2fwake_up`` all become paths outside the
allowlist, so they get a 404 here and never reach an engine. The upstream request goes to the path the
engine serves the matched route at (plus the query string), never to the raw path, and metrics label
the matched route, so a client cannot create label values at will.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote

# The inference routes clients call under /v1 (GET /v1/models is the router's own answer) → the path vLLM
# serves each at: vLLM serves tokenize, detokenize, pooling and classify at its root only.
INFERENCE_ROUTES: dict[str, str] = {
    "/v1/chat/completions": "/v1/chat/completions",
    "/v1/completions": "/v1/completions",
    "/v1/embeddings": "/v1/embeddings",
    "/v1/responses": "/v1/responses",
    "/v1/audio/transcriptions": "/v1/audio/transcriptions",
    "/v1/audio/translations": "/v1/audio/translations",
    "/v1/rerank": "/v1/rerank",
    "/v1/score": "/v1/score",
    "/v1/classify": "/classify",
    "/v1/pooling": "/pooling",
    "/v1/tokenize": "/tokenize",
    "/v1/detokenize": "/detokenize",
}
# Routes whose body is multipart/form-data: the ``model`` is a form field, not a JSON key.
MULTIPART_ROUTES = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
# vLLM's operator routes: never forwarded, not even when an operator lists them by mistake.
MANAGEMENT_ROUTES = frozenset({
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/sleep", "/wake_up", "/is_sleeping", "/collective_rpc",
    "/reset_prefix_cache", "/reset_mm_cache", "/start_profile", "/stop_profile", "/scale_elastic_ep",
    "/is_scaling_elastic_ep", "/pause", "/resume", "/is_paused", "/update_weights", "/init_weight_transfer",
})
# the label for any path that matched no forwarded route
OTHER = "other"


def canonical_path(raw: str) -> str | None:
    """The path of ``raw`` (a request target: path, maybe ``?query``) decoded once, with repeated slashes
    collapsed and dot segments removed; None when it does not decode (bad UTF-8, a NUL byte)."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None
    if "\x00" in decoded:
        return None
    out: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out)


def extra_route_problem(path: str) -> str | None:
    """Why ``path`` cannot be an operator's extra forwarded route, or None when it can."""
    if not path.startswith("/v1/"):
        return f"{path!r} must start with /v1/"
    if canonical_path(path) != path or "%" in path:
        return f"{path!r} must be a plain path (no query, dot segments, escapes or repeated slashes)"
    if path in MANAGEMENT_ROUTES:
        return f"{path!r} is one of vLLM's management routes, which clients may never reach"
    return None


class RouteTable:
    """The forwarded routes: vLLM's inference routes plus the operator's ``limits.extra_forward_paths``."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self._upstream = {p: p for p in extra if extra_route_problem(p) is None} | INFERENCE_ROUTES

    def match(self, raw: str) -> str | None:
        """The forwarded route ``raw`` names once made canonical, else None."""
        plain = raw.partition("?")[0]
        if plain in self._upstream:  # already canonical: the usual case, without decoding anything
            return plain
        path = canonical_path(raw)
        return path if path is not None and path in self._upstream else None

    def upstream(self, route: str) -> str:
        """The path the engine serves ``route`` at."""
        return self._upstream[route]
