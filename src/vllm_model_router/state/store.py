"""Usage history that survives restarts: an embedded SQLite database (stdlib ``sqlite3``).

Per model: when it was last used, how many requests it got in each hour (Unix-time hour buckets), how
long its loads took and which failed; and the set of models that were resident at the last update (at
shutdown, the set to bring back).

    store = Store.open()                      # $ROUTER_STATE_DIR/state.db, or the XDG state directory
    store.record_request("llama", time.time())
    store.record_load("llama", 41.5, ok=True, at=time.time())
    store.set_resident(["llama"])
    store.last_used(), store.resident(), store.history("llama"), store.histories()
    store.close()

Costs and durability: ``record_request`` is called once per request, so it only counts in memory; the
counts reach the database in one transaction when ``flush_interval`` seconds or ``flush_every`` requests
have passed since the last flush (checked on each call), on ``flush()`` and on ``close()``. Call
``flush()`` from a periodic timer so that a quiet router writes too. Loads and the resident set are
rare and written at once. The database is in WAL mode (``synchronous=NORMAL``): a committed transaction
survives a crash of the process; a crash loses at most the requests counted since the last flush.

One ``Store`` belongs to one thread (the router's event loop). Several processes may open the same file;
writers wait up to ``busy_timeout`` seconds for each other.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger("vllm_model_router.store")

HOUR = 3600
SCHEMA_VERSION = 1
DB_NAME = "state.db"

_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS requests (
    model TEXT NOT NULL,
    hour INTEGER NOT NULL,           -- start of the hour bucket, Unix seconds (a multiple of 3600)
    count INTEGER NOT NULL,
    PRIMARY KEY (model, hour)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_used (
    model TEXT PRIMARY KEY,
    at REAL NOT NULL                 -- Unix seconds
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS loads (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    at REAL NOT NULL,                -- when the load finished, Unix seconds
    seconds REAL NOT NULL,
    ok INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS loads_by_model ON loads (model, at);
CREATE TABLE IF NOT EXISTS resident (
    model TEXT PRIMARY KEY,
    position INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""


def default_path(env: dict[str, str] | None = None) -> Path:
    """``$ROUTER_STATE_DIR/state.db``; else ``$XDG_STATE_HOME/vllm-model-router/state.db``; else
    ``~/.local/state/vllm-model-router/state.db``."""
    env = dict(os.environ) if env is None else env
    if env.get("ROUTER_STATE_DIR"):
        return Path(env["ROUTER_STATE_DIR"]).expanduser() / DB_NAME
    base = Path(env["XDG_STATE_HOME"]).expanduser() if env.get("XDG_STATE_HOME") else Path.home() / ".local" / "state"
    return base / "vllm-model-router" / DB_NAME


def hour_of(at: float) -> int:
    """The start of the hour bucket holding Unix time ``at``."""
    return math.floor(at / HOUR) * HOUR


@dataclass(frozen=True, slots=True)
class LoadRecord:
    at: float
    seconds: float
    ok: bool


@dataclass(frozen=True, slots=True)
class ModelHistory:
    model: str
    last_used: float | None  # Unix seconds; None: never used
    hourly: dict[int, int]  # hour bucket start (Unix seconds) -> requests in that hour
    loads: tuple[LoadRecord, ...] = ()  # oldest first

    @property
    def requests(self) -> int:
        return sum(self.hourly.values())

    @property
    def load_failures(self) -> int:
        return sum(1 for load in self.loads if not load.ok)

    @property
    def mean_load_seconds(self) -> float | None:
        """Mean duration of the successful loads (None: none yet)."""
        ok = [load.seconds for load in self.loads if load.ok]
        return sum(ok) / len(ok) if ok else None


class StoreError(RuntimeError):
    """The state database cannot be used (a newer schema, a file that is not a database)."""


class Store:
    def __init__(self, conn: sqlite3.Connection, path: str, *, flush_interval: float = 1.0,
                 flush_every: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self.flush_interval = flush_interval
        self.flush_every = flush_every
        self._clock = clock
        self._counts: dict[tuple[str, int], int] = {}  # (model, hour) -> requests not yet written
        self._last: dict[str, float] = {}  # model -> latest request time not yet written
        self._pending = 0
        self._last_flush = clock()

    # ------------------------------------------------------------------------------ opening, closing
    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None, *, flush_interval: float = 1.0,
             flush_every: int = 1000, busy_timeout: float = 5.0,
             clock: Callable[[], float] = time.monotonic) -> Store:
        """Open (creating it and its directory when missing) the database at ``path`` (default:
        ``default_path()``; ``":memory:"`` for a throwaway one)."""
        target = str(path) if path is not None else str(default_path())
        if target != ":memory:":
            Path(target).expanduser().parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            target = str(Path(target).expanduser())
        conn = sqlite3.connect(target, timeout=busy_timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(f"{target}: schema version {version} is newer than this router's ({SCHEMA_VERSION})")
            conn.executescript(_SCHEMA)  # one transaction: a second process may be creating it too
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"{target}: {e}") from e
        except BaseException:
            conn.close()
            raise
        return cls(conn, target, flush_interval=flush_interval, flush_every=flush_every, clock=clock)

    def close(self) -> None:
        """Write what is pending and close. Idempotent."""
        if self._conn is None:
            return
        try:
            self.flush()
        finally:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._conn is None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the store is closed")
        return self._conn

    # ------------------------------------------------------------------------------------- writing
    def record_request(self, model: str, at: float) -> None:
        """Count one request for ``model`` at Unix time ``at``. In memory; see the module notes."""
        self._db()  # a closed store refuses, rather than losing counts silently
        key = (model, hour_of(at))
        self._counts[key] = self._counts.get(key, 0) + 1
        if at > self._last.get(model, -math.inf):
            self._last[model] = at
        self._pending += 1
        if self._pending >= self.flush_every or self._clock() - self._last_flush >= self.flush_interval:
            try:
                self.flush()
            except sqlite3.OperationalError as e:  # locked by another process, disk full: keep counting
                log.warning("usage history not written yet (%s); %d requests pending", e, self._pending)

    def flush(self) -> None:
        """Write the counted requests in one transaction (nothing to do: no write)."""
        db = self._db()
        self._last_flush = self._clock()
        if not self._pending:
            return
        counts, last = self._counts, self._last
        with _transaction(db):
            db.executemany(
                "INSERT INTO requests (model, hour, count) VALUES (?, ?, ?) "
                "ON CONFLICT (model, hour) DO UPDATE SET count = count + excluded.count",
                [(model, hour, n) for (model, hour), n in counts.items()],
            )
            db.executemany(
                "INSERT INTO last_used (model, at) VALUES (?, ?) "
                "ON CONFLICT (model) DO UPDATE SET at = max(at, excluded.at)",
                list(last.items()),
            )
        self._counts, self._last, self._pending = {}, {}, 0

    def record_load(self, model: str, seconds: float, ok: bool, at: float) -> None:
        """A load of ``model`` finished at Unix time ``at`` after ``seconds`` (``ok``: it became ready)."""
        db = self._db()
        with _transaction(db):
            db.execute("INSERT INTO loads (model, at, seconds, ok) VALUES (?, ?, ?, ?)",
                       (model, at, seconds, int(ok)))

    def set_resident(self, models: Iterable[str], at: float | None = None) -> None:
        """Replace the resident set (in this order) with ``models``; ``at``: Unix time of the update."""
        db = self._db()
        names = list(dict.fromkeys(models))
        with _transaction(db):
            db.execute("DELETE FROM resident")
            db.executemany("INSERT INTO resident (model, position) VALUES (?, ?)",
                           [(m, i) for i, m in enumerate(names)])
            db.execute("INSERT INTO meta (key, value) VALUES ('resident_at', ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                       (repr(time.time() if at is None else at),))

    def prune(self, before: float) -> None:
        """Forget request counts and loads older than Unix time ``before`` (last-used times stay)."""
        self.flush()
        db = self._db()
        with _transaction(db):
            db.execute("DELETE FROM requests WHERE hour + ? <= ?", (HOUR, before))
            db.execute("DELETE FROM loads WHERE at < ?", (before,))

    # ------------------------------------------------------------------------------------- reading
    # Reads include what is still only counted in memory.
    def last_used(self) -> dict[str, float]:
        """Model -> Unix time of its latest request."""
        out = {m: float(at) for m, at in self._db().execute("SELECT model, at FROM last_used")}
        for m, at in self._last.items():
            out[m] = max(at, out.get(m, -math.inf))
        return out

    def resident(self) -> list[str]:
        """The models resident at the last ``set_resident``, in its order."""
        return [m for (m,) in self._db().execute("SELECT model FROM resident ORDER BY position")]

    def resident_at(self) -> float | None:
        """Unix time of the last ``set_resident`` (None: never)."""
        row = self._db().execute("SELECT value FROM meta WHERE key = 'resident_at'").fetchone()
        return float(row[0]) if row else None

    def models(self) -> list[str]:
        """Every model the store knows anything about, sorted."""
        rows = self._db().execute(
            "SELECT model FROM last_used UNION SELECT model FROM loads UNION SELECT model FROM requests")
        return sorted({m for (m,) in rows} | set(self._last))

    def history(self, model: str, since: float | None = None) -> ModelHistory:
        """Everything about ``model``; ``since``: only hour buckets and loads from that Unix time on."""
        db = self._db()
        lo = -math.inf if since is None else since
        hourly = {
            int(h): int(n)
            for h, n in db.execute(
                "SELECT hour, count FROM requests WHERE model = ? AND hour + ? > ? ORDER BY hour", (model, HOUR, lo))
        }
        for (m, h), n in self._counts.items():
            if m == model and h + HOUR > lo:
                hourly[h] = hourly.get(h, 0) + n
        row = db.execute("SELECT at FROM last_used WHERE model = ?", (model,)).fetchone()
        last = max(float(row[0]) if row else -math.inf, self._last.get(model, -math.inf))
        loads = tuple(
            LoadRecord(float(at), float(s), bool(ok))
            for at, s, ok in db.execute(
                "SELECT at, seconds, ok FROM loads WHERE model = ? AND at >= ? ORDER BY at, id", (model, lo))
        )
        return ModelHistory(model, None if last == -math.inf else last, dict(sorted(hourly.items())), loads)

    def histories(self, since: float | None = None) -> dict[str, ModelHistory]:
        """``history`` of every model the store knows."""
        return {m: self.history(m, since) for m in self.models()}


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception) on an autocommit connection."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
