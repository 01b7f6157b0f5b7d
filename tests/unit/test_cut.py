"""``Cut``: a request waiting on a server that is gone is cut loose, and only that: a client that left (or a
shutdown cutting requests off) at the same moment still ends the request as a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from vllm_model_router.http.cut import Cut, Unreachable


async def _waiting_on_the_server(ready: asyncio.Event, cuts: list[Cut]) -> str:
    """What the proxy does while the answer's head has not come: wait; a cancellation that is the cut's
    becomes Unreachable (planned again), any other stays a cancellation."""
    task = asyncio.current_task()
    cut = Cut(task)
    cuts.append(cut)
    ready.set()
    try:
        await asyncio.get_running_loop().create_future()  # the server never answers
    except asyncio.CancelledError:
        if not cut.caught():
            raise
        raise cut.unreachable("model a's server") from None
    return "answered"


async def _start() -> tuple[asyncio.Task[str], Cut]:
    ready, cuts = asyncio.Event(), []
    task = asyncio.create_task(_waiting_on_the_server(ready, cuts))
    await ready.wait()
    return task, cuts[0]


async def test_a_cut_alone_is_taken_back_and_becomes_unreachable() -> None:
    task, cut = await _start()
    cut.fire("its Ray actor on node n died\nmore lines")
    with pytest.raises(Unreachable, match=r"model a's server is gone: its Ray actor on node n died$"):
        await task
    assert task.cancelling() == 0


@pytest.mark.parametrize("first", ["client", "cut"])
async def test_a_client_that_left_at_the_same_moment_is_not_planned_again(first: str) -> None:
    task, cut = await _start()
    if first == "client":
        task.cancel()  # aiohttp cancels the handler when its client goes away
        cut.fire("its Ray actor on node n died")
    else:
        cut.fire("its Ray actor on node n died")
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancellation_of_someone_elses_is_not_taken() -> None:
    task, cut = await _start()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cut.reason is None
    cut.fire("late: the request is over")  # after the end: nothing to cut


def test_a_cut_with_no_reason_to_give_still_says_what_is_gone() -> None:
    cut = Cut(None)
    cut.fire("")
    assert cut.unreachable("model a's server").message == "model a's server is gone: "
