"""The Ray backend end to end: a real vLLM CPU server of a tiny model, started by a Ray actor on a node of
a simulated cluster (a CPU-only head and one node, on loopback), answered and streamed through the router
(a ``serve`` process joined to the cluster); stopping the router leaves no engine process behind."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from openai import OpenAI

from tests.harness import free_port
from tests.harness.ray_cluster import RayCluster, ray_cluster

from .support import (
    RUN_ID,
    RUN_VAR,
    Router,
    make_room,
    model_entry,
    model_processes,
    router_config,
    start_router,
    stop_second_router,
)

pytestmark = pytest.mark.e2e

MODEL = "tiny-chat-b"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    with ray_cluster(uuid.uuid4().hex) as c:
        c.add_node(num_gpus=1)  # vLLM's CPU build ignores the GPU Ray accounts for; the router places on it
        yield c


@pytest.fixture(scope="module")
def on_ray(router: Router, cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    make_room(router)
    config = router_config(free_port())
    # tagged like the suite's other engines (the actor's environment is the cluster's, not the router's)
    config["models"] = {MODEL: {**model_entry(MODEL, env={RUN_VAR: RUN_ID}), "memory_gb": 10}}
    config["cluster"] = {"backend": "ray", "address": cluster.cluster.address, "namespace": "e2e",
                         "gpu_memory_gb": 80}
    r = start_router(tmp_path_factory.mktemp("ray"), config)
    try:
        yield r
    finally:
        running = model_processes(MODEL)
        stop_second_router(r, MODEL)
        assert running, "the engine's processes were never seen: the check above would prove nothing"


def test_a_real_vllm_started_by_a_ray_actor_answers_and_streams_through_the_router(on_ray: Router) -> None:
    client = OpenAI(base_url=on_ray.url + "/v1", api_key="unused", timeout=600)
    reply = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Hello there"}])
    assert reply.model == MODEL and str(reply.system_fingerprint or "").startswith("vllm-")
    entry = on_ray.admin(MODEL)
    assert entry["ray_actor"] == f"e2e/{MODEL}" and entry["pid"] is None and entry["remote_pid"]
    chunks = list(client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "Count to five"}]))
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("length", "stop")
