"""Ranking models by how likely they are requested next, on hand-made histories."""

from __future__ import annotations

import calendar
import math
from pathlib import Path

import pytest

from vllm_model_router.state.predict import DAY, HOUR, daily_rate, rank, ranked_models, recent_rate
from vllm_model_router.state.store import ModelHistory, Store, hour_of


def utc(day: int, hour: int, minute: int = 0) -> float:
    return float(calendar.timegm((2026, 11, day, hour, minute, 0)))


def history(name: str, *requests: float) -> ModelHistory:
    hourly: dict[int, int] = {}
    for at in requests:
        hourly[hour_of(at)] = hourly.get(hour_of(at), 0) + 1
    return ModelHistory(name, max(requests, default=None), hourly)


def test_a_model_used_every_day_at_nine_ranks_first_just_before_nine() -> None:
    now = utc(20, 8, 55)
    every_morning = history("morning", *(utc(d, 9, m) for d in range(6, 20) for m in (1, 3, 7, 12)))
    # busier overall, but in the afternoons, and a little this morning (an hour and more ago)
    afternoons = history("afternoon", *(utc(d, 15, m) for d in range(6, 20) for m in range(0, 60, 5)),
                         utc(20, 7, 10), utc(20, 7, 40))
    rarely = history("rarely", utc(19, 20))
    ranked = rank({"afternoon": afternoons, "rarely": rarely, "morning": every_morning}, now)
    assert [p.model for p in ranked] == ["morning", "afternoon", "rarely"]
    assert ranked[0].daily > ranked[1].score
    # at 16:00 the afternoon model leads again
    assert ranked_models({"afternoon": afternoons, "morning": every_morning}, utc(20, 14, 55))[0] == "afternoon"


def test_hammered_five_minutes_ago_beats_once_last_week() -> None:
    now = utc(20, 12, 30)
    hammered = history("hammered", *(utc(20, 12, 20) + i for i in range(0, 60, 2)))
    once = history("once", utc(13, 12, 40))  # last week, even at this time of day
    ranked = rank({"once": once, "hammered": hammered}, now)
    assert [p.model for p in ranked] == ["hammered", "once"]
    assert ranked[0].recent > 10 * ranked[1].score > 0


def test_recent_rate_halves_every_half_life() -> None:
    h = history("a", utc(20, 10, 0))
    r0 = recent_rate(h, utc(20, 10, 0))
    assert recent_rate(h, utc(20, 11, 0)) == pytest.approx(r0 / 2)
    assert recent_rate(h, utc(20, 12, 0), half_life=2 * HOUR) == pytest.approx(recent_rate(h, utc(20, 10, 0),
                                                                                           half_life=2 * HOUR) / 2)
    # the requests of a bucket count from the time they were made (up to last_used), not the hour's end
    burst = history("b", *(utc(20, 10, 5) for _ in range(10)))
    assert recent_rate(burst, utc(20, 10, 5)) > recent_rate(burst, utc(20, 10, 50))
    assert recent_rate(history("none"), utc(20, 10)) == 0.0


def test_daily_rate_is_the_weighted_mean_of_previous_days() -> None:
    now = utc(20, 9, 0)
    # 6 requests in the 9:00 hour on each of the last 14 days: 6 per hour at this time of day
    every_day = history("a", *(utc(d, 9, m) for d in range(6, 20) for m in range(0, 60, 10)))
    assert daily_rate(every_day, now) == pytest.approx(6.0)
    # yesterday only: a fraction of the weights
    yesterday = history("b", *(utc(19, 9, m) for m in range(0, 60, 10)))
    weights = [0.9**i for i in range(14)]
    assert daily_rate(yesterday, now) == pytest.approx(6.0 / sum(weights))
    # a window half over the bucket sees half of it
    assert daily_rate(every_day, now - HOUR / 2) == pytest.approx(3.0)
    assert daily_rate(every_day, now + DAY * 0, days=0) == 0.0


def test_ties_and_empty_histories() -> None:
    now = utc(20, 12)
    never_a = ModelHistory("a", None, {})
    never_b = ModelHistory("b", None, {})
    ranked = rank({"b": never_b, "a": never_a}, now)
    assert [p.model for p in ranked] == ["a", "b"] and all(p.score == 0.0 for p in ranked)
    old = ModelHistory("c", utc(1, 0), {})  # a last_used without counts (pruned): ranks by recency
    assert ranked_models({"a": never_a, "c": old}, now) == ["c", "a"]
    assert not math.isnan(rank({"x": history("x", now + 60)}, now)[0].score)  # a clock that went back


def test_ranks_what_the_store_holds(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as s:
        for d in range(10, 20):
            s.record_request("morning", utc(d, 9, 2))
        for i in range(30):
            s.record_request("now", utc(20, 11, 50) + i)
        s.record_request("old", utc(1, 12))
        s.flush()
        assert ranked_models(s.histories(), utc(20, 12)) == ["now", "morning", "old"]
        assert ranked_models(s.histories(), utc(21, 8, 55)) == ["morning", "now", "old"]
