"""The parts of the test harness that other tests take on trust: the event-stream parser and the process
table."""

from __future__ import annotations

import os

from tests.harness import alive, environ, processes, sse, state


def test_events_are_parsed_as_a_browser_parses_them() -> None:
    body = (b"retry: 2000\n\n"  # no data: no event
            b": keep-alive\n"
            b"id: 7\nevent: loaded\ndata: {\"model\": \"m\"}\n\n"
            b"data: first line\r\ndata:second line\n\n"
            b"data: [DONE]")  # cut off before its blank line: still reported
    events = sse.parse(body)
    assert [(e.id, e.event, e.data) for e in events] == [
        ("7", "loaded", '{"model": "m"}'), (None, None, "first line\nsecond line"), (None, None, "[DONE]")]
    assert events[0].json() == {"model": "m"}
    assert events[0].arrived <= events[1].arrived <= events[2].arrived


def test_the_process_table_sees_this_process_family_but_not_itself() -> None:
    assert alive(os.getpid()) and state(os.getpid()) in ("R", "S")
    assert not alive(2**22 + 1) and state(2**22 + 1) is None  # beyond pid_max: no such process
    assert os.getpid() not in {p.pid for p in processes()}
    parent = next(p for p in processes() if p.pid == os.getppid())
    assert parent.environ and parent.cmdline
    assert environ(os.getpid()) is not None
