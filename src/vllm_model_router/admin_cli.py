"""Command-line client for a running router: ``status``, ``load``, ``unload``, ``logs``, ``pin``, ``unpin``,
``scale``, ``history``.

It talks to the admin API (``--url``, env ROUTER_URL, default http://localhost:8010) with the standard
library only. An optional key (``--api-key``, env ROUTER_API_KEY) is sent as ``Authorization: Bearer``.
Exit status: 0 on success, 1 when the router cannot be reached or answers an error (its message is
printed as is), 2 on a usage error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, tzinfo
from typing import Any, TextIO

DEFAULT_URL = "http://localhost:8010"
CONNECT_TIMEOUT = 10.0
HISTORY_MINUTES = 60  # what GET /admin/history keeps
WIDTH = 100  # a history line is wrapped (states) or cut (a mark's reason: a failed start quotes its log) here


class CliError(Exception):
    """Printed on stderr as it is; exit status 1."""


class Client:
    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key or None

    def _open(self, method: str, path: str, timeout: float | None) -> Any:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, method=method, headers=headers,
                                     data=b"" if method == "POST" else None)
        try:
            return urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise CliError(_error_message(e)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise CliError(f"cannot reach the router at {self.url}: {reason}") from None

    def json(self, method: str, path: str, timeout: float | None = CONNECT_TIMEOUT) -> Any:
        with self._open(method, path, timeout) as resp:
            try:
                return json.load(resp)
            except ValueError as e:
                raise CliError(f"the router at {self.url} answered something that is not JSON: {e}") from None

    def lines(self, path: str) -> Iterator[str]:
        """A streamed text answer, line by line, as it arrives."""
        resp = self._open("GET", path, None)
        with resp:
            while True:
                try:
                    raw = resp.readline()
                except (OSError, ValueError) as e:
                    raise CliError(f"lost the connection to the router at {self.url}: {e}") from None
                if not raw:
                    return
                yield raw.decode("utf-8", "replace").rstrip("\n")


def _error_message(e: urllib.error.HTTPError) -> str:
    """The OpenAI envelope's message, plainly; else the status line."""
    try:
        body = json.loads(e.read())
        message = body["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError, OSError):
        pass
    return f"the router answered {e.code} {e.reason}"


def _path(name: str, action: str) -> str:
    return f"/admin/models/{urllib.parse.quote(name, safe='')}/{action}"


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    s = max(0.0, now - ts)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    if s < 86400:
        return f"{s / 3600:.1f}h ago"
    return f"{s / 86400:.1f}d ago"


def _gb(x: float | None) -> str:
    return "-" if not x else f"{x:g} GB"


def _process(r: dict[str, Any]) -> str:
    """A replica's server: ``pid 123  port 8001  gpus 0,1``."""
    parts = [f"{k} {r[k]}" for k in ("pid", "port") if r.get(k) is not None]
    if r.get("gpus"):
        parts.append("gpus " + ",".join(str(g) for g in r["gpus"]))
    return "  ".join(parts)


def _state(m: dict[str, Any], flags: tuple[str, ...]) -> str:
    state = str(m.get("state", "?"))
    shown = [f for f in flags if m.get(f)]
    return state + (f" ({', '.join(shown)})" if shown else "")


def _table(rows: Sequence[Sequence[str]], right: set[int] | None = None) -> list[str]:
    """Columns two spaces apart, as wide as their widest cell; the columns in ``right`` right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in (right or ()) else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]


def status_table(data: dict[str, Any], now: float | None = None) -> str:
    """One row per model; a replicated model's replicas each on a row of their own, indented under it, with
    their server (the PROCESS column, shown only when some model has replicas)."""
    now = time.time() if now is None else now
    header: tuple[str, ...] = ("MODEL", "STATE", "MEMORY", "IN FLIGHT", "WAITING", "LAST USED")
    models = data.get("models", [])
    replicated = any(m.get("replicas") for m in models)
    if replicated:
        header = (*header, "PROCESS")
    rows = [header]
    for m in models:
        row: tuple[str, ...] = (str(m.get("name")), _state(m, ("pinned", "draining")), _gb(m.get("memory_gb")),
                                str(m.get("in_flight", 0)), str(m.get("waiting", 0)), _ago(m.get("last_used"), now))
        rows.append((*row, "") if replicated else row)
        for r in m.get("replicas") or ():
            rows.append((f"  {r.get('name')}", _state(r, ("pinned", "extra")), "", str(r.get("in_flight", 0)), "",
                         _ago(r.get("last_used"), now), _process(r)))
    lines = _table(rows, right={2, 3, 4})
    cap = data.get("capacity", {})
    summary = f"resident: {len(cap.get('resident', []))}/{cap.get('max_resident', '?')}"
    if cap.get("memory_gb") is not None:
        summary += f"   memory: {cap.get('resident_memory_gb', 0):g}/{cap['memory_gb']:g} GB"
    return "\n".join([*lines, "", summary])


def _describe(m: dict[str, Any]) -> str:
    details = [f"{k} {m[k]}" for k in ("pid", "port") if m.get(k) is not None]
    if m.get("pinned"):
        details.append("pinned")
    return f"{m.get('name')}: {m.get('state')}" + (f" ({', '.join(details)})" if details else "")


# ------------------------------------------------------------------- history
def _minutes(text: str) -> int:
    """``--minutes``, checked before asking: a typo is a usage error (exit 2), not a round trip."""
    if not (text.isascii() and text.isdigit() and len(text) <= 3 and 1 <= int(text) <= HISTORY_MINUTES):
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {HISTORY_MINUTES}, got {text[:20]!r}")
    return int(text)


def history_of(data: dict[str, Any], model: str) -> dict[str, Any]:
    """The history restricted to ``model`` (its replicas' lanes, its marks, its requests), in the same shape;
    the waiting total stays the router's. A name the history does not know is an error, naming those it does."""
    known = {str(la.get("model")) for la in data.get("lanes", [])} | set(data.get("models", {}))
    if model not in known:
        raise CliError(f"no model `{model}` in the router's history (it has: {', '.join(sorted(known)) or 'none'})")
    return {**data, "lanes": [la for la in data.get("lanes", []) if la.get("model") == model],
            "marks": [m for m in data.get("marks", []) if m.get("model") == model],
            "models": {k: v for k, v in data.get("models", {}).items() if k == model}}


def _seconds(x: float | None) -> str:
    """A wait or a time to first byte: milliseconds under a second, seconds above."""
    if x is None:
        return "-"
    if x < 1:
        return f"{x * 1000:.0f}ms"
    return f"{x:.2f}s" if x < 10 else f"{x:.1f}s" if x < 100 else f"{x:.0f}s"


def _changes(spans: list[dict[str, Any]], clock: Callable[[float], str]) -> list[str]:
    """A unit's states as ``HH:MM:SS state`` at each change. The history leaves ``unloaded`` out (a gap is a
    unit that was not running): a span that ends with no other starting then is shown ending in ``unloaded``."""
    changes = []
    for i, span in enumerate(spans):
        changes.append(f"{clock(span['start'])} {span['state']}")
        end = span.get("end")
        if end is not None and (i + 1 == len(spans) or spans[i + 1]["start"] != end):
            changes.append(f"{clock(end)} unloaded")
    return changes or ["unloaded"]


def _wrap(head: str, items: list[str]) -> list[str]:
    """``head`` then ``items`` two spaces apart, wrapped at WIDTH, each line continued under the first item."""
    lines, line = [], head
    for item in items:
        if len(line) > len(head) and len(line) + 2 + len(item) > WIDTH:
            lines.append(line)
            line = " " * len(head) + item
        else:
            line += ("  " if len(line) > len(head) else "") + item
    return [*lines, line]


def _cut(line: str) -> str:
    return line if len(line) <= WIDTH else line[:WIDTH - 1] + "…"


def _lane_lines(lanes: list[dict[str, Any]], clock: Callable[[float], str]) -> list[str]:
    width = max([len("UNIT"), *(len(str(la.get("unit"))) for la in lanes)])
    lines = [f"{'UNIT'.ljust(width)}  STATES"]
    for la in lanes:
        lines += _wrap(str(la.get("unit")).ljust(width + 2), _changes(la.get("spans") or [], clock))
    return lines


def _mark_lines(marks: list[dict[str, Any]], clock: Callable[[float], str]) -> list[str]:
    if not marks:
        return ["no loads, swaps, failures, sleeps, wakes or node changes"]
    rows = [("TIME", "MARK", "UNIT", "EVENT", "REASON")]
    for m in marks:
        event = m.get("event") or {}
        rows.append((clock(m["time"]), str(m.get("kind")), str(m.get("unit") or "-"), str(event.get("kind")),
                     " ".join(str(event.get("reason") or "").split())))  # a log excerpt's lines on one
    return [_cut(line) for line in _table(rows)]


def _request_lines(models: dict[str, list[dict[str, Any]]], clock: Callable[[float], str]) -> list[str]:
    """One row per model and minute with requests; the model named on its first row only."""
    rows: list[tuple[str, ...]] = [("MODEL", "MINUTE", "REQUESTS", "ERRORS", "WAIT P50", "WAIT P99",
                                    "FIRST BYTE P50", "FIRST BYTE P99")]
    for model, buckets in models.items():
        for i, b in enumerate(buckets):
            figures = (_seconds(b.get(f"{what}_{q}")) for what in ("wait", "first_byte") for q in ("p50", "p99"))
            rows.append((model if i == 0 else "", clock(b["start"])[:5], str(b.get("requests", 0)),
                         str(b.get("errors", 0)), *figures))
    return _table(rows, right=set(range(2, 8))) if len(rows) > 1 else ["no requests"]


def history_text(data: dict[str, Any], tz: tzinfo | None = None) -> str:
    """``GET /admin/history`` for a terminal: each unit's state changes, the marks (one line each, the
    reason cut at WIDTH), per model and minute the requests, errors and quantiles, and the waiting total.
    Clock times in ``tz`` (default: local); the window is at most an hour, its date is in the first line."""
    def clock(ts: float) -> str:
        return datetime.fromtimestamp(ts, tz).strftime("%H:%M:%S")

    since, now = float(data.get("since") or 0), float(data.get("now") or time.time())
    minutes = data.get("minutes")
    out = [f"last {minutes} minute{'' if minutes == 1 else 's'}: {datetime.fromtimestamp(since, tz):%Y-%m-%d %H:%M:%S} "
           f"to {clock(now)}", "", *_lane_lines(data.get("lanes", []), clock),
           "", *_mark_lines(data.get("marks", []), clock), "", *_request_lines(data.get("models", {}), clock)]
    queue = data.get("queue") or []
    if queue:
        peak_at, peak = max(queue, key=lambda sample: sample[1])  # the first time it was highest
        out += ["", f"waiting in total: peak {peak}{f' at {clock(peak_at)}' if peak else ''}, last {queue[-1][1]}"]
    return "\n".join(out)


# ------------------------------------------------------------------- commands
def cmd_status(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    data = client.json("GET", "/admin/models")
    print(json.dumps(data, indent=2) if args.json else status_table(data), file=out)
    return 0


def cmd_load(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    # a load can take minutes (a big model): no read timeout
    print(_describe(client.json("POST", _path(args.name, "load"), timeout=None)), file=out)
    return 0


def cmd_unload(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    path = _path(args.name, "unload") + ("?force=true" if args.force else "")
    print(_describe(client.json("POST", path, timeout=None)), file=out)
    return 0


def cmd_pin(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    print(_describe(client.json("POST", _path(args.name, args.action))), file=out)
    return 0


def cmd_scale(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    m = client.json("POST", _path(args.name, "scale") + f"?replicas={args.replicas}")
    print(f"{m.get('name')}: keeping {args.replicas} replicas", file=out)
    for r in m.get("replicas") or ():
        print(f"  {_describe(r)}", file=out)
    return 0


def cmd_logs(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    path = _path(args.name, "logs") + f"?lines={args.lines}"
    if not args.follow:
        for line in client.json("GET", path).get("lines", []):
            print(line, file=out)
        return 0
    for line in client.lines(path + "&follow=true"):
        print(line, file=out, flush=True)
    print("the router closed the log stream", file=sys.stderr)
    return 1


def cmd_history(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    data = client.json("GET", f"/admin/history?minutes={args.minutes}")
    if args.model is not None:
        data = history_of(data, args.model)
    print(json.dumps(data, indent=2) if args.json else history_text(data), file=out)
    return 0


def run(args: argparse.Namespace) -> int:
    client = Client(args.url, args.api_key)
    try:
        rc: int = args.admin_func(client, args, sys.stdout)
        return rc
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`
        return 0


def register_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client commands to the main parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("ROUTER_URL") or DEFAULT_URL,
                        help=f"the router's base URL (env ROUTER_URL; default {DEFAULT_URL})")
    common.add_argument("--api-key", default=os.environ.get("ROUTER_API_KEY"),
                        help="sent as 'Authorization: Bearer KEY' (env ROUTER_API_KEY)")

    def add(name: str, func: Any, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(func=run, admin_func=func)
        return p

    s = add("status", cmd_status, "show every model of a running router: state, memory, load, last use")
    s.add_argument("--json", action="store_true", help="print the admin API's JSON instead of a table")
    add("load", cmd_load, "load a model and wait until it is ready").add_argument("name")
    u = add("unload", cmd_unload, "unload a model once its in-flight requests finish")
    u.add_argument("name")
    u.add_argument("--force", action="store_true", help="stop it at once, failing requests in flight")
    lg = add("logs", cmd_logs, "print the last lines a model's server printed")
    lg.add_argument("name")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines as they come")
    lg.add_argument("-n", "--lines", type=int, default=100, help="how many of the last lines (default 100)")
    sc = add("scale", cmd_scale, "set how many replicas of a model are kept (within its replicas.min and max)")
    sc.add_argument("name")
    sc.add_argument("replicas", type=int)
    h = add("history", cmd_history, "show the router's last hour: each unit's states, the swaps and failures, "
                                    "the requests per model and minute, the requests waiting")
    h.add_argument("--minutes", type=_minutes, default=HISTORY_MINUTES,
                   help=f"how far back, 1 to {HISTORY_MINUTES} (default {HISTORY_MINUTES})")
    h.add_argument("--model", help="only this model: its units, marks and requests")
    h.add_argument("--json", action="store_true", help="print the admin API's JSON instead of tables")
    for action, text in (("pin", "pin a model: it is never evicted"), ("unpin", "unpin a model")):
        p = add(action, cmd_pin, text)
        p.add_argument("name")
        p.set_defaults(action=action)
