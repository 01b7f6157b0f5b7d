"""Victim choice, as a pure function. It must not log or mutate: the core calls it speculatively."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Budget:
    max_resident: int
    memory_gb: float | None  # None: memory is not limited


@dataclass(frozen=True, slots=True)
class Occupant:
    name: str
    memory_gb: float


def fits(occupied: Sequence[Occupant], need_gb: float, budget: Budget) -> bool:
    """Would one more model needing ``need_gb`` fit next to ``occupied``?"""
    if len(occupied) + 1 > budget.max_resident:
        return False
    if budget.memory_gb is None:
        return True
    return sum(o.memory_gb for o in occupied) + need_gb <= budget.memory_gb + 1e-9


def plan_eviction(
    need_gb: float,
    occupied: Sequence[Occupant],
    candidates: Sequence[Occupant],
    budget: Budget,
) -> list[str] | None:
    """The shortest LRU prefix of ``candidates`` whose removal makes room for the target.

    ``occupied`` is everything holding capacity now (loading, loaded and still stopping models);
    ``candidates`` are the evictable ones among them, least recently used first. Returns ``[]`` when
    the target fits already, the victims' names when evicting them makes it fit, and ``None`` when even
    evicting every candidate would not.
    """
    remaining = list(occupied)
    if fits(remaining, need_gb, budget):
        return []
    victims: list[str] = []
    for c in candidates:
        remaining = [o for o in remaining if o.name != c.name]
        victims.append(c.name)
        if fits(remaining, need_gb, budget):
            return victims
    return None
