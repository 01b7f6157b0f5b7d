"""What of a request's headers goes to the engine, and what of the engine's answer goes back: end-to-end
headers only (RFC 9110's hop-by-hop ones are the connection's), never the client's key unless a model
forwards it, and no Content-Encoding for a body aiohttp has already decoded."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Trailers",
        "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)
# Client credentials are for the router; they are not sent to model servers.
NOT_FORWARDED = HOP_BY_HOP | {"authorization", "x-api-key"}
# aiohttp decodes a compressed request body (the router must read its JSON): it is forwarded decoded
DECODED = frozenset({"content-encoding"})
_DROPPED = NOT_FORWARDED | DECODED
_DROPPED_FORWARD_AUTH = HOP_BY_HOP | DECODED


def upstream_headers(headers: CIMultiDictProxy[str], forward_auth: bool = False) -> CIMultiDict[str]:
    """The client's end-to-end headers; its key (Authorization, x-api-key) only with ``forward_auth``."""
    dropped = _DROPPED_FORWARD_AUTH if forward_auth else _DROPPED
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in dropped:
            out.add(k, v)
    return out


def downstream_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in HOP_BY_HOP:
            out.add(k, v)
    return out
