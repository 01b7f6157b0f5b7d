"""Command line of the fake engine: vLLM's options that the router passes, plus test knobs.

Options that vLLM has keep vLLM's names and defaults, so a model's ``cmd`` in a router config
can point at either; the rest (failure injection, delays, memory reports) exist for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable

from vllm_model_router.testing.fake_engine.server import serve

PROG = "vllm-model-router fake-engine"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "FAKE vLLM-compatible OpenAI server. This is a TEST AND DEMO TOOL, NOT an inference "
            "engine: it loads no model and answers deterministic canned text. It mimics the vLLM "
            "0.32 HTTP API and process behaviour (startup delay, failures, sleep mode, runtime "
            "LoRA adapters) so the router can be tested and demonstrated without a GPU."
        ),
        epilog=(
            'A request body may carry "fake": {"chunks": N, "chunk_delay": S, "delay": S} to override the '
            "stream pace or to hold the request in flight (and running) for S seconds. GET /fake/state returns "
            "counters (requests, in-flight, running, waiting, requests refused while sleeping, adapters, memory) "
            "for test assertions."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to bind")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="model name(s) served; repeatable; the first is the primary (default: --model)",
    )
    parser.add_argument("--model", help='model path reported as "root" in /v1/models (default: first served name)')
    parser.add_argument(
        "--max-model-len", type=int, default=2048, metavar="N", help="max_model_len reported (default 2048)"
    )
    parser.add_argument(
        "--startup-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds before the port is bound (connections are refused meanwhile)",
    )
    parser.add_argument("--chunks", type=int, default=8, metavar="N", help="SSE chunks per stream (default 8)")
    parser.add_argument(
        "--chunk-delay", type=float, default=0.0, metavar="S", help="seconds between SSE chunks (default 0)"
    )
    parser.add_argument("--access-log", action="store_true", help="log every request to stdout")
    load = parser.add_argument_group("saturation (a full batch, as in vLLM)")
    load.add_argument(
        "--max-num-seqs",
        type=int,
        metavar="K",
        help=(
            "at most K requests run at once; the others wait inside the engine in arrival order and are "
            "reported as vllm:num_requests_waiting (default: no limit). A client that disconnects leaves "
            "the queue, or frees its slot"
        ),
    )
    load.add_argument(
        "--service-time",
        type=float,
        default=0.0,
        metavar="S",
        help=(
            "seconds a chat or text completion holds its slot before it is answered (default 0): a "
            "non-streaming answer comes after S, a streaming one sends its first chunk after S and the "
            "rest at the --chunk-delay pace; embeddings take no service time"
        ),
    )
    failures = parser.add_argument_group("failure injection")
    failures.add_argument(
        "--exit-during-startup", action="store_true", help="log errors and exit 1 during startup, before binding"
    )
    failures.add_argument(
        "--exit-mid-stream", type=int, metavar="K", help="on a streaming request, hard-exit after K chunks"
    )
    failures.add_argument(
        "--ignore-sigterm", action="store_true", help="ignore SIGTERM and SIGINT (only SIGKILL stops it)"
    )
    failures.add_argument(
        "--shutdown-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds the graceful shutdown takes after SIGTERM/SIGINT (default 0)",
    )
    failures.add_argument(
        "--signal-log",
        metavar="FILE",
        help="append '<pid> <SIGNAME>' to FILE for every SIGTERM/SIGINT received",
    )
    failures.add_argument(
        "--spawn-child",
        action="store_true",
        help="start a 'fake-engine-worker' child in the same process group that survives a SIGKILL of this process",
    )
    failures.add_argument(
        "--health-status", type=int, default=200, metavar="CODE", help="status code of GET /health (default 200)"
    )
    failures.add_argument(
        "--fail-after-requests", type=int, metavar="N", help="exit with status 1 after N inference requests served"
    )
    features = parser.add_argument_group("model features")
    features.add_argument(
        "--no-embeddings", action="store_true", help='POST /v1/embeddings answers 404 {"detail":"Not Found"}'
    )
    features.add_argument("--enable-lora", action="store_true", help="expose runtime LoRA load/unload routes")
    features.add_argument(
        "--lora-modules", nargs="+", action="extend", metavar="NAME=PATH", help="LoRA adapters loaded at startup"
    )
    features.add_argument(
        "--max-loras", type=int, default=4, metavar="N", help="accepted for compatibility (default 4)"
    )
    features.add_argument("--max-cpu-loras", type=int, metavar="N", help="accepted for compatibility")
    features.add_argument(
        "--lora-load-delay", type=float, default=0.0, metavar="S", help="seconds a LoRA load takes (default 0)"
    )
    features.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        metavar="U",
        help="accepted for compatibility (default 0.9)",
    )
    sleep = parser.add_argument_group("sleep mode (needs --enable-sleep-mode and env VLLM_SERVER_DEV_MODE=1)")
    sleep.add_argument("--enable-sleep-mode", action="store_true", help="expose /sleep, /wake_up, ...")
    sleep.add_argument("--sleep-delay", type=float, default=0.05, metavar="S", help="seconds /sleep takes")
    sleep.add_argument("--wake-delay", type=float, default=0.05, metavar="S", help="seconds /wake_up takes")
    sleep.add_argument("--fail-wake", action="store_true", help="/wake_up answers 500 and the engine stays asleep")
    sleep.add_argument(
        "--memory-gb", type=float, default=1.0, metavar="GB", help="memory reported while awake (default 1.0)"
    )
    sleep.add_argument(
        "--sleeping-memory-gb", type=float, default=0.1, metavar="GB", help="memory reported while asleep (default 0.1)"
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.served_model_name:
        if not args.model:
            parser.error("give --served-model-name NAME (or --model PATH)")
        args.served_model_name = [args.model]
    if args.chunks < 1:
        parser.error("--chunks must be >= 1")
    delays = ("startup_delay", "chunk_delay", "sleep_delay", "wake_delay", "lora_load_delay", "shutdown_delay")
    for option in (*delays, "service_time"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')} must be >= 0")
    if args.max_num_seqs is not None and args.max_num_seqs < 1:
        parser.error("--max-num-seqs must be >= 1")
    if args.exit_mid_stream is not None and args.exit_mid_stream < 0:
        parser.error("--exit-mid-stream must be >= 0")
    if args.fail_after_requests is not None and args.fail_after_requests < 1:
        parser.error("--fail-after-requests must be >= 1")
    for spec in args.lora_modules or []:
        if "=" not in spec:
            parser.error(f"--lora-modules expects NAME=PATH, got {spec!r}")
    return args


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    """Run the fake engine until SIGTERM/SIGINT; returns the process exit status."""
    args = parse_args(argv)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(serve(args))
