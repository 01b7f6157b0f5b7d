"""The router's usage history: what was requested and loaded when, and what was resident.

It outlives the router in ``state_dir/state.db`` (a SQLite store, state/store.py), which gives a restart
its LRU order and, with ``restore``, the models to bring back; and it drives predictive preloading: when
the router is idle and has room, the model most likely to be requested next is loaded.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from pathlib import Path

from vllm_model_router.config import RouterConfig
from vllm_model_router.runtime.base import Pump
from vllm_model_router.scheduler import Preload, State
from vllm_model_router.state.lifecycle import EventKind, EventLog, LifecycleEvent
from vllm_model_router.state.predict import ranked_models
from vllm_model_router.state.store import Store

log = logging.getLogger("vllm_model_router.runtime")

# after these, what is resident may have changed: the usage history remembers it for ``restore``
_RESIDENCY_CHANGES = frozenset({EventKind.LOADED, EventKind.UNLOADED, EventKind.SLEPT, EventKind.WOKEN,
                                EventKind.EXITED})


class UsageRecorder:
    """Writes the usage history as lifecycle events happen, reads it back for a restart, and runs the
    predictive preload loop (named apart from ``state.predict.UsageHistory``, one model's history)."""

    PREDICT_INTERVAL = 5.0  # seconds between two looks for an idle moment with free capacity

    def __init__(self, config: RouterConfig, events: EventLog, pump: Pump) -> None:
        self.config = config
        self.events = events
        self._pump = pump
        self._lock: int | None = None  # flock on state.db.lock while this router owns the file
        self.store = self._open()
        self._task: asyncio.Task[None] | None = None
        events.add_listener(self._remember)

    def _open(self) -> Store:
        """The usage history in ``state_dir/state.db``, owned by one router at a time (a second router on the
        same state_dir keeps its history in memory, so the two never mix their LRU orders)."""
        if not self.config.state_dir:
            return Store.open(":memory:")
        directory = Path(self.config.state_dir).expanduser()
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(directory / "state.db.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            log.warning("Usage history not persisted: cannot use %s (%s)", directory, e)
            return Store.open(":memory:")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.warning("Usage history not persisted: another router uses %s", directory)
            return Store.open(":memory:")
        self._lock = fd
        try:
            return Store.open(directory / "state.db")
        except Exception as e:  # a broken file must not stop the router
            log.warning("Usage history not persisted: %s", e)
            return Store.open(":memory:")

    def last_used(self, loop_now: float) -> dict[str, float]:
        """When each model was last used, on the event loop's clock (the scheduler's)."""
        wall_now = time.time()
        return {n: loop_now - (wall_now - at) for n, at in self.store.last_used().items() if at <= wall_now}

    def to_restore(self) -> list[str]:
        """With ``restore``: the configured models that were resident when the last run ended."""
        if not self.config.restore:
            return []
        return [n for n in self.store.resident() if n in self.config.models]

    def record_request(self, model: str) -> None:
        self.store.record_request(model, time.time())

    def _remember(self, event: LifecycleEvent) -> None:
        """Usage history for restarts and predictions: loads, and what is resident (not while shutting
        down: ``restore`` brings back what was resident before the stop)."""
        if event.model is None or self.store.closed:
            return
        if event.kind in (EventKind.LOADED, EventKind.LOAD_FAILED):
            seconds = event.data.get("seconds")
            self.store.record_load(event.model, float(seconds) if isinstance(seconds, int | float) else 0.0,
                                   event.kind is EventKind.LOADED, event.time)
        if event.kind in _RESIDENCY_CHANGES and not self._pump.closing:
            self.store.set_resident(self._pump.resident())

    # ------------------------------------------------------- predictive preload
    def start(self) -> None:
        if self.config.preload_predicted or any(m.preload == "predicted" for m in self.config.models.values()):
            self._task = asyncio.get_running_loop().create_task(self._predict_loop(), name="predictive-preload")

    def predicted_candidates(self) -> list[str]:
        eligible = {n for n, m in self.config.models.items()
                    if not m.is_adapter and (self.config.preload_predicted or m.preload == "predicted")}
        return [n for n in ranked_models(self.store.histories(), time.time()) if n in eligible]

    async def _predict_loop(self) -> None:
        """When the router is idle and has room, load the model most likely to be requested next."""
        while True:
            await asyncio.sleep(self.PREDICT_INTERVAL)
            try:
                views = self._pump.views()
                busy = any(v.in_flight or v.waiting or v.state in (State.LOADING, State.UNLOADING, State.WAKING)
                           for v in views)
                if busy:
                    continue
                states = {v.name: v.state for v in views}
                for name in self.predicted_candidates():
                    if states.get(name) in (State.UNLOADED, State.FAILED, State.SLEEPING):
                        log.info("Preloading model %s: most likely to be requested next", name)
                        self.events.emit(EventKind.PRELOAD, name, "predicted from usage history")
                        self._pump.submit(Preload(name))  # only if it fits without evicting anything
                        break
                    if states.get(name) is State.LOADED:
                        continue
            except Exception:
                log.exception("predictive preload failed")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def close(self) -> None:
        """Flush and close the store, and give up ``state_dir`` (the flock)."""
        self.stop()
        self.store.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
