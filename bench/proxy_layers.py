# Longer than 400 lines because each variant is a whole relay, kept side by side in one file to be compared.
"""What each HTTP layer costs: bare pass-through proxies, without any of the router's logic, next to the
router, against the same fake engine, in one run.

    python bench/proxy_layers.py [--rounds 3] [--requests 2000] [--seconds 4] [--variants server,httptools ...]

Each variant is a process that forwards ``POST /v1/chat/completions`` to the engine and relays the
answer (whole when it has a Content-Length, else chunk by chunk), measured like bench/proxy_bench.py:
its CPU time per 1,000 plain requests (concurrency 1), per 1,000 20-chunk streams (concurrency 64), and
per paced chunk, each also split into user and system time. The variants:

  app        aiohttp ``web.Application`` (router, middlewares) + ``aiohttp.ClientSession``: the simplest
             aiohttp pass-through, the router's own stack without the router;
  server     aiohttp's low-level ``web.Server`` (no application, no dispatch) + ``ClientSession``;
  httptools  ``web.Server`` + a minimal upstream client on an asyncio protocol, the response parsed by
             httptools (llhttp, the parser uvicorn uses); needs ``pip install httptools``. A measuring
             device for what aiohttp's client costs, not a product: no timeouts, no error mapping.
  pyreqwest  ``web.Server`` + pyreqwest (a Rust client: reqwest and hyper on a tokio runtime of its own);
             needs ``pip install pyreqwest``.
  granian    Granian's RSGI server (a Rust server: hyper on a tokio runtime in a thread of its own, the
             handler scheduled on the event loop) + ``ClientSession``: what a faster server would give;
             needs ``pip install granian``. Granian's embeddable server, one worker, on this process's
             uvloop: one process to measure (``granian --interface rsgi`` runs the same Rust worker in
             a child process, at the same cost).
  granian-httptools  Granian's RSGI server + the httptools client above: both HTTP layers replaced;
             needs ``pip install granian httptools``.
  aiohttp-tuned  ``web.Server`` + ``ClientSession`` at its cheapest for a proxy: no total timeout (a
             connect timeout only, as the router has), no cookie jar, no decompression, no automatic
             User-Agent/Accept/Accept-Encoding, the URL parsed once, no redirects, ``readany`` for chunks.
  blacksheep ``web.Server`` + BlackSheep's ``ClientSession`` (2.6: h11, a pure-Python parser; the body
             read by a task of its own into a buffer that ``stream()`` empties); needs
             ``pip install blacksheep``.
  aiosonic   ``web.Server`` + aiosonic's ``HTTPClient`` (a pure-Python parser on asyncio streams; the
             body by ``read_chunks``, one HTTP chunk each); needs ``pip install aiosonic``.
  raw        the floor of a relay in Python: no HTTP framework, an asyncio ``Protocol`` on uvloop, requests
             parsed by httptools' ``HttpRequestParser``, forwarded by the httptools client above (its
             keep-alive pool), answers relayed whole when they have a Content-Length, else each chunk
             written to the client, re-framed as chunked, from the parser's callback as it arrives (the
             engine's connection paused while the client's write buffer is over its high-water mark);
             clients kept alive. A measuring device, not a product: no timeouts, no error mapping (an
             engine that is down leaves the request hanging), POST-like requests only (no HEAD, no
             ``Expect: 100-continue``, no upgrades); needs ``pip install httptools``.
  nginx      nginx as a native reverse proxy, the cost of the bytes themselves: one worker process,
             ``proxy_pass`` to an ``upstream`` with ``keepalive 64``, HTTP/1.1 to the engine, no buffering
             either way, no access log; its CPU is the master's and the worker's. Needs an ``nginx`` binary
             (``apt-get install nginx-light``); its config and logs go to a temporary directory.
  router     the router itself (this tree).
aiohttp-tuned, blacksheep, aiosonic, raw and nginx run only when ``--variants`` names them. Before
measuring, each variant's answers are checked against the engine's (the same status, Content-Type and
body but for ids and timestamps; a stream's events one for one) and a paced stream must come chunk by
chunk; the load itself checks only statuses and, through aiohttp's parser, the framing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench as bench

HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade", "te",
                 "trailer", "proxy-authorization", "proxy-authenticate"})
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
CONNECT_S = 5.0  # the connect timeout of the clients that are configured as the router configures its own


# ----------------------------------------------------------------------------- the variants (served)
def _down(headers: Any) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP]


async def relay_aiohttp(session: aiohttp.ClientSession, upstream: str, request: web.BaseRequest) -> web.StreamResponse:
    body = await request.read()
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
    async with session.request(request.method, upstream, data=body, headers=headers) as up:
        if up.headers.get("Content-Length") is not None:
            return web.Response(status=up.status, body=await up.read(), headers=_down(up.headers))
        resp = web.StreamResponse(status=up.status, headers=_down(up.headers))
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to the engine; httptools parses the answers."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.head: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] | None = None
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.headers: list[tuple[bytes, bytes]] = []
        self.reusable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.chunks.put_nowait(None)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.head is not None
        self.head.set_result((self.parser.get_status_code(), self.headers))

    def on_body(self, body: bytes) -> None:
        self.chunks.put_nowait(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        self.chunks.put_nowait(None)


class LeanClient:
    protocol: type[_Upstream] = _Upstream

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Upstream] = []

    async def exchange(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> _Upstream:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers]
        return await self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body)

    async def send(self, head: bytes, body: bytes) -> _Upstream:
        """Write a framed request on an idle connection (one the engine closed is dropped) or a new one;
        the connection once the answer's head is in."""
        conn = None
        while self.idle and conn is None:
            conn = self.idle.pop()
            if not conn.reusable or conn.transport is None or conn.transport.is_closing():
                conn = None
        if conn is None:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(self.protocol, self.host, self.port)
        else:
            conn.parser = type(conn.parser)(conn)
            conn.headers = []
        conn.head = asyncio.get_running_loop().create_future()
        assert conn.transport is not None
        conn.transport.write(head + body)
        await conn.head
        return conn

    def done(self, conn: _Upstream) -> None:
        if conn.reusable:
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()


def lean_head(conn: _Upstream) -> tuple[int, list[tuple[str, str]], bool]:
    """The engine's status, the headers to pass on, and whether the answer has a Content-Length."""
    assert conn.head is not None
    status, raw = conn.head.result()
    down = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if k.decode("latin-1").lower() not in HOP]
    return status, down, any(k.lower() == b"content-length" for k, _ in raw)


async def lean_whole(client: LeanClient, conn: _Upstream) -> bytes:
    parts = []
    while (chunk := await conn.chunks.get()) is not None:
        parts.append(chunk)
    client.done(conn)
    return b"".join(parts)


async def relay_lean(client: LeanClient, path: str, request: web.BaseRequest) -> web.StreamResponse:
    body = await request.read()
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
    conn = await client.exchange(request.method, path, headers, body)
    status, down, whole = lean_head(conn)
    if whole:
        return web.Response(status=status, body=await lean_whole(client, conn), headers=down)
    resp = web.StreamResponse(status=status, headers=down)
    await resp.prepare(request)
    while (chunk := await conn.chunks.get()) is not None:
        await resp.write(chunk)
    client.done(conn)
    await resp.write_eof()
    return resp


async def relay_reqwest(client: Any, upstream: str, request: web.BaseRequest) -> web.StreamResponse:
    body = await request.read()
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
    async with client.request(request.method, upstream).headers(headers).body_bytes(body).build_streamed() as up:
        down = [(k, v) for k, v in up.headers.items() if k.lower() not in HOP]
        reader = up.body_reader  # a property
        if up.get_header("content-length") is not None:
            return web.Response(status=up.status, body=bytes(await reader.bytes()), headers=down)
        resp = web.StreamResponse(status=up.status, headers=down)
        await resp.prepare(request)
        while (chunk := await reader.read_chunk()) is not None:
            await resp.write(bytes(chunk))
        await resp.write_eof()
        return resp


async def relay_tuned(session: aiohttp.ClientSession, upstream: Any, request: web.BaseRequest) -> web.StreamResponse:
    """aiohttp's client at its cheapest: the URL parsed once, no redirects, no context manager; the
    stream read by ``readany`` (what ``iter_any`` calls, without the iterator)."""
    body = await request.read()
    headers = CIMultiDict([(k, v) for k, v in request.headers.items() if k.lower() not in HOP])
    up = await session.request(request.method, upstream, data=body, headers=headers, allow_redirects=False)
    try:
        if up.headers.get("Content-Length") is not None:
            return web.Response(status=up.status, body=await up.read(), headers=_down(up.headers))
        resp = web.StreamResponse(status=up.status, headers=_down(up.headers))
        await resp.prepare(request)
        while chunk := await up.content.readany():
            await resp.write(chunk)
        await resp.write_eof()
        return resp
    finally:
        up.release()


async def _relay_chunks(request: web.BaseRequest, status: int, headers: list[tuple[str, str]],
                        chunks: Any) -> web.StreamResponse:
    """A streamed answer, each chunk written as a library's client hands it over."""
    resp = web.StreamResponse(status=status, headers=headers)
    await resp.prepare(request)
    async for chunk in chunks:
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def relay_blacksheep(client: Any, upstream: bytes, request: web.BaseRequest) -> web.StreamResponse:
    """BlackSheep's client takes bytes headers; it writes Content-Type from the content, not the headers."""
    from blacksheep import Content, Request

    body = await request.read()
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()
               if k.lower() not in HOP and k.lower() != "content-type"]
    req = Request(request.method, upstream, headers)
    req.content = Content(request.headers.get("Content-Type", "application/octet-stream").encode("latin-1"), body)
    up = await client.send(req)
    down = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in up.headers if k.decode("latin-1").lower() not in HOP]
    if up.get_first_header(b"content-length") is not None:
        return web.Response(status=up.status, body=await up.read() or b"", headers=down)
    return await _relay_chunks(request, up.status, down, up.stream())


async def relay_aiosonic(client: Any, upstream: str, request: web.BaseRequest) -> web.StreamResponse:
    """aiosonic's client, ``stream=True``: the body is read by ``read_chunks`` (one HTTP chunk each);
    the response's ``raw_headers`` (its ``headers`` is a dict: repeated names would collapse)."""
    body = await request.read()
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
    up = await client.request(upstream, request.method, headers=headers, data=body, stream=True)
    try:
        down = [(k, v) for k, v in up.raw_headers if k.lower() not in HOP]
        if up.headers.get("content-length") is not None:
            return web.Response(status=up.status_code, body=await up.content(), headers=down)
        return await _relay_chunks(request, up.status_code, down, up.read_chunks())
    finally:
        await up.aclose()


async def relay_granian(session: aiohttp.ClientSession, upstream: str, scope: Any, proto: Any) -> None:
    """RSGI: the body from ``await proto()``, the answer by ``response_bytes`` or chunk by chunk through
    ``response_stream``'s transport (each ``send_bytes`` hands the chunk to hyper at once)."""
    body = await proto()
    headers = [(k, v) for k, v in scope.headers.items() if k.lower() not in HOP]
    async with session.request(scope.method, upstream, data=body, headers=headers) as up:
        if up.headers.get("Content-Length") is not None:
            proto.response_bytes(up.status, _down(up.headers), await up.read())
            return
        transport = proto.response_stream(up.status, _down(up.headers))
        async for chunk in up.content.iter_any():
            await transport.send_bytes(chunk)


async def relay_granian_lean(client: LeanClient, path: str, scope: Any, proto: Any) -> None:
    body = await proto()
    headers = [(k, v) for k, v in scope.headers.items() if k.lower() not in HOP]
    conn = await client.exchange(scope.method, path, headers, body)
    status, down, whole = lean_head(conn)
    if whole:
        proto.response_bytes(status, down, await lean_whole(client, conn))
        return
    transport = proto.response_stream(status, down)
    while (chunk := await conn.chunks.get()) is not None:
        await transport.send_bytes(chunk)
    client.done(conn)


async def serve_granian(variant: str, port: int, upstream: str) -> None:
    """Granian's embeddable server on the running loop (uvloop): one worker, one Rust runtime thread, HTTP/1
    only, no websockets, no access log. SIGTERM ends the process (the embeddable server installs no
    handler), the Rust threads with it."""
    from granian.constants import HTTPModes, Interfaces
    from granian.server.embed import Server
    from yarl import URL

    app: Any
    if variant == "granian-httptools":
        url = URL(upstream)
        client = LeanClient(url.host or "127.0.0.1", url.port or 80)

        async def app(scope: Any, proto: Any) -> None:
            await relay_granian_lean(client, url.path, scope, proto)
    else:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                        skip_auto_headers=("User-Agent", "Accept-Encoding"))

        async def app(scope: Any, proto: Any) -> None:
            await relay_granian(session, upstream, scope, proto)

    server = Server(app, address="127.0.0.1", port=port, interface=Interfaces.RSGI, http=HTTPModes.http1,
                    websockets=False, runtime_threads=1, backlog=1024, log_enabled=False)
    await server.serve()


class _RawUpstream(_Upstream):
    """The httptools client's connection for ``raw``: once the relay has the head, each piece of a
    streamed body goes straight from the parser's callback to ``sink`` (no queue, no task switch per
    chunk), and ``end`` says how the body ended (True: whole; False: the engine's connection was lost)."""

    def __init__(self) -> None:
        super().__init__()
        self.sink: Callable[[bytes], None] | None = None
        self.end: asyncio.Future[bool] | None = None

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink(body)
        else:
            self.chunks.put_nowait(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        self._ended(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._ended(False)

    def _ended(self, whole: bool) -> None:
        if self.end is None:
            self.chunks.put_nowait(None)
        elif not self.end.done():
            self.end.set_result(whole)


class RawClient(LeanClient):
    protocol = _RawUpstream


HOP_B = frozenset(h.encode() for h in HOP)


@functools.lru_cache(maxsize=64)
def status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


class _RawServer(asyncio.Protocol):
    """One client connection of ``raw``: requests parsed by httptools, relayed one after the other (a
    pipelined request waits for the answer before it), the connection kept alive unless the client says
    otherwise."""

    def __init__(self, client: RawClient, path: bytes) -> None:
        import httptools

        self.client, self.path = client, path
        self.host = f"{client.host}:{client.port}".encode("latin-1")
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.pending: collections.deque[tuple[bytes, list[tuple[bytes, bytes]], bytes, bool, bool]] = \
            collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.upstream: _RawUpstream | None = None  # the connection whose body is being streamed
        self.paused = False
        self.chunked = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()  # its body has nowhere to go

    def pause_writing(self) -> None:
        self.paused = True
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def on_message_begin(self) -> None:
        self.headers, self.body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.pending.append((self.parser.get_method(), self.headers, b"".join(self.body),
                             self.parser.should_keep_alive(), self.parser.get_http_version() == "1.0"))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.relay_pending())

    async def relay_pending(self) -> None:
        assert self.transport is not None
        while self.pending and not self.transport.is_closing():
            if not await self.relay(*self.pending.popleft()):
                self.transport.close()
        self.task = None

    def write_chunk(self, chunk: bytes) -> None:
        assert self.transport is not None
        if chunk:  # an empty chunk would end the client's body
            self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk)

    async def relay(self, method: bytes, headers: list[tuple[bytes, bytes]], body: bytes, keep: bool,
                    http10: bool) -> bool:
        """One exchange; whether the client's connection can carry the next."""
        assert self.transport is not None
        head = b"%b %b HTTP/1.1\r\nHost: %b\r\nContent-Length: %d\r\n" % (method, self.path, self.host, len(body))
        head += b"".join(b"%b: %b\r\n" % (k, v) for k, v in headers if k.lower() not in HOP_B) + b"\r\n"
        conn = await self.client.send(head, body)
        assert isinstance(conn, _RawUpstream) and conn.head is not None
        status, raw_headers = conn.head.result()
        down = status_line(status) + b"".join(b"%b: %b\r\n" % (k, v) for k, v in raw_headers
                                              if k.lower() not in HOP_B)
        bodiless = status < 200 or status in (204, 304)
        if bodiless or any(k.lower() == b"content-length" for k, _ in raw_headers):
            data = await lean_whole(self.client, conn)
            length = b"" if bodiless else b"Content-Length: %d\r\n" % len(data)
            self.transport.write(down + length + (b"" if keep else b"Connection: close\r\n") + b"\r\n" + data)
            return keep
        keep = keep and not http10  # an HTTP/1.0 client's streamed body ends when the connection does
        self.chunked = not http10
        self.transport.write(down + (b"Transfer-Encoding: chunked\r\n" if self.chunked else b"")
                             + (b"" if keep else b"Connection: close\r\n") + b"\r\n")
        whole: bool | None = None
        while whole is None and not conn.chunks.empty():  # what came with the head, before the sink
            chunk = conn.chunks.get_nowait()
            if chunk is None:
                whole = True
            else:
                self.write_chunk(chunk)
        if whole is None:
            conn.end = asyncio.get_running_loop().create_future()
            conn.sink, self.upstream = self.write_chunk, conn
            if self.paused and conn.transport is not None:
                conn.transport.pause_reading()
            whole = await conn.end
            if self.paused and conn.transport is not None:
                conn.transport.resume_reading()  # back to the pool readable
            conn.sink = conn.end = self.upstream = None
        self.client.done(conn)
        if not whole:
            return False  # cut short: no last chunk, the client sees the body end early
        if self.chunked:
            self.transport.write(b"0\r\n\r\n")
        return keep


async def serve_raw(port: int, upstream: str) -> None:
    from yarl import URL

    url = URL(upstream)
    client = RawClient(url.host or "127.0.0.1", url.port or 80)
    path = url.raw_path_qs.encode("latin-1")
    server = await asyncio.get_running_loop().create_server(lambda: _RawServer(client, path), "127.0.0.1", port,
                                                            backlog=1024)
    async with server:
        await server.serve_forever()


NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream engine {{ server {engine}; keepalive 64; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def start_nginx(port: int, upstream: str, workdir: str) -> subprocess.Popen[bytes]:
    """nginx in the foreground (``daemon off``), its config, pid, logs and temp files in ``workdir``; the
    master's pid is the Popen's, the worker its child."""
    from yarl import URL

    url = URL(upstream)
    conf = Path(workdir, "nginx.conf")
    conf.write_text(NGINX_CONF.format(dir=workdir, engine=f"{url.host}:{url.port}", port=port))
    return subprocess.Popen([NGINX, "-p", workdir, "-e", f"{workdir}/error.log", "-c", str(conf)],
                            start_new_session=True)


async def serve(variant: str, port: int, upstream: str) -> None:
    from yarl import URL

    if variant.startswith("granian"):
        await serve_granian(variant, port, upstream)
        return
    if variant == "raw":
        await serve_raw(port, upstream)
        return
    url = URL(upstream)
    handle: Any
    if variant == "httptools":
        client = LeanClient(url.host or "127.0.0.1", url.port or 80)

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await relay_lean(client, url.path, request)
    elif variant == "pyreqwest":
        from pyreqwest.client import ClientBuilder

        rclient = ClientBuilder().build()

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await relay_reqwest(rclient, upstream, request)
    elif variant == "blacksheep":  # as the router would need it: a connect timeout, no redirects, no cookies
        from blacksheep.client import ClientSession as BlackSheep

        bclient = BlackSheep(follow_redirects=False, cookie_jar=False, http2=False, connection_timeout=CONNECT_S,
                             request_timeout=None)
        target = upstream.encode()

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await relay_blacksheep(bclient, target, request)
    elif variant == "aiosonic":
        import aiosonic
        from aiosonic.pools import PoolConfig

        sclient = aiosonic.HTTPClient(aiosonic.TCPConnector(
            {":default": PoolConfig(size=1024, max_conn_requests=None)},
            timeouts=aiosonic.Timeouts(sock_connect=CONNECT_S, sock_read=None, request_timeout=None)))

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await relay_aiosonic(sclient, upstream, request)
    elif variant == "aiohttp-tuned":
        tuned = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, enable_cleanup_closed=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_S), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        target_url = URL(upstream, encoded=True)

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await relay_tuned(tuned, target_url, request)
    else:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                        skip_auto_headers=("User-Agent", "Accept-Encoding"))

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await relay_aiohttp(session, upstream, request)

    runner: web.BaseRunner
    if variant == "app":
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", handle)
        runner = web.AppRunner(app, access_log=None)
    else:
        runner = web.ServerRunner(web.Server(handle), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


# ----------------------------------------------------------------------------- the measurement
def cpu_split(pid: int, tree: bool) -> tuple[float, float]:
    """User and system CPU seconds of a process, every thread; with ``tree`` its children's too (nginx:
    the master and its worker), not those of the router (its engine)."""
    pids = [pid]
    if tree:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    times = [bench.cpu_times(p) for p in pids]
    return sum(u for u, _ in times), sum(s for _, s in times)


def _answer(body: bytes) -> Any:
    """An answer without what differs between two calls (ids, timestamps): JSON, or SSE events."""
    def norm(text: bytes) -> Any:
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return {k: v for k, v in value.items() if k not in ("id", "created")} if isinstance(value, dict) else value

    if body.startswith(b"data: "):
        return [norm(event.removeprefix(b"data: ")) for event in body.split(b"\n\n")]
    return norm(body)


async def check_answers(s: aiohttp.ClientSession, engine: str, url: str) -> str:
    """What the load does not look at: the proxy's answers are the engine's (status, Content-Type, the
    body but for ids and timestamps; a stream's events one for one), and a paced stream comes chunk by
    chunk, not at its end. A problem, or an empty string."""
    for body in (bench.BODY, bench.STREAM_BODY):
        got = []
        for target in (engine, url):
            async with s.post(target, data=body, headers=bench.HEADERS) as r:
                got.append((r.status, r.headers.get("Content-Type"), _answer(await r.read())))
        if got[0] != got[1]:
            return f"{'stream' if body is bench.STREAM_BODY else 'plain'} answer differs: {got[1]!r:.300}"
    paced = json.dumps({"model": "bench", "stream": True, "max_tokens": 5, "fake": {"chunks": 5, "chunk_delay": 0.1},
                        "messages": [{"role": "user", "content": "hi"}]})
    async with s.post(url, data=paced, headers=bench.HEADERS) as r:
        first = None
        async for _ in r.content.iter_any():
            first = first or time.perf_counter()
        spread = time.perf_counter() - (first or 0)
    return "" if spread >= 0.3 else f"5 chunks sent 0.1 s apart came within {spread:.3f} s: not relayed as they came"


async def start_variants(args: argparse.Namespace, engine: str, workdir: str,
                         procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, str]:
    """Start each variant but the router (already up) into ``procs``; their URLs."""
    urls: dict[str, str] = {}
    for variant in args.variants:
        if variant == "router":
            continue
        port = bench.free_port()
        if variant == "nginx":
            procs[variant] = start_nginx(port, engine, workdir)
        else:
            procs[variant] = subprocess.Popen([sys.executable, __file__, "--serve", variant, "--port", str(port),
                                               "--upstream", engine], start_new_session=True)
        urls[variant] = f"http://127.0.0.1:{port}/v1/chat/completions"
    return urls


async def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    router = bench.Router("", None, [])
    procs: dict[str, subprocess.Popen[bytes]] = {}
    workdir = tempfile.mkdtemp(prefix="proxy-layers-")
    os.chmod(workdir, 0o755)  # nginx's worker may run as another user
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            engine = await router.start(s)
            urls = await start_variants(args, engine, workdir, procs)
            for variant, url in urls.items():
                await wait_port(url, procs[variant])
            pids = {v: p.pid for v, p in procs.items()}
            if "router" in args.variants:
                urls["router"], pids["router"] = router.url, router.pid
            for v, url in urls.items():
                await bench.latency(s, url, 200)
                problem = await check_answers(s, engine, url)
                print(f"{v}: answers {'checked' if not problem else 'WRONG: ' + problem}", flush=True)

            def cpu(v: str) -> tuple[float, float]:
                return cpu_split(pids[v], v == "nginx")

            def add(row: dict[str, list[float]], v: str, key: str, c0: tuple[float, float], per: float) -> None:
                user, system = (b - a for a, b in zip(c0, cpu(v), strict=True))
                row.setdefault(key, []).append((user + system) * per)
                row.setdefault(key + "_sys", []).append(system * per)

            out: dict[str, dict[str, list[float]]] = {v: {} for v in urls}
            for i in range(args.rounds):
                d_lat = await bench.latency(s, engine, args.requests)
                d_n, _ = await bench.throughput(s, engine, args.concurrency, args.seconds)
                for v, url in urls.items():
                    row = out[v]
                    c0 = cpu(v)
                    lat = await bench.latency(s, url, args.requests)
                    add(row, v, "cpu_ms_per_plain", c0, 1e3 / args.requests)
                    row.setdefault("added_p50_ms", []).append((statistics.median(lat) - statistics.median(d_lat)) * 1e3)
                    c0 = cpu(v)
                    n, _ = await bench.throughput(s, url, args.concurrency, args.seconds)
                    add(row, v, "cpu_ms_per_stream", c0, 1e3 / max(n, 1))
                    row.setdefault("stream_ratio", []).append(n / d_n)
                    c0 = cpu(v)
                    _, events = await bench.throughput(s, url, args.concurrency, args.seconds / 2, bench.PACED_BODY)
                    add(row, v, "cpu_us_per_chunk", c0, 1e6 / max(events, 1))
                print(f"round {i + 1}: " + "; ".join(f"{v} " + ", ".join(f"{k}={x[-1]:.3f}" for k, x in r.items()
                                                                         if not k.endswith("_sys"))
                                                     for v, r in out.items()), flush=True)
            return out
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(30)
        router.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def wait_port(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: the proxy exited ({proc.returncode})")
            try:
                async with s.post(url, data=bench.BODY, headers=bench.HEADERS) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not answering after {timeout}s")


def report(out: dict[str, dict[str, list[float]]]) -> None:
    """The medians; then (with the router measured) each as a ratio to the router's; then CPU split into
    user and system time (µs) per plain request and per chunk: the kernel's share of relaying the bytes."""
    keys = ("cpu_ms_per_plain", "added_p50_ms", "cpu_ms_per_stream", "stream_ratio", "cpu_us_per_chunk")
    med = {v: {k: statistics.median(x) for k, x in row.items()} for v, row in out.items()}
    print(f"{'variant':17s} {'CPU ms/plain':>13s} {'added p50 ms':>13s} {'CPU ms/stream':>14s} {'stream ratio':>13s} "
          f"{'CPU µs/chunk':>13s}")
    for v, m in med.items():
        print(f"{v:17s} {m['cpu_ms_per_plain']:13.3f} {m['added_p50_ms']:+13.3f} {m['cpu_ms_per_stream']:14.3f} "
              f"{m['stream_ratio']:13.2f} {m['cpu_us_per_chunk']:13.1f}")
    if "router" in med:
        print("\n/ router          " + " ".join(f"{k.replace('_', ' '):>17s}" for k in keys))
        for v, m in med.items():
            print(f"{v:17s} " + " ".join(f"{m[k] / med['router'][k]:17.2f}" if med["router"][k] else f"{'-':>17s}"
                                         for k in keys))
    print(f"\n{'µs user + system':17s} {'plain request':>21s} {'paced chunk':>17s}")
    for v, m in med.items():
        plain, plain_sys = m["cpu_ms_per_plain"] * 1e3, m["cpu_ms_per_plain_sys"] * 1e3
        chunk, chunk_sys = m["cpu_us_per_chunk"], m["cpu_us_per_chunk_sys"]
        print(f"{v:17s} {plain - plain_sys:10.0f} + {plain_sys:8.0f} {chunk - chunk_sys:8.1f} + {chunk_sys:6.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=["app", "server", "httptools", "pyreqwest", "granian",
                                                   "granian-httptools", "router"],
                   help="the variants to run, by name, separated by spaces or commas; also: aiohttp-tuned, "
                        "blacksheep, aiosonic, raw, nginx")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--upstream", help=argparse.SUPPRESS)
    args = p.parse_args()
    import uvloop

    if args.serve:
        uvloop.run(serve(args.serve, args.port, args.upstream))
        return 0
    args.variants = [v for arg in args.variants for v in arg.split(",") if v]
    for variant, modules in (("httptools", ["httptools"]), ("pyreqwest", ["pyreqwest"]), ("granian", ["granian"]),
                             ("granian-httptools", ["granian", "httptools"]), ("blacksheep", ["blacksheep"]),
                             ("aiosonic", ["aiosonic"]), ("raw", ["httptools"])):
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if variant in args.variants and missing:
            print(f"{variant}: skipped (pip install {' '.join(missing)} to measure it)")
            args.variants.remove(variant)
    if "nginx" in args.variants and NGINX is None:
        print("nginx: skipped (no nginx binary: apt-get install nginx-light to measure it)")
        args.variants.remove("nginx")
    out = uvloop.run(measure(args))
    print(f"\n{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; median of {args.rounds} rounds")
    report(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
