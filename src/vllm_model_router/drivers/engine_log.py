"""Model server output files: a server's stdout and stderr go to ``<directory>/<model>.log``, which the
router follows.

A file, unlike a pipe, outlives the router: after a router crash, a server it started keeps writing
(a pipe whose reader is gone fails its writes with EPIPE, or kills a shell wrapper with SIGPIPE), and the
next router, adopting the server, follows the same file. The server's descriptor is opened with
``O_APPEND``, so the size is bounded copy-truncate style: once the file exceeds ``max_bytes``, the
follower copies it to ``<model>.log.1`` and truncates it, and the server's next write lands at the new
end (offset 0) instead of leaving a hole. What the server writes in the instant between the copy and the
truncation is lost: the price of never having to tell the server to reopen its output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import BinaryIO

MAX_LOG_BYTES = 10 * 1024 * 1024  # per file; with the one rotated copy, a model's output takes twice this
READ_CHUNK = 1024 * 1024  # read at most this much per call, so that a burst never blocks the event loop long
MAX_LINE = 65536  # a longer line is cut into pieces of this size
BACKLOG_BYTES = 256 * 1024  # how far back recent_lines looks
_NAME_MAX = 200  # bytes of file name taken from the model name (a file name may have 255)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def log_path(directory: Path, model: str) -> Path:
    """``directory/<model>.log``. A model name that is not a plain, short file name (``/``, ``..``, a
    leading dot, any other character) has those characters replaced and a hash of the name appended, so
    that the file stays inside ``directory`` and two models never share one."""
    safe = _UNSAFE.sub("_", model)
    if safe != model or safe.startswith(".") or not safe or len(safe) > _NAME_MAX:
        digest = hashlib.sha256(model.encode()).hexdigest()[:12]
        safe = f"{safe.lstrip('.')[:_NAME_MAX]}-{digest}"
    return directory / f"{safe}.log"


def open_for_server(path: Path) -> int:
    """A descriptor for the server's stdout and stderr (the caller closes it once the server has it).
    Appending, so that after a truncation the next write starts at offset 0; never through a symbolic
    link, so that a planted link cannot redirect the output elsewhere."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


class LogFollower:
    """Reads the lines a server appends to its log file, from the file's end at the time it is opened,
    and keeps the file under ``max_bytes`` (see the module docstring). The file must exist.

    The follower keeps its own descriptor: if the file is removed or renamed, it follows the file the
    server still writes to."""

    def __init__(self, path: Path, max_bytes: int = MAX_LOG_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        # read-write only to truncate it; the follower never writes through it
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        self._offset = os.fstat(self._fd).st_size
        self._pending = b""  # the start of a line whose end is not written yet
        self.behind = False  # read stopped at READ_CHUNK with more to read

    def recent_lines(self, n: int) -> list[str]:
        """The last ``n`` complete lines written so far; a line not finished yet is read later, whole."""
        start = max(0, self._offset - BACKLOG_BYTES)
        data = os.pread(self._fd, self._offset - start, start)
        end = data.rfind(b"\n") + 1
        self._offset = start + end
        lines = data[:end].split(b"\n")[:-1]
        if start > 0 and lines:
            lines = lines[1:]  # cut at its start
        return [_decode(ln) for ln in lines[-n:]] if n > 0 else []

    def read(self) -> list[str]:
        """The lines completed since the last call (at most READ_CHUNK bytes of them: ``behind`` tells
        whether more is waiting). Restarts from offset 0 when the file has shrunk (truncated), and
        rotates the file once it is read up to beyond ``max_bytes``."""
        size = os.fstat(self._fd).st_size
        lines: list[str] = []
        if size < self._offset:  # truncated behind our back: the server writes at the new end
            lines += self.finish()
            self._offset = 0
        data = os.pread(self._fd, min(READ_CHUNK, size - self._offset), self._offset)
        self._offset += len(data)
        lines += self._split(data)
        self.behind = self._offset < size
        if not self.behind and self._offset > self.max_bytes:
            lines += self._rotate()
        return lines

    def finish(self) -> list[str]:
        """The unfinished last line, if any (the server has exited: nothing will complete it)."""
        rest, self._pending = self._pending, b""
        return [_decode(rest)] if rest else []

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _split(self, data: bytes) -> list[str]:
        *complete, self._pending = (self._pending + data).split(b"\n")
        lines = [_decode(ln) for ln in complete]
        while len(self._pending) > MAX_LINE:
            lines.append(_decode(self._pending[:MAX_LINE]))
            self._pending = self._pending[MAX_LINE:]
        return lines

    def _rotate(self) -> list[str]:
        """Copy the file to ``<name>.1``, truncate it right after the copy has read its last byte, and
        return the lines written after the last read (they are in the copy; only the follower had not seen
        them). When no copy can be made (disk full), the file is truncated all the same: the bound matters
        more than old output."""
        target = self.path.with_name(self.path.name + ".1")
        tmp = target.with_name(target.name + ".tmp")
        out = _create(tmp)
        unseen = bytearray()
        copied, limit = 0, 2 * max(self._offset, READ_CHUNK)  # a writer faster than the copy cannot hold it
        try:
            while copied < limit and (chunk := os.pread(self._fd, READ_CHUNK, copied)):
                if copied + len(chunk) > self._offset:
                    unseen += chunk[max(0, self._offset - copied) :]
                copied += len(chunk)
                out = _write(out, chunk)
            os.ftruncate(self._fd, 0)  # at once: what is written from the copy's end to here is lost
        finally:
            copy_made = _close(out)
        self._offset = 0
        with contextlib.suppress(OSError):
            if copy_made:
                os.replace(tmp, target)
            else:
                tmp.unlink()
        return self._split(bytes(unseen))


def _create(path: Path) -> BinaryIO | None:
    """A new file at ``path`` (replacing a leftover one, never through a symbolic link); None if it cannot
    be made."""
    with contextlib.suppress(OSError):
        path.unlink()
    try:
        return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600), "wb")
    except OSError:
        return None


def _write(out: BinaryIO | None, data: bytes) -> BinaryIO | None:
    """``out`` after writing ``data`` to it; None (and ``out`` closed) once a write fails."""
    if out is None:
        return None
    try:
        out.write(data)
    except OSError:
        _close(out)
        return None
    return out


def _close(out: BinaryIO | None) -> bool:
    """Close ``out``; True when it was open and all written to it is in the file."""
    if out is None:
        return False
    try:
        out.close()
    except OSError:
        return False
    return True


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r")
