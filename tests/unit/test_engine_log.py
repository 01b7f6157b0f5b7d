"""Model server output files: safe names, following, and the copy-truncate size bound."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vllm_model_router.drivers.engine_log import MAX_LINE, LogFollower, log_path, open_for_server


def write(fd: int, text: str) -> None:
    os.write(fd, text.encode())


@pytest.mark.parametrize("name", ["llama-3.1_8b", "Qwen2.5-7B"])
def test_a_plain_model_name_is_the_file_name(tmp_path: Path, name: str) -> None:
    assert log_path(tmp_path, name) == tmp_path / f"{name}.log"


def test_no_model_name_leaves_the_directory_or_shares_a_file(tmp_path: Path) -> None:
    names = ["../../etc/passwd", "..", ".", "", "a/b", "a_b", ".hidden", "/abs", "x" * 400, "ünï cödé", "a\0b"]
    paths = [log_path(tmp_path, n) for n in names]
    for name, path in zip(names, paths, strict=True):
        assert path.parent == tmp_path, name
        assert path.name.endswith(".log") and not path.name.startswith("."), name
        assert len(path.name.encode()) <= 255, name
    assert len(set(paths)) == len(names)
    assert log_path(tmp_path, "a_b") == tmp_path / "a_b.log"  # only "a/b" is renamed


def test_the_follower_starts_at_the_end_and_reads_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    fd = open_for_server(path)
    write(fd, "from an earlier run\n")
    follower = LogFollower(path)
    assert follower.read() == []
    write(fd, "one\ntw")
    assert follower.read() == ["one"]
    write(fd, "o\r\nthree")
    assert follower.read() == ["two"]
    assert follower.finish() == ["three"]  # the server is gone: the unfinished line is all there is
    write(fd, "x" * (MAX_LINE * 2 + 5))
    assert [len(ln) for ln in follower.read()] == [MAX_LINE, MAX_LINE]
    follower.close()
    os.close(fd)


def test_recent_lines_are_what_was_printed_before_a_follower_came(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    fd = open_for_server(path)
    write(fd, "".join(f"line {i}\n" for i in range(100)) + "half")
    follower = LogFollower(path)
    assert follower.recent_lines(3) == ["line 97", "line 98", "line 99"]
    write(fd, " done\n")
    assert follower.read() == ["half done"]  # the line being written is read whole, once
    follower.close()
    os.close(fd)


def test_the_file_is_rotated_and_stays_bounded_and_following_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    fd = open_for_server(path)
    follower = LogFollower(path, max_bytes=4096)
    seen: list[str] = []
    for i in range(2000):
        write(fd, f"line {i:05d} {'.' * 40}\n")
        if i % 7 == 0:
            seen += follower.read()
            assert path.stat().st_size <= 4096 + 8 * 52
    seen += follower.read()
    assert seen == [f"line {i:05d} {'.' * 40}" for i in range(2000)]  # nothing lost, nothing twice
    rotated = path.with_name("m.log.1")
    assert 4096 < rotated.stat().st_size <= 4096 + 8 * 52
    assert rotated.read_bytes().startswith(b"line ") and b"\0" not in rotated.read_bytes()
    write(fd, "after\n")  # appending: the server's next write lands at the start, no hole of zeros
    assert path.read_bytes().endswith(b"after\n") and b"\0" not in path.read_bytes()
    assert follower.read() == ["after"]
    follower.close()
    os.close(fd)


def test_a_truncation_by_someone_else_restarts_the_follower_at_the_start(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    fd = open_for_server(path)
    follower = LogFollower(path)
    write(fd, "a fairly long first line\nand a half")
    assert follower.read() == ["a fairly long first line"]
    os.truncate(path, 0)
    write(fd, "new\n")
    assert follower.read() == ["and a half", "new"]
    follower.close()
    os.close(fd)


def test_a_symbolic_link_is_never_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("keep\n")
    (tmp_path / "m.log").symlink_to(elsewhere)
    with pytest.raises(OSError):
        open_for_server(tmp_path / "m.log")
    assert elsewhere.read_text() == "keep\n"


def test_without_room_for_the_copy_the_file_is_truncated_all_the_same(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    (tmp_path / "m.log.1.tmp").mkdir()  # where the copy would be made: it cannot be
    fd = open_for_server(path)
    follower = LogFollower(path, max_bytes=100)
    write(fd, "x" * 150 + "\n")
    assert follower.read() == ["x" * 150]
    assert path.stat().st_size == 0 and not (tmp_path / "m.log.1").exists()
    write(fd, "on\n")
    assert follower.read() == ["on"]
    follower.close()
    os.close(fd)
