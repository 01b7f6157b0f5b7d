"""Which models are likely to be requested next, from their usage history. Pure: no clock, no I/O.

Input: per model, the time of its latest request and its request counts per hour bucket (keyed by the
bucket's start, Unix seconds, as ``store.ModelHistory`` holds them), and ``now``. Each model gets an
expected request rate for the near future (requests per hour), the sum of two estimates:

- ``recent``: exponentially decayed request counts (half-life ``half_life``): the rate of a model in use
  right now. A bucket's requests are taken as spread evenly over the part of the hour that had passed
  when they were counted (up to ``last_used`` for the latest one), so a burst 5 minutes ago weighs as
  such even in an hour bucket.
- ``daily``: what the model got in the next ``horizon`` at this time of day on each of the previous
  ``days`` days (a weighted mean, yesterday weighing most, ``day_decay`` per day further back): the
  model that is used every morning at 9 ranks first a few minutes before 9.

Days are 24-hour periods of Unix time, so "this time of day" is the same UTC time (a daylight saving
change shifts local habits by an hour twice a year; the one-hour ``horizon`` absorbs part of that).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

HOUR = 3600
DAY = 24 * HOUR


class UsageHistory(Protocol):
    """What ranking needs of a model's history (``store.ModelHistory`` has it)."""

    @property
    def last_used(self) -> float | None: ...

    @property
    def hourly(self) -> Mapping[int, int]: ...


@dataclass(frozen=True, slots=True)
class Prediction:
    model: str
    score: float  # expected requests per hour in the near future: recent + daily_weight * daily
    recent: float  # requests per hour, from the decayed recent counts
    daily: float  # requests per hour in the next ``horizon`` at this time of day on previous days
    last_used: float | None


def _bucket(at: float) -> int:
    return math.floor(at / HOUR) * HOUR


def recent_rate(history: UsageHistory, now: float, half_life: float = HOUR) -> float:
    """Exponentially decayed request rate (requests per hour) at ``now``."""
    tau = half_life / math.log(2)
    horizon = 40 * half_life  # older buckets weigh less than 1e-12
    last = history.last_used
    total = 0.0
    for start, count in history.hourly.items():
        if count <= 0 or start + HOUR <= now - horizon:
            continue
        lo = min(float(start), now)
        hi = min(float(start + HOUR), now)
        if last is not None and start <= last < start + HOUR:
            hi = min(hi, last)  # nothing in this bucket came after the latest request
        hi = max(hi, lo)
        if hi - lo < 1e-9:
            weight = math.exp(-(now - hi) / tau)
        else:  # the mean of exp(-(now - t) / tau) for t spread evenly over [lo, hi]
            weight = tau / (hi - lo) * (math.exp(-(now - hi) / tau) - math.exp(-(now - lo) / tau))
        total += count * weight
    return total / tau * HOUR


def daily_rate(history: UsageHistory, now: float, horizon: float = HOUR, days: int = 14,
               day_decay: float = 0.9) -> float:
    """Requests per hour the model got in ``[now, now + horizon)`` shifted back by 1..``days`` days, a
    weighted mean over the days (weights ``day_decay ** (d - 1)``; a day without requests counts as 0)."""
    if days < 1 or horizon <= 0:
        return 0.0
    hourly = history.hourly
    weighted = weights = 0.0
    for d in range(1, days + 1):
        lo = now - d * DAY
        hi = lo + horizon
        got = 0.0
        start = _bucket(lo)
        while start < hi:
            count = hourly.get(start, 0)
            if count > 0:
                overlap = min(hi, start + HOUR) - max(lo, start)
                got += count * overlap / HOUR
            start += HOUR
        w = day_decay ** (d - 1)
        weighted += w * got
        weights += w
    return weighted / weights / (horizon / HOUR)


def rank(histories: Mapping[str, UsageHistory], now: float, *, half_life: float = HOUR, horizon: float = HOUR,
         days: int = 14, day_decay: float = 0.9, daily_weight: float = 1.0) -> list[Prediction]:
    """Models by how likely they are requested next, most likely first (ties: most recently used, then
    by name)."""
    out = []
    for model, h in histories.items():
        recent = recent_rate(h, now, half_life)
        daily = daily_rate(h, now, horizon, days, day_decay)
        out.append(Prediction(model, recent + daily_weight * daily, recent, daily, h.last_used))
    out.sort(key=lambda p: (-p.score, -(p.last_used if p.last_used is not None else -math.inf), p.model))
    return out


def ranked_models(histories: Mapping[str, UsageHistory], now: float) -> list[str]:
    """Just the names, most likely first, with the default settings."""
    return [p.model for p in rank(histories, now)]
