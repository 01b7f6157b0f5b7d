"""What lets step 4 plan on a cluster without reading every GPU and every model on each pass (see
docs/DESIGN.md, "Planning cost with hundreds of GPUs"): best fit from GPUs kept in order of free memory,
the room a load reserves, and a load blocked behind busy models looked at again only where something
changed. Each gives the answer the plain way gives; property tests hold them to it."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Container
from dataclasses import dataclass

from vllm_model_router.scheduler.eviction import Budget, FreeOrder, Occupant, Usage, choose_placement
from vllm_model_router.scheduler.index import occupant
from vllm_model_router.scheduler.passes import Hot, Pass, noting_sleepers
from vllm_model_router.scheduler.placement import Placement
from vllm_model_router.scheduler.records import ModelRecord, Waiter
from vllm_model_router.scheduler.states import State


@dataclass(slots=True)
class Blocked:
    """A load found blocked behind busy models (step 4 (c)), and what that finding read: the GPUs' touch
    stamp, the budget, the count of events that change what may be evicted without moving a model (a pin,
    replicas kept, an unload), the room reserved before it, and the hot models holding it back with when
    each cools down, and its options then. While only GPUs of some options have been touched since (or have
    a hot model that cooled down), only those can have changed."""

    model: str  # the model of its oldest waiter, the newcomer protected models are held against (``Hot``)
    stamp: int
    budget: Budget
    gen: int
    reserved: dict[int, float]
    cooling: tuple[tuple[float, tuple[int, ...]], ...]  # hot models in the way: when each cools, on which GPUs
    until: float  # its oldest waiter's fairness bound: then drains are planned, in full
    options: list[tuple[int, ...]]  # where it could go then (a node's freest GPUs change as models move)


class Shortcuts(Placement):
    """Step 4's ways around reading the whole cluster."""

    _confirmed: str | None = None  # the load ``_plan_one`` last found still waiting in its room, as ``_room_as_seen``

    def _note_arrival(self, m: ModelRecord, now: float) -> bool:
        """How long ``m`` is protected from eviction, and how long a load for its waiters waits for protected
        models (``_hot_until``), may change with an arrival (``_steady``). Then the findings that read either
        expire, and only those (on a busy cluster some model's steadiness changes on most events): a load
        waiting in its room reads neither; a load found blocked reads the first where it looked, so ``m``'s
        GPUs are touched (looked at again), and the second for its own waiters, so a load found blocked for
        ``m``'s waiters, or with a protected model where ``m`` is, is planned again in full (what protects
        there, and until when, is noted anew)."""
        if not super()._note_arrival(m, now):
            return False
        self._touch(m)
        gpus = set(m.placed)
        for name in [name for name, b in self._blocked.items()
                     if b.model == m.group or any(not gpus.isdisjoint(on) for _, on in b.cooling)]:
            del self._blocked[name]
        return True

    def _free_fit(self, staying: bool, need: float, usage: Usage, budget: Budget, options: list[tuple[int, ...]],
                  target: ModelRecord, reserved: Usage | None) -> tuple[bool, tuple[int, ...] | None]:
        """``choose_placement``'s answer without evicting (the GPU, or None: none fits), found with a
        ``FreeOrder`` of what every model holds (``staying``: once what is on its way out has gone), for a
        model that may go on any one GPU. False first when the order does not apply (then ``choose_placement``
        reads every option). After a few moves only the GPUs they were on are read again; after many, the order
        is made again."""
        if target.base is not None or budget is not self.budget or not budget.gpu_memory_gb \
                or usage.count + 1 > budget.max_resident or options is not self._layout()[0]:
            return False, None
        cached, moved = self._free_orders.get(staying), self._moved_on
        if cached is None or cached[1] is not budget or len(moved) - cached[0] > 256:
            base = self._index.staying(None) if staying else self._index.held(None)
            cached = (len(moved), budget, FreeOrder(base, budget, budget.gpu_memory_gb))
            self._free_orders[staying] = cached
        elif cached[0] < len(moved):  # models moved since: their GPUs are read again
            gpus = set(moved[cached[0]:])
            cached[2].update(self._index.usage_on(None, tuple(gpus), None, staying), budget, gpus)
            cached = self._free_orders[staying] = (len(moved), budget, cached[2])
        changed = set(reserved.gpu_gb) if reserved is not None else set()
        if (mine := self._index.counted(target)) is not None:
            changed.update(mine.gpus)
        return True, cached[2].best_fit(need, usage, budget, changed)

    def _reserve(self, p: Pass, target: ModelRecord, placement: tuple[int, ...], need: float) -> None:
        """Count ``target`` as placed on ``placement`` for the rest of the pass: the room it waits for."""
        p.rooms[target.name] = placement
        self._blocked.pop(target.name, None)
        usage = p.reserved.get(target.base)
        if usage is None:
            usage = p.reserved[target.base] = Usage()
        usage.place(placement, need)
        if (mine := self._index.counted(target)) is not None:  # (a sleeper's residue becomes its need)
            usage.remove(mine)

    def _room_usage(self, staying: bool, target: ModelRecord, room: tuple[int, ...],
                    reserved: Usage | None) -> Usage:
        """What is held (or ``staying``) in ``target``'s domain but by it, with the room earlier loads of
        the pass reserved: the count and pool, and the GPUs of ``room`` only (a load waiting in its room, or
        one found blocked and looked at again where GPUs were touched, is asked about those alone; the
        cluster's other GPUs are not copied for it)."""
        usage = self._index.usage_on(target.base, room, target, staying)
        if reserved is not None:
            usage.count += reserved.count
            usage.pool_gb += reserved.pool_gb
            for g in room:
                usage.gpu_gb[g] = usage.gpu_gb.get(g, 0.0) + reserved.gpu_gb.get(g, 0.0)
        return usage

    def _room_as_seen(self, target: ModelRecord, room: tuple[int, ...], reserved: Usage | None) -> bool:
        """``target``, waiting in ``room`` for its victims to go, was last found still waiting there, and
        nothing that finding read has changed: no GPU of the room touched since (``_touch``: a move there),
        the same room reserved there before it, the same budget, and the count does not bind now nor did
        then. Then the same checks would find the same (each pass visits every load waiting in its room:
        on a swapping cluster, dozens)."""
        seen = self._room_seen.get(target.name)
        if seen is None or seen[0] != room or seen[2] is not self.budget or self.budget.memory_gb is not None:
            return False
        stamps, res = self._gpu_stamp, reserved.gpu_gb if reserved is not None else {}
        if all(stamps.get(g, 0) <= seen[1] for g in room) \
                and seen[3] == tuple(res.get(g, 0.0) for g in room) and self._count_free(reserved):
            self._confirmed = target.name
            return True
        return False

    def _room_seen_now(self, target: ModelRecord, room: tuple[int, ...], reserved: Usage | None) -> None:
        """Remember that ``target`` was found waiting in ``room`` (``_room_as_seen``)."""
        if self.budget.memory_gb is None and self._count_free(reserved):
            res = reserved.gpu_gb if reserved is not None else {}
            self._room_seen[target.name] = (room, self._stamp, self.budget, tuple(res.get(g, 0.0) for g in room))
            self._confirmed = target.name
        else:
            self._room_seen.pop(target.name, None)

    def _count_binds(self, target: ModelRecord, reserved: Usage | None, budget: Budget) -> bool:
        """``target`` would be over the count next to what holds capacity but it and the room reserved so far
        (``held(None, but=target).count``, read without copying every GPU's use)."""
        mine = self._index.counted(target)
        count = self._index.count(None) - (1 if mine is not None and mine.counts else 0)
        return count + 1 + (reserved.count if reserved is not None else 0) > budget.max_resident

    def _count_free(self, reserved: Usage | None) -> bool:
        """One more model fits the count next to what holds capacity and the room reserved so far, whatever
        leaves or comes in its place (so only memory decides)."""
        return self._index.count(None) + (reserved.count if reserved is not None else 0) + 2 <= self.budget.max_resident

    def _make_room(self, need: float, staying: Usage, target: ModelRecord, hot: Container[str], budget: Budget,
                   options: list[tuple[int, ...]], on: tuple[int, ...] | None = None,
                   fits_nowhere: bool = False) -> tuple[tuple[int, ...], list[str] | None, bool]:
        """Where ``target`` goes and the idle models that make room for it there (``choose_placement``), and
        whether they are put to sleep: where they can sleep, unless their residues are in the way, then
        stopped (the candidates are walked again only if one of them would have slept). ``on``: only the
        models placed on these GPUs are read."""
        if on is None and (one := self._one_victim(need, staying, target, hot, budget, options,
                                                   fits_nowhere)) is not None:
            return one
        could, floors = self._could_fit(need, staying, target, budget, options)
        if not could:  # even evicting every idle model would not make room: no candidate need be read
            return options[0], None, True
        least = max(min(floors), 1)
        likely = [i for i, f in enumerate(floors) if f <= least]
        if len(likely) < len(could):  # a plan with ``least`` victims can only be there: read those first
            placement, victims, sleep = self._walk(need, staying, target, hot, budget, [could[i] for i in likely],
                                                   [floors[i] for i in likely], on, fits_nowhere, least)
            if victims is not None and len(victims) == least and sleep:  # (a plan of stops found there: one
                return placement, victims, sleep                          # of sleeps elsewhere comes first)
        return self._walk(need, staying, target, hot, budget, could, floors, on, fits_nowhere, least)

    def _one_victim(self, need: float, staying: Usage, target: ModelRecord, hot: Container[str], budget: Budget,
                    options: list[tuple[int, ...]],
                    fits_nowhere: bool) -> tuple[tuple[int, ...], list[str], bool] | None:
        """``_make_room``'s answer when it is one victim (the common miss on a cluster), found without the
        per-option bound and without reading the candidates that cannot decide it; None: no plan of one
        victim, or options that share a GPU (then ``_make_room`` reads everything it would have). No plan
        has fewer than one victim, so ``choose_placement`` stops at the first candidate that completes a plan
        alone, in eviction order; and an option's plan is one victim only if the first candidate that frees
        memory on a GPU it lacks completes it. So only the options where that could be are watched (on each
        GPU it lacks, the largest model that could be evicted would do, ``ModelIndex.freeable_each``, and
        where it lacks several, models span them), each until its first such candidate; the models on no
        watched option are passed over, and the costlier checks (busy, hot) are asked only of a model that
        would complete a plan and of those read before it there. The arithmetic is ``_choose_disjoint``'s,
        step for step."""
        if target.base is not None or not budget.gpu_memory_gb or staying.count + 1 > budget.max_resident \
                or not all(options):
            return None
        caps, used = budget.gpu_memory_gb, staying.gpu_gb
        each, wide = self._index.freeable_each()
        watched: dict[int, tuple[int, ...]] = {}  # GPU -> the watched option it is in
        lacks: dict[tuple[int, ...], set[int]] = {}  # a watched option's GPUs without room for the target
        get = used.get
        # every GPU, and it fits on none (``FreeOrder``): a GPU is watched if its largest model to evict would
        # do, checked only once the walk reaches a model on it (the first victim is usually found long
        # before every GPU is reached), and for all of them only if the walk reads as many models as GPUs
        lazy: set[int] | None = set() if fits_nowhere and options is self._layout()[0] else None
        if lazy is None:  # (plain loops: a hundred options or more, read for every load that evicts)
            seen: set[int] = set()
            cap = caps.get
            for p in options:
                if not seen.isdisjoint(p):
                    return None  # options share a GPU
                seen.update(p)
                lack = [g for g in p if get(g, 0.0) + need > cap(g, 0.0) + 1e-9]
                if not lack:
                    return None  # it fits there (best fit decides)
                for g in lack:
                    sizes = each.get(g)
                    if not sizes or sizes[-1] < get(g, 0.0) + need - cap(g, 0.0) - 1e-6 \
                            or not (len(lack) == 1 or wide.get(g)):
                        break
                else:
                    watched.update(dict.fromkeys(p, p))
                    lacks[p] = set(lack)
        if not watched and lazy is None:
            return None
        index, domain = self._index, target.base
        on = tuple(sorted(watched)) if lazy is None and 8 * len(watched) <= len(caps) \
            and index.fewer_on(domain, watched) else None
        left = len(caps)  # models the walk reads before every GPU is checked
        # a candidate read on a watched option that does not complete it ends that option's chance only if it
        # is one ``_candidates`` yields (not busy, not hot): asked only once one completes a plan there
        pending: dict[tuple[int, ...], list[ModelRecord]] = {}
        yields: dict[str, bool] = {}

        def candidate(m: ModelRecord) -> bool:
            if m.name not in yields:
                yields[m.name] = m.state is not State.LOADED or not (self._busy(m) or m.name in hot)
            return yields[m.name]

        for state in (State.LOADED, State.SLEEPING):
            for m in index.lru(domain, state) if on is None else index.lru_on(domain, state, on):
                if lazy is not None:
                    left -= 1
                    for g in m.placed if left else each:
                        if g not in lazy:
                            lazy.add(g)
                            sizes = each.get(g)
                            if sizes and g in caps and sizes[-1] >= get(g, 0.0) + need - caps[g] - 1e-6:
                                watched[g] = (g,)
                    if not left:
                        lazy = None
                        if not watched:
                            return None
                if not m.placed or watched.keys().isdisjoint(m.placed) or m.pinned or m is target:
                    continue
                o = index.counted(m) or occupant(m)
                after = Occupant(m.name, m.spec.sleeping_gb, m.placed, counts=False) \
                    if state is State.LOADED and m.spec.sleep_level else None
                if not o.memory_gb > (after.memory_gb if after is not None else 0.0):
                    continue  # frees no memory: no plan takes it
                done: list[tuple[int, ...]] = []
                short: list[tuple[int, ...]] = []
                opts = {watched[g] for g in o.gpus if g in watched} if len(o.gpus) != 1 \
                    else (watched[o.gpus[0]],) if o.gpus[0] in watched else ()
                for opt in opts:
                    if opt in lacks and lacks[opt].isdisjoint(o.gpus):
                        continue  # frees nothing the option lacks (``_helps``)
                    enough = True
                    for g in opt:
                        u = used.get(g, 0.0)
                        if g in o.gpus:
                            u = u - o.memory_gb
                        if after is not None and g in after.gpus:
                            u = u + after.memory_gb
                        if u + need > caps.get(g, 0.0) + 1e-9:
                            enough = False
                    (done if enough else short).append(opt)
                if not done:
                    for opt in short:
                        pending.setdefault(opt, []).append(m)
                    continue
                if not candidate(m):
                    continue
                won = [opt for opt in done if not any(candidate(x) for x in pending.get(opt, ()))]
                if won:
                    return min(won), [m.name], True
                for opt in (*done, *short):  # a victim before it there, or two needed: not one
                    for g in opt:
                        watched.pop(g, None)
                if not watched and lazy is None:
                    return None
        return None

    def _walk(self, need: float, staying: Usage, target: ModelRecord, hot: Container[str], budget: Budget,
              options: list[tuple[int, ...]], floors: list[int], on: tuple[int, ...] | None,
              fits_nowhere: bool, least: int) -> tuple[tuple[int, ...], list[str] | None, bool]:
        """``_make_room`` over ``options`` (on a quarter of the GPUs or fewer: then only the candidates placed
        there are read)."""
        # (not when the count binds: then a victim anywhere frees a place)
        if on is None and budget.gpu_memory_gb and all(options) and staying.count + 1 <= budget.max_resident \
                and 4 * sum(len(o) for o in options) <= len(budget.gpu_memory_gb):
            on = tuple(g for o in options for g in o)
        asleep: list[bool] = []  # whether a candidate read would be put to sleep (it keeps a residue)
        candidates = noting_sleepers(self._candidates(target.base, target, hot=hot, on=on), asleep)
        placement, victims = choose_placement(need, staying, candidates, budget, options, fits_nowhere, least, floors)
        if victims is None and asleep:
            return (*choose_placement(need, staying, self._candidates(target.base, target, sleep=False, hot=hot,
                                                                      on=on), budget, options, fits_nowhere, least,
                                     floors),
                    False)
        return placement, victims, True

    def _could_fit(self, need: float, staying: Usage, target: ModelRecord, budget: Budget,
                   options: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
        """The options where ``target`` could fit once models that may be evicted there are gone
        (``ModelIndex.freeable_each``, a bound): an option where what stays is over its GPUs even then has no
        plan, so ``choose_placement`` decides the same without it, and without reading the candidates placed
        there (on a busy cluster most GPUs serve a model that cannot be moved). With each, the fewest victims
        a plan there could have: per GPU, the largest models first; over an option's GPUs, their sum where
        no victim can free two of them, else the largest."""
        if target.base is not None or not budget.gpu_memory_gb or not all(options):
            return options, [0] * len(options)
        caps, used = budget.gpu_memory_gb, staying.gpu_gb
        each, wide = self._index.freeable_each()
        could: list[tuple[int, ...]] = []
        floors: list[int] = []
        for o in options:
            most = total = 0
            for g in o:
                over = used.get(g, 0.0) + need - caps.get(g, 0.0)
                if over <= 1e-9:
                    continue
                freed, k, sizes = 0.0, 0, each.get(g, ())
                while freed < over - 1e-6 and k < len(sizes):  # the largest first: no fewer can free as much
                    k += 1
                    freed += sizes[-k]
                # (a margin above choose_placement's own: the bound's sums are added in another order)
                if freed < over - 1e-6:
                    break  # not even all of them: no plan there
                most, total = max(most, k), total + k
            else:
                could.append(o)
                floors.append(most if len(o) > 1 and any(wide.get(g) for g in o) else total)
        return could, floors

    def _still_blocked(self, p: Pass, target: ModelRecord, first: Waiter, options: list[tuple[int, ...]],
                       reserved: Usage | None, budget: Budget) -> bool:
        """Whether ``target``, found blocked before, is blocked still, found by planning again only the
        options where a GPU was touched since (a model moved or fell idle there, or the room reserved on it
        differs), and those it was not found blocked on (a move on a node changes its freest GPUs): the
        others are as they were, and were blocked. False when it must be planned in full (it may fit, or the
        finding no longer applies)."""
        b = self._blocked.get(target.name)
        if b is None or p.now >= b.until or b.budget is not self.budget or budget is not self.budget \
                or b.model != first.model or b.gen != self._rules_gen or target.base is not None \
                or not budget.gpu_memory_gb or not all(options):
            return False
        if self._count_binds(target, reserved, budget):
            return False  # the count may bind: options are not independent of one another
        res = reserved.gpu_gb if reserved is not None else {}
        cooled = {g for until, gpus in b.cooling if until <= p.now for g in gpus}  # no longer protected there
        touched = self._touched(options, b, res, cooled)
        if b.options is not options and b.options != options:
            known, again = set(b.options), set(touched)
            touched = [o for o in options if o in again or o not in known]
            b.options = options
        noted: list[tuple[float, tuple[int, ...]]] = []
        if touched:
            need = target.memory_gb
            gpus = tuple(sorted({g for o in touched for g in o}))  # (what is held elsewhere is not read)
            _, victims = choose_placement(need, self._room_usage(False, target, gpus, reserved), [], budget, touched)
            if victims == []:
                return False
            staying = self._room_usage(True, target, gpus, reserved)
            hot = Hot(self, p.now, p.cooling, first, noted) if self.config.keep_idle > 0 else ()
            for o in touched:
                if self._make_room(need, staying, target, hot, budget, [o], on=o)[1] is not None:
                    return False
        p.cooling.extend(until for until, _ in b.cooling)  # (the timer: as planning in full would arm it)
        b.stamp, b.reserved = self._stamp, dict(res)
        # what still protects, and the hot models found where it looked again
        b.cooling = (*(c for c in b.cooling if c[0] > p.now), *noted)
        return True

    def _touched(self, options: list[tuple[int, ...]], b: Blocked, res: dict[int, float],
                 cooled: set[int]) -> list[tuple[int, ...]]:
        """The options with a GPU touched since ``b`` was found (``_touch``), whose reserved room differs, or
        where a hot model cooled down, in their order: found from the log of touches, without reading
        every option's GPUs (unless the log no longer reaches back that far)."""
        if b.stamp < self._touch_floor:
            stamps = self._gpu_stamp
            return [o for o in options if any(stamps.get(g, 0) > b.stamp or res.get(g, 0.0) != b.reserved.get(g, 0.0)
                                              or g in cooled for g in o)]
        log = self._touch_log
        changed = {g for _, g in log[bisect_right(log, (b.stamp, math.inf)):]}
        changed.update(g for g in res.keys() | b.reserved.keys() if res.get(g, 0.0) != b.reserved.get(g, 0.0))
        changed |= cooled
        if options is self._layout()[0]:  # every GPU, each an option of its own, in order
            return [(g,) for g in sorted(changed) if g in self.budget.gpu_memory_gb]
        return [o for o in options if not changed.isdisjoint(o)]

    def _note_blocked(self, p: Pass, target: ModelRecord, first: Waiter, reserved: Usage | None, budget: Budget,
                      options: list[tuple[int, ...]], noted: list[tuple[float, tuple[int, ...]]]) -> None:
        """Remember that ``target`` is blocked (``_still_blocked``), while that finding can be checked so:
        before its oldest waiter's fairness bound (then drains are planned, on every pass), when it was
        planned on the budget it will be checked on (not the nominal one, ``GpuUsage``), and when the count
        did not bind (then a model leaving anywhere frees a place, and the options are not independent)."""
        bound = first.arrived + self.config.max_wait
        if target.base is not None or p.now >= bound or not self.budget.gpu_memory_gb or budget is not self.budget \
                or self._count_binds(target, reserved, budget):
            self._blocked.pop(target.name, None)
            return
        self._blocked[target.name] = Blocked(first.model, self._stamp, self.budget, self._rules_gen,
                                             dict(reserved.gpu_gb) if reserved is not None else {}, tuple(noted),
                                             bound, options)
