"""Replicas end to end: two real vLLM CPU servers of the same tiny model behind one router, and requests
spread over both (each engine's own ``vllm:request_success_total`` counts what it served).

Its own router (capacity 2, ``tiny-chat-b`` kept at two replicas); the suite's shared router is asked to
unload what it holds first, so that no more than two vLLM servers share the machine's two cores.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import free_port
from tests.harness.waiting import wait_until_sync

from .support import (
    LOAD_TIMEOUT_S,
    Router,
    http,
    make_room,
    model_entry,
    router_config,
    start_router,
    stop_second_router,
)

pytestmark = pytest.mark.e2e

MODEL = "tiny-chat-b"


@pytest.fixture(scope="module")
def replicated(router: Router, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    make_room(router)
    config = router_config(free_port(), max_resident=2)
    config["models"] = {MODEL: {**model_entry(MODEL), "replicas": {"min": 2, "max": 2}}}
    r = start_router(tmp_path_factory.mktemp("replicas"), config)
    try:
        yield r
    finally:
        stop_second_router(r, MODEL, grace=10)


def served(port: int) -> float:
    """What one vLLM says it has served: its ``vllm:request_success_total`` over all finish reasons."""
    text = http("GET", f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def replicas(router: Router) -> list[dict[str, Any]]:
    return list(router.admin(MODEL)["replicas"])


def test_two_real_vllm_servers_of_one_model_share_the_requests(replicated: Router) -> None:
    router = replicated
    wait_until_sync(lambda: [u["state"] for u in replicas(router)] == ["loaded", "loaded"], LOAD_TIMEOUT_S * 2,
                    interval=1.0)
    units = replicas(router)
    ports = [u["port"] for u in units]
    assert len(set(ports)) == 2 and len({u["pid"] for u in units}) == 2, units
    before = [served(p) for p in ports]

    def ask(i: int) -> int:
        body = {"model": MODEL, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}]}
        reply = router.post("/v1/chat/completions", body)
        assert reply.json()["model"] == MODEL, reply.text  # one served name, whichever copy answered
        return reply.status

    # eight rounds of two requests sent together: the second of each arrives while the first is in flight,
    # so it goes to the other copy (fewest outstanding); one at a time, all would go to the first copy
    statuses: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for round_ in range(8):
            statuses += pool.map(ask, (2 * round_, 2 * round_ + 1))
    assert statuses == [200] * 16
    gained = [served(p) - b for p, b in zip(ports, before, strict=True)]
    assert sum(gained) == 16, gained
    assert min(gained) >= 4, f"requests were not spread over both engines: {gained}"
    cards = [c for c in router.get("/v1/models", timeout=10).json()["data"] if c["id"].startswith(MODEL)]
    assert [c["id"] for c in cards] == [MODEL]  # one card per model, however many copies
