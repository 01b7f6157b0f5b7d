"""Command line: ``serve``, ``check-config``, ``config-schema``, the admin client commands (admin_cli.py) and the
``fake-engine`` test/demo server."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import yaml

from vllm_model_router import __version__
from vllm_model_router.admin_cli import register_admin_commands
from vllm_model_router.log_format import FORMATS, configure_logging

if TYPE_CHECKING:
    from vllm_model_router.config import RouterConfig

log = logging.getLogger("vllm_model_router")


def setup_logging(level: str, fmt: str = "text") -> None:
    configure_logging(level, fmt)


def _config_path(arg: str | None) -> str | None:
    return arg or os.environ.get("ROUTER_CONFIG") or None


def cmd_check_config(args: argparse.Namespace) -> int:
    from vllm_model_router.config import ConfigError, load_config  # not imported by fake-engine and admin commands

    try:
        cfg = load_config(args.file)
    except ConfigError as e:
        print(f"{args.file}: invalid configuration", file=sys.stderr)
        for p in e.problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    from vllm_model_router.gpu.memory import check_fit, gpu_budgets, resolve_needs
    from vllm_model_router.gpu.probe import NvmlProbe

    # with the ray backend the models go on the nodes' GPUs, not this machine's (which may have one of its own)
    probe = NvmlProbe.create() if not cfg.cluster.ray else None
    devices = probe.devices() if probe is not None else []
    needs = resolve_needs(cfg, devices)
    problems = check_fit(cfg, devices, needs)
    if problems:
        print(f"{args.file}: does not fit the GPUs of this machine", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"# {args.file}: valid ({len(cfg.models)} models)")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    budgets = gpu_budgets(cfg, devices)
    print("# memory per model (per GPU it is placed on):")
    for name, need in needs.items():
        print(f"#   {name}: {need.gb:.1f} GB from {need.source}")
    if cfg.cluster.ray:
        from vllm_model_router.gpu.memory import cluster_gpu_budget

        print(f"# Ray cluster: each GPU of its nodes has a budget of {cluster_gpu_budget(cfg):.1f} GB; the nodes and "
              f"their GPUs are read when the router joins the cluster")
    elif budgets:
        print("# GPU budgets: " + ", ".join(f"GPU {g} {gb:.1f} GB" for g, gb in budgets.items()))
    else:
        print("# no NVIDIA GPU detected: memory is accounted from declarations only")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    """The JSON Schema of the config file, for editors (e.g. a ``# yaml-language-server: $schema=`` line)."""
    from vllm_model_router.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


class ListenError(Exception):
    """The router could not open its listening socket (address in use, not permitted, no such address);
    already logged in one line, so that `serve` only has to exit 1."""


def _listen_problem(host: str, port: int, e: OSError) -> str:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = os.strerror(e.errno).lower() if e.errno else str(e)
    return f"cannot listen on {address}: {reason} (listen.host / listen.port, or env PORT)"


async def _serve(cfg: RouterConfig) -> None:
    from vllm_model_router.http.app import build_app
    from vllm_model_router.http.server import make_runner, raise_fd_limit, start_site, stop_serving

    raise_fd_limit(cfg)
    app = build_app(cfg)
    runner = make_runner(app, cfg)  # on SIGTERM, requests in flight get cfg.shutdown_grace to finish
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await start_site(runner, cfg)
        except OSError as e:  # one line, not a traceback; cmd_serve exits 1
            log.error("%s", _listen_problem(cfg.host, cfg.port, e))
            raise ListenError from None
        names = ", ".join(f"{m.name}" + (f" (aliases: {', '.join(m.aliases)})" if m.aliases else "")
                          for m in cfg.models.values())
        log.info("vllm-model-router %s listening on http://%s:%d (config %s; max_resident=%d, memory_gb=%s)",
                 __version__, cfg.host, cfg.port, cfg.source, cfg.max_resident, cfg.memory_gb)
        log.info("models: %s", names)
        await stop.wait()
        log.info("shutting down: requests in flight get up to %gs to finish (shutdown_grace), then every model "
                 "the router started is stopped", cfg.shutdown_grace)
        await stop_serving(runner, cfg.shutdown_grace)
    finally:
        await runner.cleanup()
        log.info("shutdown complete")


def cmd_serve(args: argparse.Namespace) -> int:
    from vllm_model_router.config import ConfigError, load_config

    setup_logging(args.log_level, args.log_format)
    path = _config_path(args.config)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        log.error("%s: %s", path or "configuration", e)
        return 1
    from vllm_model_router.http.security import install_redaction

    install_redaction(cfg.auth)  # no log line ever shows a configured key
    try:
        _run(_serve(cfg))
    except ListenError:  # already logged
        return 1
    except ConfigError as e:  # found once the machine is known (GPUs too small, a backend it cannot run)
        log.error("%s: %s", path or "configuration", e)
        return 1
    return 0


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop (the event loop the router is tested on), else on asyncio's own."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
    else:
        uvloop.run(main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-model-router",
        description="One OpenAI-compatible endpoint in front of many model servers, made resident on demand.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the router")
    s.add_argument("--config", "-c", help="YAML config file (default: env ROUTER_CONFIG)")
    s.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    s.add_argument("--log-format", choices=FORMATS, default=os.environ.get("LOG_FORMAT", "text").lower(),
                   help="text (default) or json: one JSON object per line (env LOG_FORMAT)")
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("check-config", help="validate a config file and print it resolved")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_config)
    sub.add_parser("config-schema", help="print the config file's JSON Schema (for editors)").set_defaults(
        func=cmd_config_schema)
    register_admin_commands(sub)
    sub.add_parser("fake-engine", add_help=False, help="a fake vLLM-compatible server, for tests and demos only")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fake-engine"]:
        from vllm_model_router.testing.fake_engine import main as fake_main

        rc_fake: int = fake_main(argv[1:])
        return rc_fake
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc
