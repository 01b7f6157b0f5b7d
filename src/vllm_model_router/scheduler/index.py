"""The model table's indexes: which models are in which state, which hold capacity in which domain, and
which adapters sit on which base.

Every step of the planning pass asks one of these questions, after every event. Answered by scanning
the table, a pass costs time in proportion to the number of configured models (and, for the domains, to
their square), which a zoo of hundreds of adapters makes the router's bottleneck. The index answers them
in proportion to the answer instead. It mirrors ``ModelRecord.state``: ``Residency._set_state`` (and
``_add``) tell it every move, and nothing else changes a state.

``ScanningIndex`` answers the same questions by scanning the table: the reference the property tests
hold the index to.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from vllm_model_router.scheduler.records import ModelRecord
from vllm_model_router.scheduler.states import HOLDS_CAPACITY, State

TIMED = frozenset({State.LOADED, State.SLEEPING})
"""Where a model's ttl clock may run (see ``Residency._ttl_applies``)."""


def holds_capacity(m: ModelRecord) -> bool:
    """Counted against its domain's budget: managed by the router and holding memory."""
    return not m.spec.external and m.state in HOLDS_CAPACITY


def in_table_order(models: Collection[ModelRecord]) -> list[ModelRecord]:
    """Configuration order: the order a scan of the table visits models in, and so the order of the
    effects a step emits for several models."""
    return sorted(models, key=lambda m: m.order)


class ModelIndex:
    """The answers, kept up to date on every move."""

    def __init__(self) -> None:
        self._by_state: dict[State, dict[str, ModelRecord]] = {s: {} for s in State}
        self._holders: dict[str | None, dict[str, ModelRecord]] = {None: {}}
        self._holders_sorted: dict[str | None, list[ModelRecord]] = {}  # cached table order; dropped on change
        self._holder_counts: dict[tuple[str | None, State], int] = {}  # (domain, state) -> how many hold
        self._adapter_counts: dict[tuple[str, State], int] = {}  # (base, state) -> how many of its adapters
        self._timed: dict[str, ModelRecord] = {}  # loaded or asleep, with a ttl: whose ttl clock may run
        self._adapters: dict[str, list[ModelRecord]] = {}
        self._bases: dict[str, ModelRecord] = {}  # models with adapters, in table order

    # ------------------------------------------------------------------ upkeep
    def added(self, m: ModelRecord, base: ModelRecord | None) -> None:
        if base is not None:
            self._adapters.setdefault(base.name, []).append(m)
            self._bases[base.name] = base
            self._holders.setdefault(base.name, {})
        self._enter(m)

    def moving(self, m: ModelRecord) -> None:
        """``m`` is about to change state: forget where it is now (``moved`` files it again)."""
        del self._by_state[m.state][m.name]
        if m.base is not None:
            self._adapter_counts[m.base, m.state] -= 1
        if holds_capacity(m):
            del self._holders[m.base][m.name]
            self._holders_sorted.pop(m.base, None)
            self._holder_counts[m.base, m.state] -= 1
        self._timed.pop(m.name, None)

    def moved(self, m: ModelRecord) -> None:
        self._enter(m)

    def _enter(self, m: ModelRecord) -> None:
        self._by_state[m.state][m.name] = m
        if m.base is not None:
            self._adapter_counts[m.base, m.state] = self._adapter_counts.get((m.base, m.state), 0) + 1
        if holds_capacity(m):
            self._holders[m.base][m.name] = m
            self._holders_sorted.pop(m.base, None)
            self._holder_counts[m.base, m.state] = self._holder_counts.get((m.base, m.state), 0) + 1
        if m.spec.ttl > 0 and m.state in TIMED:
            self._timed[m.name] = m

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

    def count_adapters(self, base: ModelRecord, states: Collection[State]) -> int:
        """How many of ``base``'s adapters are in any of ``states``."""
        return sum(self._adapter_counts.get((base.name, s), 0) for s in states)

    def timed(self) -> list[ModelRecord]:
        """The models with a ttl that are loaded or asleep, in no particular order."""
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
        pass

    def moving(self, m: ModelRecord) -> None:
        pass

    def moved(self, m: ModelRecord) -> None:
        pass

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

    def timed(self) -> list[ModelRecord]:
        return [m for m in self._table.values() if m.spec.ttl > 0 and m.state in TIMED]

    def in_state(self, *states: State) -> list[ModelRecord]:
        return [m for m in self._table.values() if m.state in states]
