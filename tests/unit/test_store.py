"""The usage-history store: SQLite in WAL mode, per-request writes batched, state that survives a crash."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vllm_model_router.state.store import HOUR, LoadRecord, Store, StoreError, default_path, hour_of

T0 = 1_795_000_000.0  # a Unix time; hour_of(T0) is the start of its hour bucket
H0 = hour_of(T0)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_default_path_follows_the_environment(tmp_path: Path) -> None:
    assert default_path({"ROUTER_STATE_DIR": str(tmp_path)}) == tmp_path / "state.db"
    assert default_path({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "vllm-model-router" / "state.db"
    assert default_path({}) == Path.home() / ".local" / "state" / "vllm-model-router" / "state.db"


def test_open_creates_the_directory_in_wal_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_STATE_DIR", str(tmp_path / "state"))
    with Store.open() as s:
        assert Path(s.path) == tmp_path / "state" / "state.db"
        assert Path(s.path).exists()
    conn = sqlite3.connect(tmp_path / "state" / "state.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_requests_are_counted_per_hour_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    s = Store.open(path, flush_interval=3600.0, clock=Clock())
    for dt in (0.0, 10.0, 20.0):
        s.record_request("a", H0 + dt)
    s.record_request("a", H0 + HOUR + 5)
    s.record_request("b", H0 - 1)
    # reads see what is not written yet
    assert s.last_used() == {"a": H0 + HOUR + 5, "b": H0 - 1}
    assert s.history("a").hourly == {H0: 3, H0 + HOUR: 1}
    s.close()
    s.close()  # idempotent
    with Store.open(path) as again:
        assert again.last_used() == {"a": H0 + HOUR + 5, "b": H0 - 1}
        h = again.history("a")
        assert h.hourly == {H0: 3, H0 + HOUR: 1} and h.requests == 4 and h.last_used == H0 + HOUR + 5
        assert again.history("b").hourly == {H0 - HOUR: 1}
        assert again.models() == ["a", "b"]
        # counts add up across runs, last_used only moves forward
        again.record_request("a", H0 + 30)
        again.flush()
        assert again.history("a").hourly[H0] == 4
        assert again.last_used()["a"] == H0 + HOUR + 5


def test_writes_are_batched_by_count_and_by_time(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "s.db"
    s = Store.open(path, flush_interval=1.0, flush_every=3, clock=clock)
    reader = sqlite3.connect(path)

    def written() -> int:
        return int(reader.execute("SELECT coalesce(sum(count), 0) FROM requests").fetchone()[0])

    s.record_request("a", T0)
    s.record_request("a", T0)
    assert written() == 0
    s.record_request("a", T0)  # the third: flush_every
    assert written() == 3
    s.record_request("a", T0)
    assert written() == 3
    clock.t = 1.5  # flush_interval passed: the next request writes
    s.record_request("a", T0)
    assert written() == 5
    s.record_request("a", T0)
    s.flush()
    assert written() == 6
    reader.close()
    s.close()


def test_loads_and_failures(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as s:
        s.record_load("a", 40.0, True, T0)
        s.record_load("a", 5.0, False, T0 + 100)
        s.record_load("a", 44.0, True, T0 + 200)
        s.record_load("b", 3.0, True, T0)
        h = s.history("a")
        assert h.loads == (LoadRecord(T0, 40.0, True), LoadRecord(T0 + 100, 5.0, False),
                           LoadRecord(T0 + 200, 44.0, True))
        assert h.load_failures == 1 and h.mean_load_seconds == 42.0
        assert h.last_used is None and h.hourly == {}
        assert s.history("a", since=T0 + 50).loads[0].at == T0 + 100
        assert s.history("never").mean_load_seconds is None
        assert set(s.histories()) == {"a", "b"}


def test_resident_set(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store.open(path) as s:
        assert s.resident() == [] and s.resident_at() is None
        s.set_resident(["b", "a", "b"], at=T0)
        assert s.resident() == ["b", "a"] and s.resident_at() == T0
        s.set_resident(["c"], at=T0 + 1)
    with Store.open(path) as s:
        assert s.resident() == ["c"] and s.resident_at() == T0 + 1
        s.set_resident([])
        assert s.resident() == []


def test_prune_forgets_old_counts_and_loads(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as s:
        s.record_request("a", H0 - 10 * HOUR)
        s.record_request("a", H0 + 5)
        s.record_load("a", 1.0, True, H0 - 10 * HOUR)
        s.prune(H0)
        h = s.history("a")
        assert h.hourly == {H0: 1} and h.loads == () and h.last_used == H0 + 5


def test_flushed_state_survives_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    code = textwrap.dedent(f"""
        import os
        from vllm_model_router.state.store import Store
        s = Store.open({str(path)!r}, flush_interval=3600.0)
        s.record_request("a", {T0})
        s.record_request("a", {T0})
        s.record_load("a", 12.0, True, {T0})
        s.set_resident(["a"], at={T0})
        s.flush()
        s.record_request("a", {T0})  # counted, never written: lost in the crash
        os._exit(9)  # no close, no checkpoint
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert Path(f"{path}-wal").exists()  # the data is in the write-ahead log, not checkpointed yet
    with Store.open(path) as s:
        h = s.history("a")
        assert h.hourly == {hour_of(T0): 2}
        assert h.loads == (LoadRecord(T0, 12.0, True),)
        assert s.resident() == ["a"]


def test_two_stores_on_one_file_add_up(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store.open(path) as one, Store.open(path) as two:
        one.record_request("a", T0)
        two.record_request("a", T0 + 1)
        one.flush()
        two.flush()
        assert one.history("a").hourly == {hour_of(T0): 2}
        assert one.last_used() == {"a": T0 + 1}


def test_bad_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, not at all" * 100)
    with pytest.raises(StoreError):
        Store.open(junk)
    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store.open(newer)


def test_a_closed_store_refuses_use() -> None:
    s = Store.open(":memory:")
    s.record_request("a", T0)
    s.close()
    assert s.closed
    with pytest.raises(StoreError):
        s.last_used()


def test_a_closed_store_refuses_requests_too() -> None:
    s = Store.open(":memory:")
    s.close()
    with pytest.raises(StoreError):
        s.record_request("a", T0)
