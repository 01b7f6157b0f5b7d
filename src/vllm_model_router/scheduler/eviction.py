"""Victim choice, as pure functions. They must not log or mutate: the core calls them speculatively.

They read what holds capacity as totals (``Usage``) and the eviction candidates as an iterable in
eviction order, read no further than needed: a planning pass then costs in proportion to the victims it
looks at, not to the number of models in the domain."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice


@dataclass(frozen=True, slots=True)
class Budget:
    max_resident: int
    memory_gb: float | None  # one pool (no GPUs known); None: memory is not limited
    gpu_memory_gb: Mapping[int, float] = field(default_factory=dict)  # per-GPU budgets, when GPUs are known


@dataclass(frozen=True, slots=True)
class Occupant:
    name: str
    memory_gb: float  # per GPU it is placed on (or in the single pool)
    gpus: tuple[int, ...] = ()
    counts: bool = True  # against max_resident (a sleeping model does not: only its memory residue counts)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A way to make room: stop ``occupant`` (``after`` is None) or put it to sleep (``after`` is what it
    still holds asleep)."""

    occupant: Occupant
    after: Occupant | None = None

    @property
    def name(self) -> str:
        return self.occupant.name


@dataclass(slots=True)
class Usage:
    """What a set of occupants holds in total: how many count against ``max_resident``, the memory in the
    single pool, and the memory on each GPU. Asking "does one more fit?" of the totals costs the same
    however many models hold capacity; the scheduler keeps them up to date as models come and go."""

    count: int = 0
    pool_gb: float = 0.0
    gpu_gb: dict[int, float] = field(default_factory=dict)

    @classmethod
    def of(cls, occupants: Iterable[Occupant]) -> Usage:
        u = cls()
        for o in occupants:
            u.add(o)
        return u

    def copy(self) -> Usage:
        return Usage(self.count, self.pool_gb, dict(self.gpu_gb))

    def add(self, o: Occupant, sign: int = 1) -> None:
        """Count ``o`` in (``sign`` -1: take it out)."""
        if o.counts:
            self.count += sign
        self.pool_gb += sign * o.memory_gb
        for g in o.gpus:
            self.gpu_gb[g] = self.gpu_gb.get(g, 0.0) + sign * o.memory_gb

    def remove(self, o: Occupant) -> None:
        self.add(o, -1)

    def place(self, gpus: tuple[int, ...], gb: float) -> None:
        """Count in one more model holding ``gb`` on each of ``gpus`` (``add`` of such an ``Occupant``,
        without making one: step 4 reserves a room for every waiting load on every pass)."""
        self.count += 1
        self.pool_gb += gb
        gpu_gb = self.gpu_gb
        for g in gpus:
            gpu_gb[g] = gpu_gb.get(g, 0.0) + gb


def _over(usage: Usage, need_gb: float, budget: Budget, placement: tuple[int, ...]) -> set[str]:
    """What is over budget if the target came in: "count", and "pool" or each GPU ("gpu:N")."""
    over: set[str] = set()
    if usage.count + 1 > budget.max_resident:
        over.add("count")
    if budget.gpu_memory_gb and placement:
        for g in placement:
            if usage.gpu_gb.get(g, 0.0) + need_gb > budget.gpu_memory_gb.get(g, 0.0) + 1e-9:
                over.add(f"gpu:{g}")
    elif budget.memory_gb is not None:
        if usage.pool_gb + need_gb > budget.memory_gb + 1e-9:
            over.add("pool")
    return over


def fits(usage: Usage, need_gb: float, budget: Budget, placement: tuple[int, ...] = ()) -> bool:
    """Would one more model needing ``need_gb`` (on each GPU of ``placement``) fit next to ``usage``?"""
    return not _over(usage, need_gb, budget, placement)


def _helps(c: Candidate, over: set[str]) -> bool:
    o, after = c.occupant, c.after
    frees_slot = o.counts and (after is None or not after.counts)
    frees_memory = o.memory_gb > (after.memory_gb if after is not None else 0.0)
    if "count" in over and frees_slot:
        return True
    if not frees_memory:
        return False
    return "pool" in over or any(f"gpu:{g}" in over for g in o.gpus)


def _candidate(c: Occupant | Candidate) -> Candidate:
    return c if isinstance(c, Candidate) else Candidate(c)


class _Pulled:
    """Candidates read from an iterable only as far as someone asks, and remembered, so that several
    placements can walk the same order without building all of it."""

    def __init__(self, candidates: Iterable[Occupant | Candidate]) -> None:
        self._source: Iterator[Occupant | Candidate] = iter(candidates)
        self.seen: list[Candidate] = []

    def __iter__(self) -> Iterator[Candidate]:
        i = 0
        while True:
            if i == len(self.seen):
                nxt = next(self._source, None)
                if nxt is None:
                    return
                self.seen.append(_candidate(nxt))
            yield self.seen[i]
            i += 1


def plan_eviction(
    need_gb: float,
    occupied: Usage,
    candidates: Iterable[Occupant | Candidate],
    budget: Budget,
    placement: tuple[int, ...] = (),
) -> list[str] | None:
    """The least recently used candidates whose removal makes room for the target.

    ``occupied`` totals everything holding capacity now (loading, loaded and still stopping models);
    ``candidates`` are the evictable ones among them, least recently used first (read only as far as
    needed). A candidate is taken only if it helps: it frees a slot the count needs, or memory on a GPU
    the target goes on. Returns ``[]`` when the target fits already, the victims' names when evicting
    them makes it fit, and ``None`` when even evicting every candidate would not.
    """
    over = _over(occupied, need_gb, budget, placement)
    if not over:
        return []
    remaining = occupied.copy()
    victims: list[str] = []
    for cand in candidates:
        c = _candidate(cand)
        if not _helps(c, over):
            continue
        remaining.remove(c.occupant)
        if c.after is not None:
            remaining.add(c.after)
        victims.append(c.name)
        over = _over(remaining, need_gb, budget, placement)
        if not over:
            return victims
    return None


def choose_placement(
    need_gb: float,
    occupied: Usage,
    idle: Iterable[Occupant | Candidate],
    budget: Budget,
    options: Sequence[tuple[int, ...]],
    fits_nowhere: bool = False,
    least: int = 1,
    floors: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], list[str] | None]:
    """Where a model that may go on any of ``options`` should go, and what that evicts.

    Best fit among the placements that need no eviction (the least memory left over, so that large
    holes stay for large models); otherwise the placement whose idle victims are fewest and least
    recently used. With no option that works even by evicting every idle model, the first option and
    ``None``. ``idle`` is read lazily, and only if no placement fits as it is. ``fits_nowhere``: the caller
    knows already that none does (``FreeOrder``); ``least``: that no plan has fewer victims (the first plan
    found with that many is the answer: the reading stops there); ``floors``: for each option, no plan there
    has fewer victims (an option that cannot beat the best plan found is read no further).
    """
    if not options:
        return (), plan_eviction(need_gb, occupied, idle, budget)
    if budget.gpu_memory_gb and occupied.count + 1 <= budget.max_resident and all(options):
        return _choose_disjoint(need_gb, occupied, idle, budget, options, fits_nowhere, least, floors)
    return _choose_general(need_gb, occupied, idle, budget, options)


def _choose_disjoint(
    need_gb: float, occupied: Usage, idle: Iterable[Occupant | Candidate], budget: Budget,
    options: Sequence[tuple[int, ...]], fits_nowhere: bool = False, least: int = 1,
    floors: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], list[str] | None]:
    """``_choose_general``'s answer when the options share no GPU and the count is not what binds (a cluster:
    each GPU, or each node's freest GPUs for a tensor-parallel model). There, each option's plan depends on
    its own GPUs only, so one walk of the candidates builds every plan at once: the cost is GPUs +
    candidates instead of options x candidates. The arithmetic is the general one's, step for step (same
    additions in the same order), so the decision is the same: a property test holds the two to it.
    Options that do share a GPU go the general way. Once a plan is found, an option that cannot beat it (its
    floor, or the victims it has already, leave it at least as many) is dropped: the walk ends when every
    option is planned or dropped."""
    caps, held = budget.gpu_memory_gb, occupied.gpu_gb
    best: tuple[float, tuple[int, ...]] | None = None
    for p in () if fits_nowhere else options:
        if len(p) == 1:  # (the common case, without a generator per option)
            g = p[0]
            used = held.get(g, 0.0)
            if used + need_gb <= caps.get(g, 0.0) + 1e-9:
                one: tuple[float, tuple[int, ...]] = (caps.get(g, 0.0) - used - need_gb, p)
                if best is None or one < best:
                    best = one
        elif all(held.get(g, 0.0) + need_gb <= caps.get(g, 0.0) + 1e-9 for g in p):
            key = (min(caps.get(g, 0.0) - held.get(g, 0.0) for g in p) - need_gb, p)
            if best is None or key < best:
                best = key
    if best is not None:
        return best[1], []
    owner: dict[int, int] = {}  # GPU -> the option it is in, while that option is not planned yet
    for i, p in enumerate(options):
        for g in p:
            if g in owner:
                return _choose_general(need_gb, occupied, idle, budget, options)
            owner[g] = i
    # each option's GPUs as its plan has left them so far, and those still over budget: made when a
    # candidate first frees memory there (most options are never touched before a plan wins)
    usage: dict[int, dict[int, float]] = {}
    over: dict[int, set[int]] = {}
    victims: dict[int, list[str]] = {}
    plans: list[tuple[int, int, tuple[int, ...], list[str]]] = []
    fewest = math.inf  # the fewest victims of a plan found: a later plan must have fewer to win
    found_at = -1  # the candidate that completed the first plan with that many
    by_floor: dict[int, list[int]] = {}  # the options by their floor, until dropped
    for j, f in enumerate(floors or ()):
        by_floor.setdefault(f, []).append(j)

    def drop(j: int) -> None:
        for g in options[j]:
            if owner.get(g) == j:
                del owner[g]

    for i, cand in enumerate(idle):
        c = _candidate(cand)
        o, after = c.occupant, c.after
        if not o.memory_gb > (after.memory_gb if after is not None else 0.0):
            continue  # frees no memory (and the count is not over): no plan takes it
        for j in {owner[g] for g in o.gpus if g in owner}:
            if j not in usage:
                usage[j] = {g: held.get(g, 0.0) for g in options[j]}
                over[j] = {g for g in options[j] if held.get(g, 0.0) + need_gb > caps.get(g, 0.0) + 1e-9}
                victims[j] = []
            if over[j].isdisjoint(o.gpus):
                continue  # frees nothing this option still lacks (``_helps``)
            if len(victims[j]) + 1 > fewest or (len(victims[j]) + 1 == fewest and found_at < i):
                drop(j)  # more victims than the best plan, or as many and later: it cannot win
                continue
            u = usage[j]
            for g in o.gpus:  # (Usage.remove, then Usage.add of what it keeps asleep)
                if g in u:
                    u[g] = u[g] - o.memory_gb
            if after is not None:
                for g in after.gpus:
                    if g in u:
                        u[g] = u[g] + after.memory_gb
            victims[j].append(c.name)
            over[j] = {g for g in u if u[g] + need_gb > caps.get(g, 0.0) + 1e-9}
            if not over[j]:
                plans.append((len(victims[j]), i, options[j], victims[j]))
                if len(victims[j]) < fewest:
                    fewest, found_at = len(victims[j]), i
                drop(j)  # planned: later candidates do not change it
        if found_at == i:  # an option that can have no fewer victims can only complete later: it cannot win
            for f in [f for f in by_floor if f >= fewest]:
                for k in by_floor.pop(f):
                    drop(k)
        # a plan of the fewest victims there can be beats any that ends later (more victims, or as many but
        # later in the order)
        if not owner or fewest <= least:
            break
    if plans:
        _, _, p, chosen = min(plans)
        return p, chosen
    return options[0], None


def _choose_general(
    need_gb: float, occupied: Usage, idle: Iterable[Occupant | Candidate], budget: Budget,
    options: Sequence[tuple[int, ...]],
) -> tuple[tuple[int, ...], list[str] | None]:
    free_fits: list[tuple[float, tuple[int, ...]]] = []
    for p in options:
        if fits(occupied, need_gb, budget, p):
            left = min(budget.gpu_memory_gb.get(g, 0.0) - occupied.gpu_gb.get(g, 0.0)
                       for g in p) if budget.gpu_memory_gb else 0.0
            free_fits.append((left - need_gb, p))
    if free_fits:
        return min(free_fits)[1], []
    pulled = _Pulled(idle)
    plans: list[tuple[int, int, tuple[int, ...], list[str]]] = []
    for p in options:
        victims = plan_eviction(need_gb, occupied, pulled, budget, p)
        if victims is not None:
            order = {c.name: i for i, c in enumerate(pulled.seen)}
            plans.append((len(victims), max(order[v] for v in victims) if victims else -1, p, victims))
    if plans:
        _, _, p, victims = min(plans)
        return p, victims
    return options[0], None


class FreeOrder:
    """Best fit among one-GPU placements without reading every GPU: the GPUs sorted by the memory left free
    next to a ``Usage``, made once and asked for many loads while that usage and the budget stand (on a
    cluster of hundreds of GPUs, every waiting load asks the same question of nearly the same usage). The
    GPUs whose use differs in the usage asked about (``changed``: what one load reserved, the target's own
    share) are read from that usage instead. The answer is ``choose_placement``'s, exactly: the walk starts
    just below the need and reads on only while a GPU could still fit better."""

    def __init__(self, usage: Usage, budget: Budget, gpus: Iterable[int]) -> None:
        caps, held = budget.gpu_memory_gb, usage.gpu_gb
        self.gpus = frozenset(gpus)
        self._free = {g: caps.get(g, 0.0) - held.get(g, 0.0) for g in self.gpus}
        self._order = sorted((free, g) for g, free in self._free.items())

    def update(self, usage: Usage, budget: Budget, gpus: Iterable[int]) -> None:
        """``usage`` changed on ``gpus`` (and only there): the order as if made from it."""
        caps, held = budget.gpu_memory_gb, usage.gpu_gb
        for g in gpus:
            if g in self.gpus:
                was, free = self._free[g], caps.get(g, 0.0) - held.get(g, 0.0)
                if free != was:
                    del self._order[bisect_left(self._order, (was, g))]
                    insort(self._order, (free, g))
                    self._free[g] = free

    def best_fit(self, need_gb: float, usage: Usage, budget: Budget,
                 changed: Collection[int]) -> tuple[int, ...] | None:
        """The GPU ``choose_placement`` would put a model needing ``need_gb`` on without evicting, next to
        ``usage`` (equal to the usage this was made from but on the ``changed`` GPUs); None: none fits."""
        caps, held = budget.gpu_memory_gb, usage.gpu_gb
        best: tuple[float, tuple[int, ...]] | None = None
        for g in changed:
            if g in self.gpus and held.get(g, 0.0) + need_gb <= caps.get(g, 0.0) + 1e-9:
                key = (caps.get(g, 0.0) - held.get(g, 0.0) - need_gb, (g,))
                if best is None or key < best:
                    best = key
        # a GPU with less free than the need less a margin far above rounding cannot pass the check below
        for free, g in islice(self._order, bisect_left(self._order, (need_gb - 1e-6,)), None):
            if best is not None and free - need_gb > best[0]:
                break  # (the key grows with what is free: nothing further on fits better)
            if g in changed:
                continue
            used = held.get(g, 0.0)
            if used + need_gb <= caps.get(g, 0.0) + 1e-9:
                key = (caps.get(g, 0.0) - used - need_gb, (g,))
                if best is None or key < best:
                    best = key
        return best[1] if best is not None else None
