"""What each HTTP layer costs: bare pass-through proxies, without any of the router's logic, next to the
router, against the same fake engine, in one run.

    python bench/proxy_layers.py [--rounds 3] [--requests 2000] [--seconds 4]

Each variant is a process that forwards ``POST /v1/chat/completions`` to the engine and relays the
answer (whole when it has a Content-Length, else chunk by chunk), measured like bench/proxy_bench.py:
its CPU time per 1,000 plain requests (concurrency 1), per 1,000 20-chunk streams (concurrency 64), and
per paced chunk. The variants:

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
  router     the router itself (this tree).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench as bench

HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade", "te",
                 "trailer", "proxy-authorization", "proxy-authenticate"})


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
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Upstream] = []

    async def exchange(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> _Upstream:
        conn = self.idle.pop() if self.idle else None
        if conn is None:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_Upstream, self.host, self.port)
        else:
            conn.parser = type(conn.parser)(conn)
            conn.headers = []
        conn.head = asyncio.get_running_loop().create_future()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers]
        assert conn.transport is not None
        conn.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
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


async def serve(variant: str, port: int, upstream: str) -> None:
    from yarl import URL

    if variant.startswith("granian"):
        await serve_granian(variant, port, upstream)
        return
    url = URL(upstream)
    runner: web.BaseRunner
    if variant == "httptools":
        client = LeanClient(url.host or "127.0.0.1", url.port or 80)

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await relay_lean(client, url.path, request)

        runner = web.ServerRunner(web.Server(handle), access_log=None)
    elif variant == "pyreqwest":
        from pyreqwest.client import ClientBuilder

        rclient = ClientBuilder().build()

        async def via_reqwest(request: web.BaseRequest) -> web.StreamResponse:
            return await relay_reqwest(rclient, upstream, request)

        runner = web.ServerRunner(web.Server(via_reqwest), access_log=None)
    else:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                        skip_auto_headers=("User-Agent", "Accept-Encoding"))

        async def relay(request: web.BaseRequest) -> web.StreamResponse:
            return await relay_aiohttp(session, upstream, request)

        if variant == "server":
            runner = web.ServerRunner(web.Server(relay), access_log=None)
        else:
            app = web.Application(client_max_size=64 << 20)
            app.router.add_post("/v1/chat/completions", relay)
            runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


# ----------------------------------------------------------------------------- the measurement
async def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    router = bench.Router("", None, [])
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            engine = await router.start(s)
            for variant in args.variants:
                if variant == "router":
                    continue
                port = bench.free_port()
                procs[variant] = subprocess.Popen([sys.executable, __file__, "--serve", variant, "--port", str(port),
                                                   "--upstream", engine], start_new_session=True)
                urls[variant] = f"http://127.0.0.1:{port}/v1/chat/completions"
            for variant, url in urls.items():
                await wait_port(url, procs[variant])
            pids = {v: p.pid for v, p in procs.items()}
            if "router" in args.variants:
                urls["router"], pids["router"] = router.url, router.pid
            for url in urls.values():
                await bench.latency(s, url, 200)
            out: dict[str, dict[str, list[float]]] = {v: {} for v in urls}
            for i in range(args.rounds):
                d_lat = await bench.latency(s, engine, args.requests)
                d_n, _ = await bench.throughput(s, engine, args.concurrency, args.seconds)
                for v, url in urls.items():
                    row = out[v]
                    c0 = bench.cpu_seconds(pids[v])
                    lat = await bench.latency(s, url, args.requests)
                    cpu = bench.cpu_seconds(pids[v]) - c0
                    row.setdefault("cpu_ms_per_plain", []).append(cpu / args.requests * 1e3)
                    row.setdefault("added_p50_ms", []).append((statistics.median(lat) - statistics.median(d_lat)) * 1e3)
                    c0 = bench.cpu_seconds(pids[v])
                    n, _ = await bench.throughput(s, url, args.concurrency, args.seconds)
                    row.setdefault("cpu_ms_per_stream", []).append((bench.cpu_seconds(pids[v]) - c0) / max(n, 1) * 1e3)
                    row.setdefault("stream_ratio", []).append(n / d_n)
                    c0 = bench.cpu_seconds(pids[v])
                    _, events = await bench.throughput(s, url, args.concurrency, args.seconds / 2, bench.PACED_BODY)
                    cpu = bench.cpu_seconds(pids[v]) - c0
                    row.setdefault("cpu_us_per_chunk", []).append(cpu / max(events, 1) * 1e6)
                print(f"round {i + 1}: " + "; ".join(f"{v} " + ", ".join(f"{k}={x[-1]:.3f}" for k, x in r.items())
                                                     for v, r in out.items()), flush=True)
            return out
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(30)
        router.stop()


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=["app", "server", "httptools", "pyreqwest", "granian",
                                                   "granian-httptools", "router"])
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--upstream", help=argparse.SUPPRESS)
    args = p.parse_args()
    import uvloop

    if args.serve:
        uvloop.run(serve(args.serve, args.port, args.upstream))
        return 0
    for variant, modules in (("httptools", ["httptools"]), ("pyreqwest", ["pyreqwest"]), ("granian", ["granian"]),
                             ("granian-httptools", ["granian", "httptools"])):
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if variant in args.variants and missing:
            print(f"{variant}: skipped (pip install {' '.join(missing)} to measure it)")
            args.variants.remove(variant)
    out = uvloop.run(measure(args))
    print(f"\n{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; median of {args.rounds} rounds")
    print(f"{'variant':17s} {'CPU ms/plain':>13s} {'added p50 ms':>13s} {'CPU ms/stream':>14s} {'stream ratio':>13s} "
          f"{'CPU µs/chunk':>13s}")
    for v, row in out.items():
        m = {k: statistics.median(x) for k, x in row.items()}
        print(f"{v:17s} {m['cpu_ms_per_plain']:13.3f} {m['added_p50_ms']:+13.3f} {m['cpu_ms_per_stream']:14.3f} "
              f"{m['stream_ratio']:13.2f} {m['cpu_us_per_chunk']:13.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
