"""Model entries for a test router's configuration: the fake vLLM engine, and two stand-in servers (one
that echoes what it received, one that never answers), each started by the router as a real process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
CHAT = "/v1/chat/completions"
FAKE_ENGINE = (sys.executable, "-m", "vllm_model_router.testing.fake_engine", "--port", "${PORT}",
               "--served-model-name", "${MODEL}")
ECHO = (sys.executable, str(HERE / "echo_server.py"), "${PORT}")
STALL = (sys.executable, str(HERE / "stall_server.py"), "${PORT}")


def engine(*args: str, **settings: Any) -> dict[str, Any]:
    """A model entry whose server is the fake engine with extra ``args``; ``stop_timeout`` 1 s by default."""
    return {"cmd": [*FAKE_ENGINE, *args], "stop_timeout": 1, **settings}


def echo_model(**settings: Any) -> dict[str, Any]:
    """A model whose server answers every POST with what it received (headers included)."""
    return {"cmd": list(ECHO), "stop_timeout": 1, **settings}


def stall_model(**settings: Any) -> dict[str, Any]:
    """A model whose server accepts requests and never answers them (or sends a stream's head only)."""
    return {"cmd": list(STALL), "stop_timeout": 1, **settings}


def chat_body(model: str, text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}
