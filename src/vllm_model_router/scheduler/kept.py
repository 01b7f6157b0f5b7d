"""Step 4's walk over the waiting loads, and the rooms it keeps from one pass to the next (see docs/DESIGN.md,
"Planning cost with hundreds of GPUs"): a load found waiting in its room is reserved there again without
being planned while nothing that finding read has changed. Planning in full stays the reference; property
tests hold this walk to it."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable

from vllm_model_router.scheduler.eviction import Occupant
from vllm_model_router.scheduler.passes import Kept, Pass, Resume, Waits
from vllm_model_router.scheduler.records import Group, ModelRecord, Waiter
from vllm_model_router.scheduler.shortcuts import Shortcuts


class KeptWalk(Shortcuts):
    """Step 4's walk, and what it keeps of the last pass."""

    _front: Kept | None = None  # the last pass's walk (``_plan_in_order``)

    def _plan_in_order(self, p: Pass, firsts: list[Waiter],
                       load_target: Callable[[Group, Waiter], ModelRecord | None],
                       plan_one: Callable[[Pass, ModelRecord, Waiter], bool]) -> None:
        """Step 4's walk: the load each waiter needs (``load_target``), in planning order, planned
        (``plan_one``) until one is blocked; a base two adapters wait for is planned once, for the older
        waiter. A top-level load ``_plan_one`` last found still waiting in its room the way ``_room_as_seen``
        asks (on the budget, with a count that did not bind; ``Waits.keep``) is reserved there again without
        planning it, while what ``_room_as_seen`` reads has not changed: the same oldest waiter, its model in
        the same state, no GPU of its room touched since (a move there), the same room reserved before it
        there, the same budget and rules, and a count that does not bind. The room reserved before it is
        the same unless a GPU of it is ``dirty``: every load that reserved room is recorded, and the rooms of
        those that left the order, moved in it or were planned otherwise this time are dirty. ``_plan_one``
        would then reserve the same room the same way; on a cluster that swaps without pause over a hundred
        loads wait in their rooms, and most events move nothing there."""
        budget, kept = self.budget, self._front
        if kept is None or kept.budget is not budget or kept.rules != self._rules_gen \
                or budget.memory_gb is not None or not budget.gpu_memory_gb:
            kept = None
        old, where = (kept.waits, kept.where) if kept is not None else ([], {})
        # the GPUs touched since the last walk began: a load kept then, found with an older stamp, was
        # checked then against the touches before, so only these can be new on its room (read from the log
        # of touches, while it reaches back that far; else each room's stamps)
        since = kept.stamp if kept is not None and kept.stamp >= self._touch_floor else -1
        touched: set[int] = set()
        if since >= 0:
            log = self._touch_log
            touched = {g for _, g in log[bisect_right(log, (since, math.inf)):]}
        self._walk_from(p, firsts, 0, load_target, plan_one, old, where, since, touched, self._stamp, [], set())

    def _resume(self, p: Pass, firsts: list[Waiter],
                load_target: Callable[[Group, Waiter], ModelRecord | None],
                plan_one: Callable[[Pass, ModelRecord, Waiter], bool]) -> bool:
        """Step 4's walk when only models falling idle (requests finished) changed since the last one, which
        stopped at a load found blocked (``Planner._plan_loads``): the loads before it are waiting in their
        rooms, which read what models hold, not whether they serve, so they would be reserved the same way
        again, provided what each is brought in for does not depend on it either (``_load_target``: a pass
        that chose a copy of an adapter by which models serve keeps no decision, ``Planner._plan_loads``).
        The walk starts again at the blocked load, with the pass as it was just before it. False when the
        last walk did not stop so. (The loads it passes over keep the stamp of the walk that checked them:
        the next walk reads every touch since.)"""
        kept = self._front
        r = kept.resume if kept is not None else None
        if kept is None or r is None or kept.budget is not self.budget or kept.rules != self._rules_gen:
            return False
        p.reserved = {domain: usage.copy() for domain, usage in r.reserved.items()}
        p.rooms = dict(r.rooms)
        p.room_pending = r.room_pending
        # (no load from the blocked one on is kept: none was in the last walk's rooms)
        self._walk_from(p, firsts, r.at, load_target, plan_one, kept.waits, {}, -1, set(), kept.stamp, list(kept.waits),
                        set(r.planned))
        return True

    def _walk_from(self, p: Pass, firsts: list[Waiter], start: int,
                   load_target: Callable[[Group, Waiter], ModelRecord | None],
                   plan_one: Callable[[Pass, ModelRecord, Waiter], bool], old: list[Waits], where: dict[str, int],
                   since: int, touched: set[int], began: int, waits: list[Waits], planned: set[str]) -> None:
        """``_plan_in_order`` from ``firsts[start]`` on, with the loads before it in ``waits`` and ``planned``
        (``old``, ``where``, ``since``, ``touched``: what may be kept, see there; ``began``: the stamp the
        loads kept in the end were checked from)."""
        stamps, models, budget = self._gpu_stamp, self._models, self.budget
        dirty: set[int] = set()  # GPUs where the room reserved before a load may differ from the last pass
        resume: Resume | None = None
        j = 0  # (the last pass's loads up to here are behind)
        stopped: int | None = None
        for at in range(start, len(firsts)):
            first, w = firsts[at], None
            if (i := where.get(first.model, -1)) >= j and old[i].seq == first.seq:
                if i > j:
                    for gone in old[j:i]:  # (left the order, or moved in it: their room is no longer reserved)
                        dirty.update(gone.room)
                j, w = i + 1, old[i]
                room = w.room
                if w.keep and w.model not in planned and (m := models[w.model]).state is w.state \
                        and m.since == w.since and dirty.isdisjoint(room) \
                        and (touched.isdisjoint(room) if w.stamp <= since
                             else all(stamps.get(g, 0) <= w.stamp for g in room)) \
                        and self._count_free(p.reserved.get(None)):
                    p.room_pending = True  # (what ``_plan_one`` does when ``_room_as_seen`` says so)
                    self._reserve(p, m, room, m.memory_gb)
                    planned.add(w.model)
                    waits.append(w)
                    continue
            target, now = load_target(self._groups[first.model], first), None
            if target is not None and target.name not in planned:
                planned.add(target.name)
                self._confirmed = None
                plain = not p.cooling and not p.read_candidates and p.blocked_since is None and not p.drain
                pending = p.room_pending
                if not plan_one(p, target, first):
                    if plain:  # (a blocked load reserves nothing: the pass is as it was before it; nothing
                        # changes its reservations once step 4 is over, and ``_resume`` copies them)
                        resume = Resume(at, p.reserved, p.rooms, frozenset(planned - {target.name}), pending)
                    stopped = at
                    break
                if (now := self._waiting_in(p, target, first)) is not None:
                    waits.append(now)
            if now is None or w is None or (now.room, now.reserves, now.holds) != (w.room, w.reserves, w.holds):
                dirty.update(now.room if now is not None else (), w.room if w is not None else ())
        self._front = Kept(budget, self._rules_gen, began, waits, {w.model: i for i, w in enumerate(waits)}, stopped,
                           resume)

    def _waiting_in(self, p: Pass, target: ModelRecord, first: Waiter) -> Waits | None:
        """The room ``target``, just planned for ``first``, reserved (None: none), and whether it may be kept:
        a top-level model brought in for its own waiters, found still waiting there (``_confirmed``)."""
        room = p.rooms.get(target.name)
        if room is None:
            return None
        keep = self._confirmed == target.name == first.model and target.base is None \
            and not self._groups[target.group].replicated
        return Waits(first.model, first.seq, target.state, target.since, self._stamp, room,
                     Occupant(target.name, target.memory_gb, room), self._index.counted(target), keep)
