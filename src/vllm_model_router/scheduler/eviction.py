"""Victim choice, as a pure function. It must not log or mutate: the core calls it speculatively."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def _over(occupied: Sequence[Occupant], need_gb: float, budget: Budget, placement: tuple[int, ...]) -> set[str]:
    """What is over budget if the target came in: "count", and "pool" or each GPU ("gpu:N")."""
    over: set[str] = set()
    if sum(1 for o in occupied if o.counts) + 1 > budget.max_resident:
        over.add("count")
    if budget.gpu_memory_gb and placement:
        for g in placement:
            used = sum(o.memory_gb for o in occupied if g in o.gpus)
            if used + need_gb > budget.gpu_memory_gb.get(g, 0.0) + 1e-9:
                over.add(f"gpu:{g}")
    elif budget.memory_gb is not None:
        if sum(o.memory_gb for o in occupied) + need_gb > budget.memory_gb + 1e-9:
            over.add("pool")
    return over


def fits(occupied: Sequence[Occupant], need_gb: float, budget: Budget, placement: tuple[int, ...] = ()) -> bool:
    """Would one more model needing ``need_gb`` (on each GPU of ``placement``) fit next to ``occupied``?"""
    return not _over(occupied, need_gb, budget, placement)


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


def plan_eviction(
    need_gb: float,
    occupied: Sequence[Occupant],
    candidates: Sequence[Occupant | Candidate],
    budget: Budget,
    placement: tuple[int, ...] = (),
) -> list[str] | None:
    """The least recently used candidates whose removal makes room for the target.

    ``occupied`` is everything holding capacity now (loading, loaded and still stopping models);
    ``candidates`` are the evictable ones among them, least recently used first. A candidate is taken
    only if it helps: it frees a slot the count needs, or memory on a GPU the target goes on. Returns
    ``[]`` when the target fits already, the victims' names when evicting them makes it fit, and
    ``None`` when even evicting every candidate would not.
    """
    remaining = list(occupied)
    over = _over(remaining, need_gb, budget, placement)
    if not over:
        return []
    victims: list[str] = []
    for cand in candidates:
        c = _candidate(cand)
        if not _helps(c, over):
            continue
        remaining = [o for o in remaining if o.name != c.name] + ([c.after] if c.after is not None else [])
        victims.append(c.name)
        over = _over(remaining, need_gb, budget, placement)
        if not over:
            return victims
    return None


def choose_placement(
    need_gb: float,
    occupied: Sequence[Occupant],
    idle: Sequence[Occupant | Candidate],
    budget: Budget,
    options: Sequence[tuple[int, ...]],
) -> tuple[tuple[int, ...], list[str] | None]:
    """Where a model that may go on any of ``options`` should go, and what that evicts.

    Best fit among the placements that need no eviction (the least memory left over, so that large
    holes stay for large models); otherwise the placement whose idle victims are fewest and least
    recently used. With no option that works even by evicting every idle model, the first option and
    ``None``.
    """
    if not options:
        return (), plan_eviction(need_gb, occupied, idle, budget)
    free_fits: list[tuple[float, tuple[int, ...]]] = []
    for p in options:
        if fits(occupied, need_gb, budget, p):
            left = min(budget.gpu_memory_gb.get(g, 0.0) - sum(o.memory_gb for o in occupied if g in o.gpus)
                       for g in p) if budget.gpu_memory_gb else 0.0
            free_fits.append((left - need_gb, p))
    if free_fits:
        return min(free_fits)[1], []
    order = {o.name: i for i, o in enumerate(idle)}
    plans: list[tuple[int, int, tuple[int, ...], list[str]]] = []
    for p in options:
        victims = plan_eviction(need_gb, occupied, idle, budget, p)
        if victims is not None:
            plans.append((len(victims), max(order[v] for v in victims) if victims else -1, p, victims))
    if plans:
        _, _, p, victims = min(plans)
        return p, victims
    return options[0], None


def gpu_usage(occupied: Sequence[Occupant], gpus: Mapping[int, float]) -> dict[int, float]:
    return {g: sum(o.memory_gb for o in occupied if g in o.gpus) for g in gpus}
