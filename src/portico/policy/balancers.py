"""Load-balancing policies. A balancer only ever chooses among the endpoints it is given.

The seam is one method, ``pick(endpoints, key)``: the caller passes the endpoints that are
available right now and an optional affinity key (client address, header value...).
Balancers keep only their own cursor state; endpoint counters such as ``in_flight`` live on
the endpoints. Registry: ``BALANCERS[name]``, each a zero-argument factory.

Per request the caller does::

    candidates = select_candidates(service.endpoints, now, exclude=tried, slow_start=window)
    endpoint = service.balancer.pick(candidates, key)   # None only if candidates is empty

``select_candidates`` applies availability (up, not ejected, not draining, not already tried),
the backup rule, and slow start. Slow start is a factor ``ramp`` in [0.1, 1] that
``select_candidates`` stores on each endpoint just before the pick, because ``pick`` has no
clock. Balancers that weigh endpoints use ``weight * ramp`` as the effective weight; the
others (``round_robin``) ignore both, by definition.

Keyed balancers (``ip_hash``, ``consistent_hash``) live in ``policy.hashing`` with the sticky
cookie; they are registered here so that config sees one registry.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Container, Sequence
from typing import Protocol

from portico.policy.candidate import C, Candidate
from portico.policy.hashing import ConsistentHash, IpHash

SLOW_START_FLOOR = 0.1
"""Share a just-recovered endpoint starts at: high enough to be probed by real traffic at
once, low enough that a cold cache or JIT does not take a full share of load."""

LATENCY_DECAY = 10.0
"""Seconds for the latency EWMA to forget ~63% of the past; Finagle's default. Shorter reacts
faster to a slow backend but flaps on noise."""

_UNMEASURED_PENALTY = 1e6
"""Cost (seconds) of an endpoint that has requests in flight but no latency sample yet: it may
be hanging, so prefer any measured endpoint (Finagle's rule)."""


class Balancer(Protocol):
    def pick(self, endpoints: Sequence[C], key: str | None = None) -> C | None: ...


def slow_start_factor(healthy_since: float | None, now: float, window: float) -> float:
    """Share of its weight an endpoint gets: linear from SLOW_START_FLOOR to 1 over ``window``."""
    if healthy_since is None or window <= 0.0:
        return 1.0
    age = now - healthy_since
    if age >= window:
        return 1.0
    if age <= 0.0:
        return SLOW_START_FLOOR
    return SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * (age / window)


def select_candidates(
    endpoints: Sequence[C],
    now: float,
    exclude: Container[Candidate] = (),
    slow_start: float = 0.0,
) -> Sequence[C]:
    """The endpoints a balancer may choose from now; empty means answer 503 at once.

    Available primaries if there are any, else available backups. ``exclude`` holds the
    endpoints already tried for this request (retries go elsewhere). ``slow_start`` is the
    ramp window in seconds (0 = off); each returned endpoint's ``ramp`` is refreshed.

    When every endpoint is an available primary and nothing is excluded, the input sequence
    itself is returned: the common case allocates nothing.
    """
    plain = True
    for ep in endpoints:
        since = ep.healthy_since
        ramp = 1.0 if since is None else slow_start_factor(since, now, slow_start)
        if ep.ramp != ramp:
            ep.ramp = ramp
        if plain and (ep.backup or not ep.up or ep.ejected or ep.draining or ep in exclude):
            plain = False
    if plain:
        return endpoints
    primaries = [ep for ep in endpoints if not ep.backup and ep.available and ep not in exclude]
    if primaries:
        return primaries
    return [ep for ep in endpoints if ep.backup and ep.available and ep not in exclude]


def _effective(ep: Candidate) -> float:
    return ep.weight * ep.ramp


class RoundRobin:
    """Each endpoint in turn. Best when requests cost about the same and backends are alike."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, endpoints: Sequence[C], key: str | None = None) -> C | None:
        n = len(endpoints)
        if n == 0:
            return None
        i = self._next % n
        self._next = i + 1
        return endpoints[i]


class WeightedRoundRobin:
    """nginx's smooth weighted round robin: shares follow weights, with no bursts.

    Every pick adds each candidate's effective weight to its running score, picks the highest
    score and subtracts the total from it. For weights 5, 1, 1 that gives a a b a c a a, not
    a a a a a b c, so a backend never gets a run of requests longer than its share implies.
    Scores are kept per endpoint object here, not on the endpoint, because one endpoint may
    serve several upstreams with different weights. Ties go to the earlier endpoint, as in
    nginx; when the candidate set keeps changing (one endpoint often excluded by retries),
    that favours the earlier of two equal endpoints by a couple of percent.
    """

    __slots__ = ("_score",)

    def __init__(self) -> None:
        self._score: dict[Candidate, float] = {}

    def pick(self, endpoints: Sequence[C], key: str | None = None) -> C | None:
        score = self._score
        best: C | None = None
        best_score = 0.0
        total = 0.0
        for ep in endpoints:
            w = ep.weight * ep.ramp
            s = score.get(ep, 0.0) + w
            score[ep] = s
            total += w
            if best is None or s > best_score:
                best, best_score = ep, s
        if best is not None:
            score[best] = best_score - total
        return best


class LeastConnections:
    """Fewest in-flight requests per unit of effective weight; ties go round robin.

    Best when request cost varies (slow reports next to fast lookups), so that a backend
    stuck on slow work stops being handed more. The load counted is ``in_flight + 1`` (the
    load after this request, as HAProxy does) so that weight and slow start matter even
    between idle endpoints: an idle weight-3 endpoint takes three requests before an idle
    weight-1 one takes its second.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, endpoints: Sequence[C], key: str | None = None) -> C | None:
        n = len(endpoints)
        if n == 0:
            return None
        start = self._next % n
        best: C | None = None
        best_load = 0.0
        best_at = start
        # Scan from just past the previous winner, so ties take turns evenly (a busy endpoint
        # among them does not give the one after it a double share).
        for j in range(n):
            i = (start + j) % n
            ep = endpoints[i]
            load = (ep.in_flight + 1) / (ep.weight * ep.ramp)
            if best is None or load < best_load:
                best, best_load, best_at = ep, load, i
        self._next = best_at + 1
        return best


class PowerOfTwo:
    """Two distinct endpoints at random; the one with less in-flight per weight wins.

    Nearly as good as least connections at spreading load, O(1) per pick, and it does not
    herd: several workers or proxies, each with its own view of ``in_flight``, do not all
    pile onto the same "least loaded" endpoint (Mitzenmacher; Envoy's default least_request).
    """

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def pick(self, endpoints: Sequence[C], key: str | None = None) -> C | None:
        n = len(endpoints)
        if n <= 1:
            return endpoints[0] if n else None
        randrange = self._rng.randrange
        i = randrange(n)
        j = randrange(n - 1)
        if j >= i:  # draw from the n-1 others, so the two are always distinct
            j += 1
        a, b = endpoints[i], endpoints[j]
        if (b.in_flight + 1) * _effective(a) < (a.in_flight + 1) * _effective(b):
            return b
        return a


class RandomChoice:
    """A random endpoint, in proportion to effective weight.

    Stateless, so several workers need no coordination; use it when any balancer will do or
    as a baseline. Over many requests shares converge to the weights, but short runs are
    lumpy: prefer weighted_round_robin for even short-term spread.
    """

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def pick(self, endpoints: Sequence[C], key: str | None = None) -> C | None:
        n = len(endpoints)
        if n == 0:
            return None
        total = 0.0
        first = _effective(endpoints[0])
        uniform = True
        for ep in endpoints:
            w = _effective(ep)
            total += w
            uniform = uniform and w == first
        if uniform:
            return endpoints[self._rng.randrange(n)]
        r = self._rng.random() * total
        for ep in endpoints:
            r -= _effective(ep)
            if r < 0.0:
                return ep
        return endpoints[-1]  # r landed on total exactly, through float rounding


def record_latency(
    endpoint: Candidate, latency: float, now: float, decay: float = LATENCY_DECAY
) -> None:
    """Fold one observed response latency (seconds) into the endpoint's peak EWMA.

    Peak: a sample above the average replaces it at once, so a backend that turns slow is
    avoided on its first slow answer; samples below it pull it down with weight
    ``1 - exp(-elapsed / decay)``, so recovery is believed only gradually.
    """
    prev_at = endpoint.latency_at
    if prev_at is None or latency >= endpoint.ewma_latency:
        endpoint.ewma_latency = latency
    else:
        w = math.exp(-max(now - prev_at, 0.0) / decay)
        endpoint.ewma_latency = endpoint.ewma_latency * w + latency * (1.0 - w)
    endpoint.latency_at = now


def latency_cost(endpoint: Candidate, ref: float, decay: float = LATENCY_DECAY) -> float:
    """Expected wait on this endpoint: decayed peak EWMA times (in_flight + 1), per weight.

    ``ref`` stands in for the clock: the EWMA decays toward 0 for the time between the
    endpoint's last sample and ``ref``, so an endpoint avoided after one slow answer is tried
    again once its bad sample has aged, instead of being starved forever.
    """
    at = endpoint.latency_at
    if at is None:
        if endpoint.in_flight == 0:
            return 0.0  # never measured and idle: try it, that is how it gets measured
        return _UNMEASURED_PENALTY + endpoint.in_flight
    ewma = endpoint.ewma_latency
    if ref > at:
        ewma *= math.exp(-(ref - at) / decay)
    return ewma * (endpoint.in_flight + 1) / (endpoint.weight * endpoint.ramp)


class LeastLatency:
    """Lowest peak-EWMA latency times in-flight requests (Finagle's and Envoy's "peak EWMA").

    Best for backends of uneven speed (mixed hardware, a noisy neighbour, a GC pause): it
    routes around the slow one within one request and brings it back as its sample decays.
    The data plane must call ``record_latency`` (or ``record``) when each response head
    arrives. ``pick`` has no clock, so decay is measured up to the newest sample among the
    candidates: time advances with the traffic itself.
    """

    __slots__ = ("_next", "decay")

    def __init__(self, decay: float = LATENCY_DECAY) -> None:
        self.decay = decay
        self._next = 0

    def record(self, endpoint: Candidate, latency: float, now: float) -> None:
        record_latency(endpoint, latency, now, self.decay)

    def pick(self, endpoints: Sequence[C], key: str | None = None) -> C | None:
        n = len(endpoints)
        if n == 0:
            return None
        ref = max((ep.latency_at for ep in endpoints if ep.latency_at is not None), default=0.0)
        start = self._next % n
        self._next = start + 1
        best: C | None = None
        best_cost = 0.0
        for j in range(n):  # rotating start: ties (all unmeasured at boot) spread evenly
            ep = endpoints[(start + j) % n]
            cost = latency_cost(ep, ref, self.decay)
            if best is None or cost < best_cost:
                best, best_cost = ep, cost
        return best


BALANCERS: dict[str, Callable[[], Balancer]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "least_connections": LeastConnections,
    "power_of_two": PowerOfTwo,
    "least_latency": LeastLatency,
    "random": RandomChoice,
    "ip_hash": IpHash,
    "consistent_hash": ConsistentHash,
}
