"""Request traces for the simulator (sim.py): seeded and deterministic. Poisson arrivals, and a choice of
model per request following Zipf popularity, bursts, alternating pairs, uniform popularity, or a Zipf
ranking that rotates."""

from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_SERVICE = 3.0  # seconds a model takes to answer a request once granted


@dataclass(frozen=True, slots=True)
class Request:
    at: float  # arrival time, seconds from the start of the trace
    model: str
    service: float  # how long the model takes to answer it once granted


@dataclass(frozen=True, slots=True)
class Trace:
    name: str
    models: tuple[str, ...]
    capacity: int  # models resident at once (max_resident)
    requests: tuple[Request, ...]  # in arrival order

    @property
    def sequence(self) -> list[str]:
        return [r.model for r in self.requests]


def model_names(n: int) -> tuple[str, ...]:
    return tuple(f"m{i}" for i in range(n))


def poisson_arrivals(rng: random.Random, rate: float, duration: float) -> list[float]:
    """Arrival times of a Poisson process of ``rate`` per second over ``[0, duration)``."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _zipf_cum_weights(n: int, exponent: float) -> list[float]:
    cum: list[float] = []
    total = 0.0
    for rank in range(n):
        total += 1.0 / (rank + 1) ** exponent
        cum.append(total)
    return cum


def _rng(name: str, seed: int) -> random.Random:
    """One independent, reproducible stream per trace shape and seed."""
    return random.Random(f"{name}:{seed}")


def _trace(name: str, models: tuple[str, ...], capacity: int, times: list[float], picks: list[str],
           service: float) -> Trace:
    return Trace(name, models, capacity, tuple(Request(t, m, service) for t, m in zip(times, picks, strict=True)))


def zipf_trace(*, models: int = 6, capacity: int = 2, rate: float = 1.0, duration: float = 7200.0,
               service: float = DEFAULT_SERVICE, exponent: float = 1.0, seed: int = 0) -> Trace:
    """Each request picks model of rank r with probability proportional to 1 / r**exponent."""
    rng = _rng("zipf", seed)
    names = model_names(models)
    times = poisson_arrivals(rng, rate, duration)
    picks = rng.choices(names, cum_weights=_zipf_cum_weights(models, exponent), k=len(times))
    return _trace("zipf", names, capacity, times, picks, service)


def uniform_trace(*, models: int = 8, capacity: int = 3, rate: float = 1.0, duration: float = 7200.0,
                  service: float = DEFAULT_SERVICE, seed: int = 0) -> Trace:
    """Every model equally popular: nothing to learn, the most loads for every policy."""
    rng = _rng("uniform", seed)
    names = model_names(models)
    times = poisson_arrivals(rng, rate, duration)
    picks = [rng.choice(names) for _ in times]
    return _trace("uniform", names, capacity, times, picks, service)


def burst_trace(*, models: int = 3, capacity: int = 1, rate: float = 1.0, duration: float = 7200.0,
                service: float = DEFAULT_SERVICE, mean_burst: float = 60.0, stray: float = 0.1,
                seed: int = 0) -> Trace:
    """Traffic comes in bursts on one model (exponential lengths, ``mean_burst`` seconds), then moves to
    another; a fraction ``stray`` of the requests goes to some other model at random meanwhile."""
    if models < 2:
        raise ValueError("bursts need at least 2 models")
    rng = _rng("bursts", seed)
    names = model_names(models)
    times = poisson_arrivals(rng, rate, duration)
    current = 0
    burst_end = rng.expovariate(1.0 / mean_burst)
    picks: list[str] = []
    for t in times:
        while t >= burst_end:
            current = (current + rng.randrange(1, models)) % models
            burst_end += rng.expovariate(1.0 / mean_burst)
        if rng.random() < stray:
            picks.append(names[(current + rng.randrange(1, models)) % models])
        else:
            picks.append(names[current])
    return _trace("bursts", names, capacity, times, picks, service)


def alternating_trace(*, pairs: int = 2, capacity: int = 1, rate: float = 1.0, duration: float = 7200.0,
                      service: float = DEFAULT_SERVICE, switch_every: float = 600.0, seed: int = 0) -> Trace:
    """Models in pairs; one pair is active at a time (the next one every ``switch_every`` seconds) and
    its requests alternate strictly between its two models: interleaved traffic on two models that do
    not fit together when ``capacity`` is 1, the worst case for per-request LRU."""
    rng = _rng("alternating", seed)
    names = model_names(2 * pairs)
    times = poisson_arrivals(rng, rate, duration)
    picks: list[str] = []
    flip = 0
    for t in times:
        pair = int(t // switch_every) % pairs
        picks.append(names[2 * pair + flip])
        flip ^= 1
    return _trace("alternating", names, capacity, times, picks, service)


def rotating_trace(*, models: int = 6, capacity: int = 2, rate: float = 1.0, duration: float = 7200.0,
                   service: float = DEFAULT_SERVICE, period: float = 600.0, exponent: float = 1.0,
                   seed: int = 0) -> Trace:
    """Zipf popularity whose ranking rotates by one place every ``period`` seconds: yesterday's favourite
    fades, the history a policy learned goes stale."""
    rng = _rng("rotating", seed)
    names = model_names(models)
    times = poisson_arrivals(rng, rate, duration)
    cum = _zipf_cum_weights(models, exponent)
    ranks = rng.choices(range(models), cum_weights=cum, k=len(times))
    picks = [names[(rank + int(t // period)) % models] for t, rank in zip(times, ranks, strict=True)]
    return _trace("rotating", names, capacity, times, picks, service)


def standard_traces(*, rate: float = 1.0, duration: float = 7200.0, service: float = DEFAULT_SERVICE,
                    seed: int = 0) -> list[Trace]:
    """The benchmark's trace shapes (3-8 models, 1-3 slots)."""
    r, d, s = rate, duration, service
    return [
        zipf_trace(models=6, capacity=2, rate=r, duration=d, service=s, seed=seed),
        burst_trace(models=3, capacity=1, rate=r, duration=d, service=s, seed=seed),
        alternating_trace(pairs=2, capacity=1, rate=r, duration=d, service=s, seed=seed),
        uniform_trace(models=8, capacity=3, rate=r, duration=d, service=s, seed=seed),
        rotating_trace(models=6, capacity=2, rate=r, duration=d, service=s, seed=seed),
    ]


