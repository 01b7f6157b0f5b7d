"""What the fake engine does as an operating-system process, beyond HTTP.

A supervisor of vLLM has to cope with more than the API: log lines on stdout, a model load that
keeps the port closed for a while or fails, an ``EngineCore`` child process that outlives a
SIGKILL of the API server, signals it must send only once, and hard exits in the middle of work.
This module reproduces those behaviours; it knows nothing about the HTTP routes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from typing import Literal, NoReturn

LOG_PREFIX = "fake-engine:"

# The child emulates vLLM's EngineCore process: it only sleeps. It resets SIGTERM/SIGINT so
# that it does not inherit an "ignored" disposition from a parent started with --ignore-sigterm.
_CHILD_CODE = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
    "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
    "while True:\n"
    "    time.sleep(3600)\n"
)

StartupOutcome = Literal["ready", "stopped", "failed"]


def log(line: str) -> None:
    """Print one log line to stdout and flush it; never fail if stdout is gone."""
    try:
        print(line, flush=True)
    except (OSError, ValueError):
        pass


def spawn_child(port: int, primary: str) -> subprocess.Popen[bytes]:
    """Start the ``fake-engine-worker`` child in this process group, as vLLM starts its EngineCore.

    Its command line carries the port and the model name so that a test can recognise it in /proc.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_CODE, "fake-engine-worker", "--port", str(port), primary],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log(f"INFO {LOG_PREFIX} started engine worker process pid {child.pid} (fake-engine-worker)")
    return child


def terminate_child(child: subprocess.Popen[bytes] | None) -> None:
    """Stop and reap the child, as a clean vLLM shutdown does; SIGKILL it if SIGTERM takes over 1 s."""
    if child is None or child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def exit_now(reason: str, child: subprocess.Popen[bytes] | None = None) -> NoReturn:
    """Log an error and exit with status 1 at once, skipping every cleanup, as a crashed server does.

    A child passed in is terminated first; one not passed in is left running, as after a real crash.
    """
    log(f"ERROR {LOG_PREFIX} {reason}")
    terminate_child(child)
    os._exit(1)


def record_signal(path: str | None, pid: int, sig: signal.Signals) -> None:
    """Append ``<pid> <SIGNAME>`` to the --signal-log file: a supervisor must signal a server once (uvicorn,
    vLLM's HTTP server, takes a second SIGTERM as "exit now, skip the graceful shutdown")."""
    if path is None:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{pid} {sig.name}\n")
    except OSError as exc:
        log(f"WARNING {LOG_PREFIX} cannot write the signal log {path}: {exc}")


async def wait_startup(args: argparse.Namespace, stop: asyncio.Event) -> StartupOutcome:
    """Emulate model loading before the port is bound, logging progress about once a second.

    Returns "stopped" when a signal arrives meanwhile, "failed" for --exit-during-startup (after
    half the delay, with vLLM's error lines), else "ready".
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    target = args.startup_delay / 2 if args.exit_during_startup else args.startup_delay
    while (remaining := start + target - loop.time()) > 0:
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(remaining, 1.0))
            return "stopped"
        except TimeoutError:
            elapsed = loop.time() - start
            if elapsed < target:
                log(f"INFO {LOG_PREFIX} loading model weights ... ({elapsed:.1f}/{args.startup_delay:.1f} s)")
    if args.exit_during_startup:
        log(f"ERROR {LOG_PREFIX} failed to load model: simulated failure (--exit-during-startup)")
        log(f"ERROR {LOG_PREFIX} EngineCore failed to start.")
        log(f"ERROR {LOG_PREFIX} RuntimeError: Engine core initialization failed. See root cause above.")
        return "failed"
    return "ready"
