"""Fixtures for the end-to-end suite: the router as a real process in front of real vLLM servers
(CPU build, tiny random-weight models) and a real LiteLLM proxy.

What it needs comes from ``scripts/prepare_e2e.sh``: the vLLM venv (``$VLLM_VENV``), the LiteLLM venv
(``$LITELLM_VENV``) and the models (``$MODELS_DIR``). Without them the suite is skipped, except
under CI (``CI=true``), where that is a failure.

Every process the suite starts carries ``VMR_E2E_RUN=<run id>`` in its environment, and every model
server ``VMR_E2E_MODEL=<model>``; children inherit it, so the process table tells which processes
(API server, ``VLLM::EngineCore``, ``VLLM::Worker``, helpers) belong to which model, whatever
happened to their parent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import free_port

from .support import (
    LiteLLM,
    Router,
    check_prerequisites,
    router_config,
    start_litellm,
    start_router,
    stop_litellm,
    stop_router,
)


@pytest.fixture(scope="session", autouse=True)
def e2e_prerequisites() -> None:
    check_prerequisites()


@pytest.fixture(scope="session")
def router(e2e_prerequisites: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """One router for the whole suite, capacity 1 (one resident vLLM at a time: two cores). On
    teardown it gets SIGTERM and must leave no process of any model behind."""
    workdir = tmp_path_factory.mktemp("router")
    r = start_router(workdir, router_config(free_port()))
    try:
        yield r
    finally:
        try:
            stop_router(r)
        finally:
            print(f"\nrouter log: {r.log_path}\n{r.log(40)}")


@pytest.fixture(scope="session")
def litellm(router: Router, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiteLLM]:
    """A real LiteLLM proxy whose one model entry points at the router."""
    proxy = start_litellm(tmp_path_factory.mktemp("litellm"), router.url)
    try:
        yield proxy
    finally:
        stop_litellm(proxy)
