"""Every async test runs on uvloop, the event loop ``vllm-model-router serve`` runs on: transports,
sockets and subprocesses behave differently there, and what the router meets in production is what
the tests should meet."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item,
                                  ) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": uvloop.new_event_loop}
