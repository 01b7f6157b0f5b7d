"""Victim choice, as pure functions. They must not log or mutate: the core calls them speculatively.

They read what holds capacity as totals (``Usage``) and the eviction candidates as an iterable in
eviction order, read no further than needed: a planning pass then costs in proportion to the victims it
looks at, not to the number of models in the domain."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field


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
) -> tuple[tuple[int, ...], list[str] | None]:
    """Where a model that may go on any of ``options`` should go, and what that evicts.

    Best fit among the placements that need no eviction (the least memory left over, so that large
    holes stay for large models); otherwise the placement whose idle victims are fewest and least
    recently used. With no option that works even by evicting every idle model, the first option and
    ``None``. ``idle`` is read lazily, and only if no placement fits as it is.
    """
    if not options:
        return (), plan_eviction(need_gb, occupied, idle, budget)
    if budget.gpu_memory_gb and occupied.count + 1 <= budget.max_resident and all(len(p) == 1 for p in options):
        return _choose_one_gpu(need_gb, occupied, idle, budget, options)
    return _choose_general(need_gb, occupied, idle, budget, options)


def _choose_one_gpu(
    need_gb: float, occupied: Usage, idle: Iterable[Occupant | Candidate], budget: Budget,
    options: Sequence[tuple[int, ...]],
) -> tuple[tuple[int, ...], list[str] | None]:
    """``_choose_general``'s answer when every option is one GPU and the count is not what binds (a cluster:
    hundreds of GPUs). There, each option's plan is its own GPU's, so one walk of the candidates builds
    every plan at once: the cost is GPUs + candidates instead of GPUs x candidates. The arithmetic is the
    general one's, step for step (same additions in the same order), so the decision is the same: a
    property test holds the two to it."""
    caps = budget.gpu_memory_gb
    best: tuple[float, tuple[int, ...]] | None = None
    for p in options:
        g = p[0]
        held = occupied.gpu_gb.get(g, 0.0)
        if held + need_gb <= caps.get(g, 0.0) + 1e-9:
            key = (caps.get(g, 0.0) - held - need_gb, p)
            if best is None or key < best:
                best = key
    if best is not None:
        return best[1], []
    usage = {p[0]: occupied.gpu_gb.get(p[0], 0.0) for p in options}  # the GPUs not planned yet
    victims: dict[int, list[str]] = {g: [] for g in usage}
    plans: list[tuple[int, int, tuple[int, ...], list[str]]] = []
    fewest = math.inf  # the fewest victims of a plan found: a later plan must have fewer to win
    for i, cand in enumerate(idle):
        c = _candidate(cand)
        o, after = c.occupant, c.after
        if not o.memory_gb > (after.memory_gb if after is not None else 0.0):
            continue  # frees no memory (and the count is not over): no plan takes it
        for g in o.gpus:
            if g not in usage:
                continue
            u = usage[g] - o.memory_gb  # (Usage.remove, then Usage.add of what it keeps asleep)
            if after is not None and g in after.gpus:
                u += after.memory_gb
            usage[g] = u
            victims[g].append(c.name)
            if u + need_gb <= caps.get(g, 0.0) + 1e-9:
                plans.append((len(victims[g]), i, (g,), victims[g]))
                fewest = min(fewest, len(victims[g]))
                del usage[g]  # planned: later candidates do not change it
        # a plan of one victim beats any that ends later (more victims, or as many but later in the order)
        if not usage or fewest == 1:
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
