"""A model server writes its output to a size-bounded file, which the process driver follows."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

from tests.harness import FAKE_ENGINE, assert_no_processes_left, router_data
from vllm_model_router.config import build_config
from vllm_model_router.drivers.process import LOG_LINES, ProcessDriver

# the fake engine, next to a loop printing numbered lines of 210 bytes as fast as every 2 ms
_SPEWER = textwrap.dedent("""
    import subprocess, sys, time
    engine = subprocess.Popen(sys.argv[1:])
    i = 0
    while engine.poll() is None:
        i += 1
        print(f"spew {i:08d} " + "." * 195, flush=True)
        time.sleep(0.002)
""")
MAX_BYTES = 64 * 1024


def numbers(lines: list[str]) -> list[int]:
    return [int(ln.split()[1]) for ln in lines if ln.startswith("spew ")]


def driver_for(models: dict[str, dict[str, object]], marker: str, log_dir: Path | None) -> ProcessDriver:
    config = build_config(router_data(models, marker), env={}, source="<test>")
    return ProcessDriver(config.models, log_dir=log_dir, max_log_bytes=MAX_BYTES)


async def test_a_busy_servers_file_stays_bounded_and_is_followed_across_rotations(tmp_path: Path, marker: str) -> None:
    script = tmp_path / "spew.py"
    script.write_text(_SPEWER)
    driver = driver_for({"m": {"cmd": [sys.executable, str(script), *FAKE_ENGINE], "stop_timeout": 1}}, marker,
                        tmp_path / "logs")
    path = driver.log_file("m")
    assert path == tmp_path / "logs" / "m.log"
    sizes: list[int] = []
    try:
        await driver.start("m")
        for _ in range(16):  # what is tested: the file's size, sampled every 0.25 s while the server spews
            await asyncio.sleep(0.25)
            sizes.append(path.stat().st_size)
    finally:
        await driver.close()
        await assert_no_processes_left(marker)
    seen = numbers(driver.logs("m", LOG_LINES))
    written = numbers(path.read_text().splitlines())
    rotated = path.with_name("m.log.1")
    assert max(sizes) < 3 * MAX_BYTES, sizes  # bounded (a poll interval's output over the limit at most)
    assert MAX_BYTES < rotated.stat().st_size < 3 * MAX_BYTES
    assert seen == sorted(set(seen))  # in order, none twice
    assert seen[-1] > 2 * (2 * MAX_BYTES) // 210  # more than the two files hold: it went on after truncations
    assert not written or seen[-1] == written[-1]  # the final lines were read after the exit
    missing = seen[-1] - seen[0] + 1 - len(seen)
    assert missing <= len(seen) // 100, f"{missing} of {seen[-1] - seen[0] + 1} lines lost"


async def test_without_a_log_directory_the_files_are_private_and_removed_at_close(tmp_path: Path,
                                                                                  marker: str) -> None:
    driver = driver_for({"m": {"cmd": [*FAKE_ENGINE], "stop_timeout": 1}}, marker, None)
    try:
        await driver.start("m")
        path = driver.log_file("m")
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert "Application startup complete." in path.read_text()
        assert any("Application startup complete." in ln for ln in driver.logs("m", 100))
    finally:
        await driver.close()
        await assert_no_processes_left(marker)
    assert not path.parent.exists()
