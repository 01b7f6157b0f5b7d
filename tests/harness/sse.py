"""Server-sent events, read the way a browser's EventSource reads them (the WHATWG rules): ``field: value``
lines, an event ends at a blank line, ``data`` lines join with newlines, comments and events without data
are skipped. Each event carries the time its last line arrived, for tests about when chunks came.

One difference from a browser: an event cut off before its blank line is still reported at the end of
the stream, since a test wants to see what arrived before a server died.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Event:
    data: str
    event: str | None = None  # the ``event:`` field; None for a plain message
    id: str | None = None
    arrived: float = 0.0  # time.monotonic() when its last line came

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Parser:
    """Feed it lines (bytes, with or without their line ending); it hands back each event when complete."""

    _data: list[str] = field(default_factory=list)
    _event: str | None = None
    _id: str | None = None
    _arrived: float = 0.0

    def feed(self, line: bytes) -> Event | None:
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        self._arrived = time.monotonic()
        if not text:
            return self._dispatch()
        if text.startswith(":"):
            return None  # a comment (a keep-alive)
        name, _, value = text.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None  # "retry" and unknown fields do not make an event

    def flush(self) -> Event | None:
        """The event the stream ended in the middle of, if it had data."""
        return self._dispatch()

    def _dispatch(self) -> Event | None:
        event = Event("\n".join(self._data), self._event, self._id, self._arrived) if self._data else None
        self._data, self._event, self._id = [], None, None
        return event


def iter_events(lines: Iterable[bytes]) -> Iterator[Event]:
    """The events in ``lines`` (a blocking stream: a file, ``http.client``'s response, a list)."""
    parser = Parser()
    for line in lines:
        if (event := parser.feed(line)) is not None:
            yield event
    if (event := parser.flush()) is not None:
        yield event


def parse(body: bytes) -> list[Event]:
    """The events in a stream read whole."""
    return list(iter_events(body.splitlines(keepends=True)))


class LineReader(Protocol):
    async def readline(self) -> bytes: ...


async def aiter_events(content: LineReader) -> AsyncGenerator[Event, None]:
    """The events of an aiohttp response body (``resp.content``) as they arrive."""
    parser = Parser()
    while line := await content.readline():
        if (event := parser.feed(line)) is not None:
            yield event
    if (event := parser.flush()) is not None:
        yield event
