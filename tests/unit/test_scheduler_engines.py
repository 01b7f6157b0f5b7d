"""Several external engines (endpoint mode with more than one URL), as transcripts: the engines are
replicas of one external model, each with its own adapter slots; an adapter is a replicated model with
one unit per engine. Requests are balanced over the engines that serve them, adapters go where a slot is
free, and an engine that stops answering is down (its adapters with it) until it answers again."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.scheduler_run import Run
from vllm_model_router.scheduler import (
    Grant,
    LoadDone,
    ModelExited,
    ModelFound,
    ModelSpec,
    Reject,
    RequestArrived,
    RequestFinished,
    Scheduler,
    SchedulerConfig,
    StartLoad,
    State,
    StopDone,
    StopModel,
    StopReason,
    Tick,
    TimerAt,
)
from vllm_model_router.scheduler.events import Event

E, E1 = "@engine", "@engine@1"


def engines(*adapters: str, slots: int = 1, target: int = 32) -> dict[str, ModelSpec]:
    specs = {u: ModelSpec(external=True, max_adapters=slots, group=E, replica=i, replicas_max=2)
             for i, u in enumerate((E, E1))}
    for a in adapters:
        specs.update({u: ModelSpec(base=b, group=a, replica=i, replicas_max=2, target_in_flight=target)
                      for i, (u, b) in enumerate(((a, E), (f"{a}@1", E1)))})
    return specs


def test_requests_for_the_engines_own_models_are_spread_over_the_engines_that_serve_them() -> None:
    r = Run(engines(), max_resident=2)
    assert r.step(RequestArrived(1, E)) == [Grant(1, E)]
    assert r.step(RequestArrived(2, E)) == [Grant(2, E1)]  # fewest outstanding
    assert r.step(RequestArrived(3, E)) == [Grant(3, E)]
    only = frozenset({E1})  # a model only the second engine lists
    assert r.step(RequestArrived(4, E, eligible=only)) == [Grant(4, E1)]
    assert r.step(RequestArrived(5, E, eligible=only)) == [Grant(5, E1)]


def test_an_adapter_goes_to_an_engine_with_a_free_slot_before_evicting_one() -> None:
    r = Run(engines("x", "y"), max_resident=2)
    assert r.step(RequestArrived(1, "y")) == [StartLoad("y")]  # both free: the first engine
    r.step(LoadDone("y", True))
    r.step(RequestFinished(1), at=1)  # y idle on the first engine, which has one slot
    assert r.step(RequestArrived(2, "x"), at=2) == [StartLoad("x@1")]  # the second engine has room
    assert r.step(LoadDone("x@1", True)) == [Grant(2, "x@1")]
    assert r.s.state_of("y") is State.LOADED


def test_a_hot_adapter_is_loaded_on_a_second_engine() -> None:
    r = Run(engines("x", slots=2, target=1), max_resident=2)
    r.step(RequestArrived(1, "x"))
    r.step(RequestArrived(2, "x"))
    assert r.step(LoadDone("x", True)) == [Grant(1, "x"), Grant(2, "x"), StartLoad("x@1")]
    r.step(LoadDone("x@1", True))
    assert r.step(RequestArrived(3, "x")) == [Grant(3, "x@1")]


def test_an_engine_that_stops_answering_is_down_until_it_answers_again() -> None:
    r = Run(engines("x", slots=2), max_resident=2)
    r.step(RequestArrived(1, "x"))
    assert r.step(LoadDone("x", True)) == [Grant(1, "x")]
    r.step(RequestFinished(1))
    assert r.step(ModelExited(E, "unreachable")) == []
    assert r.s.state_of(E) is State.FAILED and r.s.state_of("x") is State.UNLOADED  # its adapters with it
    # its requests go to the other engine; the adapter is placed there on demand
    assert r.step(RequestArrived(2, E)) == [Grant(2, E1)]
    assert r.step(RequestArrived(3, "x")) == [StartLoad("x@1")]
    assert r.step(LoadDone("x@1", True)) == [Grant(3, "x@1")]
    # a model only the engine that is down serves: 502 at once, not a wait for load_timeout
    assert r.step(RequestArrived(4, E, eligible=frozenset({E}))) == [
        Reject(4, E, 502, "no vLLM engine that serves @engine is reachable")]
    assert r.step(ModelFound(E)) == []
    assert r.s.state_of(E) is State.LOADED
    assert r.step(RequestArrived(5, E, eligible=frozenset({E}))) == [Grant(5, E)]


def test_with_every_engine_down_waiting_requests_get_502_and_new_ones_at_once() -> None:
    r = Run(engines("x", slots=1), max_resident=2)
    assert r.step(RequestArrived(1, "x")) == [StartLoad("x")]
    # x was loading on E: it goes with it, and its waiter is served by the other engine
    assert r.step(ModelExited(E, "unreachable")) == [StartLoad("x@1")]
    assert r.step(ModelExited(E1, "unreachable")) == [Reject(1, "x", 502, "no vLLM engine that serves x is reachable")]
    assert r.step(RequestArrived(2, E)) == [Reject(2, E, 502, "no vLLM engine that serves @engine is reachable")]
    assert r.step(ModelFound(E1)) == []
    assert r.step(RequestArrived(3, "x")) == [StartLoad("x@1")]


def test_engines_are_never_stopped_nor_started_and_an_idle_extra_adapter_goes() -> None:
    r = Run(engines("x", slots=2, target=1), max_resident=2)
    r.step(RequestArrived(1, "x"))
    r.step(RequestArrived(2, "x"))
    r.step(LoadDone("x", True))
    r.step(LoadDone("x@1", True), at=1)
    r.step(RequestFinished(1), at=2)
    r.step(RequestFinished(2), at=2)
    out = r.step(Tick(), at=100)  # long idle: the extra copy of x goes, the engines stay
    assert out == [StopModel("x@1", StopReason.SCALE_DOWN, "extra replica idle for 60s")]
    assert r.step(Tick(), at=1000) == []


# ---------------------------------------------------------------- random sequences (hypothesis)
@given(ops=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 50), st.floats(0, 30)), max_size=80),
       slots=st.integers(1, 2), target=st.sampled_from([1, 32]))
def test_engines_up_and_down_never_start_or_stop_an_engine_and_answer_every_request_once(
        ops: list[tuple[int, int, float]], slots: int, target: int) -> None:
    names = [E, "x", "y"]
    s = Scheduler(SchedulerConfig(engines("x", "y", slots=slots, target=target), 2, None, 300.0, 30.0))
    now, next_id = 0.0, 1
    up = {E, E1}
    loading: set[str] = set()
    stopping: set[str] = set()
    held: set[str] = set()  # adapter units loaded (per the effects)
    waiting: set[int] = set()
    in_flight: dict[int, str] = {}
    answers: dict[int, int] = {}
    timer: float | None = None

    def base(unit: str) -> str:
        return E1 if unit.endswith("@1") else E

    def feed(event: Event) -> None:
        nonlocal timer
        for e in s.handle(event, now):
            match e:
                case StartLoad(m):
                    assert m not in (E, E1), "an engine was started"
                    assert base(m) in up, f"{m} loaded on an engine that is down"
                    assert m not in loading | held | stopping
                    loading.add(m)
                case StopModel(m):
                    assert m not in (E, E1), "an engine was stopped"
                    assert not [r for r, u in in_flight.items() if u == m], f"busy {m} stopped"
                    loading.discard(m)
                    held.discard(m)
                    stopping.add(m)
                case Grant(r, m):
                    assert r in waiting
                    waiting.discard(r)
                    answers[r] = answers.get(r, 0) + 1
                    assert (m in (E, E1) and m in up) or (m in held and base(m) in up), f"granted on {m}"
                    in_flight[r] = m
                case Reject(r):
                    assert r in waiting
                    waiting.discard(r)
                    answers[r] = answers.get(r, 0) + 1
                case TimerAt(when):
                    timer = when
        for engine in (E, E1):
            assert len([u for u in held | loading if base(u) == engine]) <= slots

    for op, pick, dt in ops:
        now += dt
        if timer is not None and now >= timer:
            timer = None
            feed(Tick())
        if op in (0, 1):
            r, next_id = next_id, next_id + 1
            waiting.add(r)
            eligible = None if pick % 3 else frozenset({(E, E1)[pick % 2]})
            feed(RequestArrived(r, names[pick % 3], eligible=eligible if names[pick % 3] == E else None))
        elif op == 2 and in_flight:
            r = sorted(in_flight)[pick % len(in_flight)]
            del in_flight[r]
            feed(RequestFinished(r))
        elif op == 3 and loading:
            m = sorted(loading)[pick % len(loading)]
            loading.discard(m)
            if pick % 4:
                held.add(m)
            feed(LoadDone(m, pick % 4 != 0, "boom"))
        elif op == 4 and stopping:
            m = sorted(stopping)[pick % len(stopping)]
            stopping.discard(m)
            feed(StopDone(m))
        elif op == 5:
            engine = (E, E1)[pick % 2]
            if engine in up:
                up.discard(engine)
                for u in [u for u in held | loading if base(u) == engine]:
                    held.discard(u)
                    loading.discard(u)
                for r in [r for r, u in in_flight.items() if u == engine or (base(u) == engine and u not in (E, E1))]:
                    del in_flight[r]  # their connections broke
                    feed(RequestFinished(r))
                feed(ModelExited(engine, "unreachable"))
            else:
                up.add(engine)
                feed(ModelFound(engine))
    for engine in (E, E1):  # settle: the engines come back, everything completes
        if engine not in up:
            up.add(engine)
            feed(ModelFound(engine))
    for _ in range(500):
        if in_flight:
            feed(RequestFinished(in_flight.popitem()[0]))
        elif stopping:
            feed(StopDone(stopping.pop()))
        elif loading:
            m = loading.pop()
            held.add(m)
            feed(LoadDone(m, True))
        elif waiting:
            now = max(now + 1, timer or 0)
            feed(Tick())
        else:
            break
    assert not waiting
    assert all(answers.get(r) == 1 for r in range(1, next_id)), answers


def test_an_adapter_goes_where_an_idle_adapter_can_make_room_at_once() -> None:
    r = Run(engines("a", "b", "c"), max_resident=2)
    assert r.step(RequestArrived(1, "a")) == [StartLoad("a")]
    r.step(LoadDone("a", True))  # a busy on the first engine
    assert r.step(RequestArrived(2, "b")) == [StartLoad("b@1")]
    r.step(LoadDone("b@1", True))
    r.step(RequestFinished(2), at=1)  # b idle on the second engine
    # no free slot anywhere: the engine with an idle adapter is used, not the first one (a is busy there)
    assert r.step(RequestArrived(3, "c"), at=2) == [StopModel("b@1", StopReason.LRU, "evicted to make room for c@1")]
    assert r.step(StopDone("b@1")) == [StartLoad("c@1")]
