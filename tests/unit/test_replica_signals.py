"""The two signals the shell gives the scheduler about replicas: the prompt-prefix key a request is
balanced by, and whether a model's engines are saturated (vLLM's own queue, read from /metrics)."""

from __future__ import annotations

from typing import Any

from vllm_model_router.http.affinity import PREFIX_CHARS, prefix_key
from vllm_model_router.runtime.pressure import Saturation, queued


def chat(*texts: str, system: str = "You are terse.") -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "system", "content": system},
                                       *({"role": "user", "content": t} for t in texts)]}


def test_the_same_prompt_start_gives_the_same_key_and_another_start_another() -> None:
    long = "x" * PREFIX_CHARS
    assert prefix_key(chat("hello")) == prefix_key(chat("hello"))
    assert prefix_key(chat("hello")) != prefix_key(chat("bye"))
    assert prefix_key(chat("hello")) != prefix_key(chat("hello", system="You are verbose."))
    # beyond the first PREFIX_CHARS characters the conversation does not matter (a growing chat keeps its key)
    assert prefix_key(chat("q1", system=long)) == prefix_key(chat("q1", "a1", "q2", system=long))
    # roles count: the same text as another role is another prompt
    assert prefix_key({"messages": [{"role": "user", "content": "hi"}]}) != \
        prefix_key({"messages": [{"role": "assistant", "content": "hi"}]})
    # content given as parts: the text parts
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"},
                                                        {"type": "image_url", "image_url": {"url": "u"}}]}]}
    assert prefix_key(parts) == prefix_key({"messages": [{"role": "user", "content": "hello"}]})


def test_completions_key_on_the_prompt_and_odd_bodies_have_none() -> None:
    assert prefix_key({"prompt": "a" * 600 + "b"}) == prefix_key({"prompt": "a" * 600 + "c"})
    assert prefix_key({"prompt": ["p1", "p2"]}) == prefix_key({"prompt": "p1"})
    assert prefix_key({"prompt": [1, 2, 3]}) != prefix_key({"prompt": [1, 2, 4]})
    assert prefix_key({"input": "embed me"}) == prefix_key({"prompt": "embed me"})
    for body in ({}, {"prompt": ""}, {"prompt": 3}, {"messages": []}, {"messages": ["no", 1]}, {"prompt": []}):
        assert prefix_key(body) is None


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
"""


def test_queued_reads_vllms_waiting_gauge_over_its_engines() -> None:
    assert queued(VLLM_METRICS) == 5.0
    assert queued("# a server without vLLM's gauges\nother_metric 7\n") == 0.0


def test_saturated_only_after_requests_queue_for_sustain_seconds_and_one_empty_reading_ends_it() -> None:
    s = Saturation(sustain=4.0)
    assert [s.note("m", waiting, t) for t, waiting in ((0, 2), (2, 1), (3.9, 5))] == [None, None, None]
    assert s.note("m", 1, 4.0) is True  # queueing in every reading for 4 s
    assert s.note("other", 1, 4.0) is None  # per model
    assert s.note("m", 3, 6.0) is None  # said once
    assert s.note("m", 0, 8.0) is False  # one empty reading ends it
    assert s.note("m", 4, 10.0) is None  # and the clock starts again
    assert s.note("m", 4, 14.0) is True
