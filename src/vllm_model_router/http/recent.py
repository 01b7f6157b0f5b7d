"""``GET /admin/history?minutes=N``: the last hour the router keeps in memory (runtime/recent.py), for the
dashboard's charts; and the fan-out that lets that record hear about every proxied request next to the
metrics (the proxy tells one observer)."""

from __future__ import annotations

from aiohttp import web

from vllm_model_router.errors import BadRequest
from vllm_model_router.http.proxy import RequestObserver
from vllm_model_router.runtime.recent import WINDOW_S, RecentHistory

RECENT: web.AppKey[RecentHistory] = web.AppKey("recent", RecentHistory)
MAX_MINUTES = int(WINDOW_S // 60)


class Observers:
    """Tells each of its observers about every request, in order."""

    def __init__(self, *observers: RequestObserver) -> None:
        self._observers = observers

    def waited(self, model: str, seconds: float) -> None:
        for o in self._observers:
            o.waited(model, seconds)

    def request_done(self, model: str, route: str, status: int, first_byte_seconds: float) -> None:
        for o in self._observers:
            o.request_done(model, route, status, first_byte_seconds)


def minutes_param(request: web.Request) -> int:
    """``?minutes=N``: a whole number from 1 to 60 (default 60), written in plain digits."""
    raw = request.query.get("minutes", str(MAX_MINUTES))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 3) or not 1 <= int(raw) <= MAX_MINUTES:
        raise BadRequest(f"'minutes' must be a whole number from 1 to {MAX_MINUTES}, got {raw[:20]!r}",
                         param="minutes")
    return int(raw)


async def admin_history(request: web.Request) -> web.Response:
    """Scrubbed like every admin view, by the record itself, with the app's scrubber (http/app.py): a mark's
    reason must be scrubbed before it is cut (a key straddling the cut would no longer match), and a walk
    through the answer's thousands of values would cost more than writing it."""
    return web.json_response(request.app[RECENT].snapshot(minutes_param(request)))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/history", admin_history)
