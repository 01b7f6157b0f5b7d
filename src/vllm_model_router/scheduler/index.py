# Longer than 400 lines because the index and the scanning reference the property tests hold it to must
# answer the same questions side by side: a question added to one is added to the other in the same place.
"""The model table's indexes: which models are in which state, which hold capacity in which domain, and
which adapters sit on which base.

Every step of the planning pass asks one of these questions, after every event. Answered by scanning
the table, a pass costs time in proportion to the number of configured models (and, for the domains, to
their square), which a zoo of hundreds of adapters makes the router's bottleneck. The index answers them
in proportion to the answer instead. It mirrors ``ModelRecord.state``: ``Residency._set_state`` (and
``_add``) tell it every move, and nothing else changes a state.

Planning a load asks two more: "does it fit next to everything in its domain?" and "which idle models,
least recently used first, would make room?". The index keeps each domain's totals (``Usage``: how many
count against ``max_resident``, the memory per pool and per GPU, now and once what is on its way out has
gone), so the first costs the same at any size; and each domain's loaded and sleeping models sorted in
eviction order, so the second reads only as many candidates as it needs. A model's share is taken from
its ``placed`` and ``asleep_level`` when it moves, so those are set before ``_set_state``; a use
(``used``) moves it in the eviction order the next time the order is read.

``ScanningIndex`` answers the same questions by scanning the table: the reference the property tests
hold the index to.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Collection, Iterable, KeysView, Mapping, Sequence

from vllm_model_router.scheduler.eviction import Occupant, Usage
from vllm_model_router.scheduler.records import ModelRecord
from vllm_model_router.scheduler.states import HOLDS_CAPACITY, State, holds_residue_only

LruKey = tuple[bool, int, float, float, int, str]

TIMED = frozenset({State.LOADED, State.SLEEPING})
"""Where a model's ttl clock may run (see ``Residency._ttl_applies``)."""


def holds_capacity(m: ModelRecord) -> bool:
    """Counted against its domain's budget: managed by the router and holding memory."""
    return not m.spec.external and m.state in HOLDS_CAPACITY


def occupant(m: ModelRecord) -> Occupant:
    """What ``m`` holds in its domain: its memory and a place against the count, or a sleeper's residue."""
    if holds_residue_only(m.state, m.asleep_level):
        return Occupant(m.name, m.spec.sleeping_gb, m.placed, counts=False)
    return Occupant(m.name, m.memory_gb, m.placed)


def staying_occupant(m: ModelRecord) -> Occupant | None:
    """What ``m`` will still hold once what is already on its way out is gone: nothing when it is stopping,
    its residue when it is falling asleep."""
    if m.state is State.UNLOADING:
        return None
    if m.state is State.FALLING_ASLEEP:
        return Occupant(m.name, m.spec.sleeping_gb, m.placed, counts=False)
    return occupant(m)


def lru_key(m: ModelRecord) -> LruKey:
    """Eviction order: extra replicas first (a newcomer takes an idle extra copy before anything else), then
    lower priority first, then least recently used (the table order breaks ties)."""
    return (not m.extra, m.spec.priority, m.last_used, m.since, m.order, m.name)


def has_idle_clock(m: ModelRecord) -> bool:
    """Whether ``m`` may ever be stopped for idleness: it has a ttl, or it is a replica (an extra copy is
    stopped after ``replica_idle``)."""
    return m.spec.ttl > 0 or m.spec.group is not None


LRU_STATES = (State.LOADED, State.SLEEPING)
"""The states eviction picks from, each kept in eviction order per domain."""


def freeable(m: ModelRecord) -> float:
    """The most evicting ``m`` could free on each of its GPUs now: all it holds if it is a top-level model,
    loaded and idle or asleep, not pinned. A bound (hot models count; a sleep frees less than a stop)."""
    if m.base is not None or m.pinned or not m.placed or not holds_capacity(m):
        return 0.0
    if m.state is State.SLEEPING or (m.state is State.LOADED and not m.in_flight):
        return occupant(m).memory_gb
    return 0.0


def in_table_order(models: Collection[ModelRecord]) -> list[ModelRecord]:
    """Configuration order: the order a scan of the table visits models in, and so the order of the
    effects a step emits for several models."""
    return sorted(models, key=lambda m: m.order)


class ModelIndex:
    """The answers, kept up to date on every move."""

    def __init__(self) -> None:
        self._by_state: dict[State, dict[str, ModelRecord]] = {s: {} for s in State}
        self._units: dict[State, dict[str, ModelRecord]] = {s: {} for s in State}  # units of replicated models
        self._holders: dict[str | None, dict[str, ModelRecord]] = {None: {}}
        self._holders_sorted: dict[str | None, list[ModelRecord]] = {}  # cached table order; dropped on change
        self._holder_counts: dict[tuple[str | None, State], int] = {}  # (domain, state) -> how many hold
        self._holder_gb: dict[tuple[str | None, State], float] = {}  # (domain, state) -> their memory_gb
        self._adapter_counts: dict[tuple[str, State], int] = {}  # (base, state) -> how many of its adapters
        self._timed: dict[str, ModelRecord] = {}  # loaded or asleep, with a ttl: whose ttl clock may run
        self._adapters: dict[str, list[ModelRecord]] = {}
        self._bases: dict[str, ModelRecord] = {}  # models with adapters, in table order
        # what the holders of each domain hold in total, now and once what is on its way out is gone
        self._held: dict[str | None, Usage] = {}
        self._staying: dict[str | None, Usage] = {}
        self._occupants: dict[str, tuple[Occupant, Occupant | None]] = {}  # what each holder was counted as
        # (domain, loaded or sleeping) -> its holders' eviction keys, sorted; and each one's current key
        self._lru: dict[tuple[str | None, State], list[LruKey]] = {}
        self._lru_gpu: dict[tuple[str | None, State, int], list[LruKey]] = {}  # the same, per GPU it is placed on
        self._lru_key: dict[str, LruKey] = {}
        self._stale: set[str] = set()  # used since their key was filed: refiled when the order is next read
        self._records: dict[str, ModelRecord] = {}
        self.version = 0  # bumped by every move and rekey: what step 4 read is unchanged while it is
        # per GPU, what evicting each model there could free at most (``freeable``), sorted; what each was
        # counted for
        self._freeable_each: dict[int, list[float]] = {}
        self._freeable_wide: dict[int, int] = {}  # per GPU, how many of those are on other GPUs too
        self._freeable_of: dict[str, tuple[tuple[int, ...], float]] = {}

    # ------------------------------------------------------------------ upkeep
    def added(self, m: ModelRecord, base: ModelRecord | None) -> None:
        self.version += 1
        if base is not None:
            self._adapters.setdefault(base.name, []).append(m)
            self._bases[base.name] = base
            self._holders.setdefault(base.name, {})
        self._enter(m)

    def moving(self, m: ModelRecord) -> None:
        """``m`` is about to change state: forget where it is now (``moved`` files it again)."""
        self._unfree(m)
        del self._by_state[m.state][m.name]
        self._units[m.state].pop(m.name, None)
        if m.base is not None:
            self._adapter_counts[m.base, m.state] -= 1
        if holds_capacity(m):
            del self._holders[m.base][m.name]
            self._holders_sorted.pop(m.base, None)
            self._holder_counts[m.base, m.state] -= 1
            self._holder_gb[m.base, m.state] -= m.memory_gb
            held, staying = self._occupants.pop(m.name)
            self._held[m.base].remove(held)
            if staying is not None:
                self._staying[m.base].remove(staying)
            key = self._lru_key.pop(m.name, None)
            self._stale.discard(m.name)
            if key is not None:
                keys = self._lru[m.base, m.state]
                del keys[bisect_left(keys, key)]
                for g in m.placed:
                    keys = self._lru_gpu[m.base, m.state, g]
                    del keys[bisect_left(keys, key)]
        self._timed.pop(m.name, None)

    def moved(self, m: ModelRecord) -> None:
        self.version += 1
        self._enter(m)

    def used(self, m: ModelRecord, now: float) -> None:
        """``m`` was used at ``now``: it moves towards the back of its eviction order. The move waits until
        the order is next read (every request is granted and released, few passes read the order)."""
        m.last_used = now
        if m.name in self._lru_key:
            self._stale.add(m.name)

    def rekeyed(self, m: ModelRecord) -> None:
        """Something in ``m``'s eviction key other than a use changed (whether it is an extra replica)."""
        self.version += 1
        if m.name in self._lru_key:
            self._stale.add(m.name)

    def _refile(self) -> None:
        """File the models used since their key was filed under their current key."""
        for name in self._stale:
            m = self._records[name]
            keys = self._lru[m.base, m.state]
            old = self._lru_key[name]
            del keys[bisect_left(keys, old)]
            self._lru_key[name] = key = lru_key(m)
            insort(keys, key)
            for g in m.placed:
                keys = self._lru_gpu[m.base, m.state, g]
                del keys[bisect_left(keys, old)]
                insort(keys, key)
        self._stale.clear()

    def _enter(self, m: ModelRecord) -> None:
        self._records[m.name] = m
        self._by_state[m.state][m.name] = m
        if m.spec.group is not None:
            self._units[m.state][m.name] = m
        if m.base is not None:
            self._adapter_counts[m.base, m.state] = self._adapter_counts.get((m.base, m.state), 0) + 1
        if holds_capacity(m):
            self._holders[m.base][m.name] = m
            self._holders_sorted.pop(m.base, None)
            self._holder_counts[m.base, m.state] = self._holder_counts.get((m.base, m.state), 0) + 1
            self._holder_gb[m.base, m.state] = self._holder_gb.get((m.base, m.state), 0.0) + m.memory_gb
            held, staying = occupant(m), staying_occupant(m)
            self._occupants[m.name] = held, staying
            self._held.setdefault(m.base, Usage()).add(held)
            if staying is not None:
                self._staying.setdefault(m.base, Usage()).add(staying)
            if m.state in LRU_STATES:
                self._lru_key[m.name] = key = lru_key(m)
                insort(self._lru.setdefault((m.base, m.state), []), key)
                for g in m.placed:
                    insort(self._lru_gpu.setdefault((m.base, m.state, g), []), key)
        if has_idle_clock(m) and m.state in TIMED:
            self._timed[m.name] = m
        self._free(m)

    def busy_or_pin_changed(self, m: ModelRecord) -> None:
        """``m`` began or stopped serving, or was pinned or unpinned: what evicting it frees changed."""
        self._unfree(m)
        self._free(m)

    def _free(self, m: ModelRecord) -> None:
        gb = freeable(m)
        if gb > 0.0:
            self._freeable_of[m.name] = m.placed, gb
            for g in m.placed:
                insort(self._freeable_each.setdefault(g, []), gb)
                self._freeable_wide[g] = self._freeable_wide.get(g, 0) + (len(m.placed) > 1)

    def _unfree(self, m: ModelRecord) -> None:
        if was := self._freeable_of.pop(m.name, None):
            for g in was[0]:
                self._freeable_each[g].remove(was[1])
                self._freeable_wide[g] -= len(was[0]) > 1

    # ------------------------------------------------------------------ queries
    def children(self, base: ModelRecord) -> Sequence[ModelRecord]:
        """``base``'s adapters, in table order."""
        return self._adapters.get(base.name, ())

    def bases(self) -> Sequence[ModelRecord]:
        """The models that have adapters, in table order."""
        return list(self._bases.values())

    def holders(self, domain: str | None) -> list[ModelRecord]:
        """The models holding capacity in ``domain`` (None: the top level; else a base's adapters), in table
        order. The caller must not change the list."""
        cached = self._holders_sorted.get(domain)
        if cached is None:
            cached = self._holders_sorted[domain] = in_table_order(self._holders.get(domain, {}).values())
        return cached

    def count_holders(self, domain: str | None, states: Collection[State]) -> int:
        """How many models hold capacity in ``domain`` in any of ``states``."""
        return sum(self._holder_counts.get((domain, s), 0) for s in states)

    def holders_gb(self, domain: str | None, states: Collection[State]) -> float:
        """The memory (``memory_gb``, awake) of the models holding capacity in ``domain`` in ``states``."""
        return sum(self._holder_gb.get((domain, s), 0.0) for s in states)

    def count_adapters(self, base: ModelRecord, states: Collection[State]) -> int:
        """How many of ``base``'s adapters are in any of ``states``."""
        if base.name not in self._adapters:  # (most models have none: asked of every eviction candidate)
            return 0
        return sum(self._adapter_counts.get((base.name, s), 0) for s in states)

    def held(self, domain: str | None, but: ModelRecord | None = None) -> Usage:
        """What the models holding capacity in ``domain`` (but ``but``) hold, in total: a copy."""
        return self._total(self._held, 0, domain, but)

    def count(self, domain: str | None) -> int:
        """How many count against ``domain``'s ``max_resident`` now (``held(domain).count``, without a copy)."""
        totals = self._held.get(domain)
        return totals.count if totals is not None else 0

    def counted(self, m: ModelRecord) -> Occupant | None:
        """What ``m`` is counted as holding in its domain now (None: nothing)."""
        counted = self._occupants.get(m.name)
        return counted[0] if counted is not None else None

    def staying(self, domain: str | None, but: ModelRecord | None = None) -> Usage:
        """What they (but ``but``) will still hold once what is stopping or falling asleep has gone."""
        return self._total(self._staying, 1, domain, but)

    def usage_on(self, domain: str | None, gpus: Sequence[int], but: ModelRecord | None, staying: bool) -> Usage:
        """``held`` (or ``staying``), with the memory of ``gpus`` only: the same count and pool, and no copy
        of every other GPU's."""
        totals = (self._staying if staying else self._held).get(domain)
        usage = Usage(totals.count, totals.pool_gb, {g: totals.gpu_gb.get(g, 0.0) for g in gpus}) \
            if totals is not None else Usage()
        counted = self._occupants.get(but.name) if but is not None and but.base == domain else None
        mine = counted[1 if staying else 0] if counted is not None else None
        if mine is not None:
            usage.remove(mine)
        return usage

    def _total(self, totals: dict[str | None, Usage], which: int, domain: str | None,
               but: ModelRecord | None) -> Usage:
        usage = totals[domain].copy() if domain in totals else Usage()
        counted = self._occupants.get(but.name) if but is not None and but.base == domain else None
        mine = counted[which] if counted is not None else None
        if mine is not None:
            usage.remove(mine)
        return usage

    def freeable_each(self) -> tuple[Mapping[int, Sequence[float]], Mapping[int, int]]:
        """Per GPU, what evicting each model there could free (``freeable``), smallest first: where what stays
        and a load are over the GPU by more than their sum, no eviction makes room. And how many of them are
        placed on other GPUs too (one victim may free several GPUs of an option)."""
        return self._freeable_each, self._freeable_wide

    def lru(self, domain: str | None, state: State) -> Iterable[ModelRecord]:
        """The models holding capacity in ``domain`` in ``state`` (loaded or sleeping), in eviction order,
        read lazily: the caller must not change the index while it reads."""
        self._refile()
        return (self._records[key[-1]] for key in self._lru.get((domain, state), ()))

    def fewer_on(self, domain: str | None, gpus: Iterable[int]) -> bool:
        """Whether the models placed on ``gpus`` (loaded or sleeping) are few enough next to all of them that
        reading them through ``lru_on`` (a merge of per-GPU lists, about three times the cost per model of
        ``lru``) costs less than reading ``lru`` and passing over the others (at most a third; a model on
        several of ``gpus`` counts once per GPU)."""
        lru, per_gpu = self._lru, self._lru_gpu
        everyone = len(lru.get((domain, State.LOADED), ())) + len(lru.get((domain, State.SLEEPING), ()))
        there = 0
        for g in gpus:
            there += len(per_gpu.get((domain, State.LOADED, g), ())) + len(per_gpu.get((domain, State.SLEEPING, g), ()))
            if 3 * there > everyone:
                return False
        return True

    def lru_on(self, domain: str | None, state: State, gpus: Sequence[int]) -> Iterable[ModelRecord]:
        """``lru``, of the models placed on any of ``gpus`` only: what can make room there, read without
        reading the others (a cluster has thousands)."""
        self._refile()
        lists = [self._lru_gpu.get((domain, state, g), ()) for g in gpus]
        last = None
        for key in heapq.merge(*lists) if len(lists) > 1 else lists[0] if lists else ():
            if key != last:  # (a model on several of the GPUs is in each one's list)
                last = key
                yield self._records[key[-1]]

    def names_in(self, state: State) -> KeysView[str]:
        """The names of the models in ``state``: a live view."""
        return self._by_state[state].keys()

    def units_in(self, state: State) -> list[ModelRecord]:
        """The units of replicated models (``spec.group``) in ``state``, in no particular order: what step 4r
        reads, in proportion to the replicated models rather than to everything loaded."""
        return list(self._units[state].values())

    def timed(self) -> list[ModelRecord]:
        """The models with an idle clock (``has_idle_clock``) that are loaded or asleep, in no particular
        order."""
        return list(self._timed.values())

    def in_state(self, *states: State) -> list[ModelRecord]:
        """The models in any of ``states``, in no particular order."""
        if len(states) == 1:
            return list(self._by_state[states[0]].values())
        return [m for s in states for m in self._by_state[s].values()]


class ScanningIndex(ModelIndex):
    """The same answers, found by scanning the whole table on every question: slow, and obviously right."""

    def __init__(self, table: Mapping[str, ModelRecord]) -> None:
        super().__init__()
        self._table = table

    def added(self, m: ModelRecord, base: ModelRecord | None) -> None:
        self.version += 1

    def moving(self, m: ModelRecord) -> None:
        pass

    def moved(self, m: ModelRecord) -> None:
        self.version += 1

    def used(self, m: ModelRecord, now: float) -> None:
        m.last_used = now

    def rekeyed(self, m: ModelRecord) -> None:
        self.version += 1

    def counted(self, m: ModelRecord) -> Occupant | None:
        return occupant(m) if holds_capacity(m) else None

    def usage_on(self, domain: str | None, gpus: Sequence[int], but: ModelRecord | None, staying: bool) -> Usage:
        return self.staying(domain, but) if staying else self.held(domain, but)

    def busy_or_pin_changed(self, m: ModelRecord) -> None:
        pass  # (read from the table when asked)

    def count(self, domain: str | None) -> int:
        return self.held(domain).count

    def freeable_each(self) -> tuple[Mapping[int, Sequence[float]], Mapping[int, int]]:
        out: dict[int, list[float]] = {}
        wide: dict[int, int] = {}
        for m in self._table.values():
            if (gb := freeable(m)) > 0.0:
                for g in m.placed:
                    insort(out.setdefault(g, []), gb)
                    wide[g] = wide.get(g, 0) + (len(m.placed) > 1)
        return out, wide

    def held(self, domain: str | None, but: ModelRecord | None = None) -> Usage:
        return Usage.of(occupant(m) for m in self.holders(domain) if m is not but)

    def staying(self, domain: str | None, but: ModelRecord | None = None) -> Usage:
        return Usage.of(o for m in self.holders(domain) if m is not but and (o := staying_occupant(m)) is not None)

    def lru(self, domain: str | None, state: State) -> Iterable[ModelRecord]:
        return sorted((m for m in self.holders(domain) if m.state is state), key=lru_key)

    def lru_on(self, domain: str | None, state: State, gpus: Sequence[int]) -> Iterable[ModelRecord]:
        return [m for m in self.lru(domain, state) if set(m.placed) & set(gpus)]

    def names_in(self, state: State) -> KeysView[str]:
        return {m.name: m for m in self._table.values() if m.state is state}.keys()

    def children(self, base: ModelRecord) -> Sequence[ModelRecord]:
        return [m for m in self._table.values() if m.base == base.name]

    def bases(self) -> Sequence[ModelRecord]:
        return [m for m in self._table.values() if self.children(m)]

    def holders(self, domain: str | None) -> list[ModelRecord]:
        return [m for m in self._table.values() if m.base == domain and holds_capacity(m)]

    def count_adapters(self, base: ModelRecord, states: Collection[State]) -> int:
        return sum(1 for m in self.children(base) if m.state in states)

    def count_holders(self, domain: str | None, states: Collection[State]) -> int:
        return sum(1 for m in self.holders(domain) if m.state in states)

    def holders_gb(self, domain: str | None, states: Collection[State]) -> float:
        return sum(m.memory_gb for m in self.holders(domain) if m.state in states)

    def units_in(self, state: State) -> list[ModelRecord]:
        return [m for m in self._table.values() if m.state is state and m.spec.group is not None]

    def timed(self) -> list[ModelRecord]:
        return [m for m in self._table.values() if has_idle_clock(m) and m.state in TIMED]

    def in_state(self, *states: State) -> list[ModelRecord]:
        return [m for m in self._table.values() if m.state in states]
