"""Fair admission control by cost: what runs at once is bounded in model evaluations x samples, per model.

Cost unit: one model evaluation of one sample. A request's cost (docs/api.md, "Admission"):

    Generate, GAN model (dcgan-*, mlp)   num_samples x 1        (one generator pass per sample)
    Generate, ddpm                       num_samples x steps    (one UNet evaluation per step and sample)
    Denoise                              images x min(steps, t* + 1)   (the UNet evaluations mnistgen.diffusion
                                         runs: t* is sigma's timestep on the default training noise schedule)
    ListModels                           0                      (counts toward max_concurrency only)

Admission keeps one Limiter (pool) per Triton model: its own `concurrency` and `max_cost` budget, so a GAN request
never waits behind diffusion work. Inside a pool, each class (a tenant: the caller's token id when auth is on, one
class otherwise) has its own FIFO queue of at most `queue` requests; when the budget frees, deficit round robin by
cost picks the class whose head goes next (each class's turn grants `max_cost` units), strictly FIFO inside a
class, and the chosen head is not overtaken (it cannot starve). Refused at once, RESOURCE_EXHAUSTED / HTTP 429:
a request whose cost alone exceeds `max_cost` (it could never run), one whose class queue is full, and one that
would have to wait while the pool's measured throughput says it cannot finish within its deadline (Retry-After:
when it could); a queued request is re-checked so whenever a completion updates the measurement.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from mnistgen import catalog
from mnistgen.schedule import default_alphas_cumprod, sigma_to_timestep

from ..validation import ApiError, DenoiseParams, GenerateParams

# the default training schedule's abar_t (mnistgen.schedule is numpy-only: no torch/diffusers in the gateway)
_ABAR = default_alphas_cumprod()


def _free() -> str:
    return "no model evaluation"


@dataclass(frozen=True)
class Cost:
    """A request's cost in model evaluations x samples; `describe()` says how it was counted (error messages only,
    so the text is built only when a request is refused)."""

    units: int
    describe: Callable[[], str] = _free

    @property
    def detail(self) -> str:
        return self.describe()

    def __str__(self) -> str:
        return f"cost {self.units} ({self.detail})"


FREE = Cost(0)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def sigma_timestep(sigma: float) -> int:
    """t* for a denoise noise level (the default training schedule; mnistgen.diffusion.sigma_to_timestep)."""
    return sigma_to_timestep(sigma, _ABAR)


def denoise_evaluations(sigma: float, steps: int) -> int:
    """UNet evaluations of one denoise: min(steps, t* + 1) (mnistgen.diffusion.inference_timesteps)."""
    return min(int(steps), sigma_timestep(sigma) + 1)


def generate_cost(p: GenerateParams) -> Cost:
    n, units = p.num_samples, p.model.cost(p.num_samples, p.steps, p.guided)  # mnistgen.catalog.Model.cost
    if p.model.kind == catalog.GAN:
        return Cost(units, lambda: f"{_plural(n, 'sample')} x 1 generator pass")
    if p.guided:  # classifier-free guidance: the digit's and the null pass, batched together, every step
        return Cost(units, lambda: f"{_plural(n, 'sample')} x {_plural(p.steps, 'step')} x 2 UNet passes "
                                   f"(guidance {p.guidance:g})")
    return Cost(units, lambda: f"{_plural(n, 'sample')} x {_plural(p.steps, 'step')}")


def denoise_cost(p: DenoiseParams) -> Cost:
    k, evals = len(p.images), denoise_evaluations(p.sigma, p.steps)

    def describe() -> str:
        how = f"steps {p.steps}" if evals == p.steps else f"steps {p.steps} capped at t*+1 = {evals} for sigma {p.sigma:g}"
        return f"{_plural(k, 'image')} x {_plural(evals, 'UNet evaluation')}, {how}"

    return Cost(catalog.DENOISER.cost(k, evals), describe)


RATE_HALF_LIFE_S = 5.0  # the measured throughput weighs the last this-many busy seconds half (EWMA by busy time)
LIST_POOL = "ListModels"  # ListModels' own pool: no model evaluation, counts toward its max_concurrency only


def _nothing(*_) -> None:
    pass


class _Slot:
    """`async with limiter.slot(cost):` (a class, not an async generator: this runs on every request)."""

    __slots__ = ("limiter", "cost", "tenant", "deadline")

    def __init__(self, limiter: "Limiter", cost: Cost, tenant: str = "", deadline: float | None = None):
        self.limiter, self.cost, self.tenant, self.deadline = limiter, cost, tenant, deadline

    async def __aenter__(self) -> None:
        await self.limiter.acquire(self.cost, self.tenant, self.deadline)

    async def __aexit__(self, exc_type, *exc) -> None:
        self.limiter.release(self.cost.units, ok=exc_type is None)


class _Waiter:
    __slots__ = ("cost", "units", "deadline", "fut", "since", "queued")

    def __init__(self, cost: Cost, deadline: float | None, fut: asyncio.Future, since: float):
        self.cost, self.units, self.deadline, self.fut, self.since = cost, cost.units, deadline, fut, since
        self.queued = True


class _Class:
    """One class (tenant) of a pool: its FIFO queue, the cost in it and its deficit (deficit round robin)."""

    __slots__ = ("label", "waiters", "cost_queued", "deficit")

    def __init__(self, label: str):
        self.label, self.waiters, self.cost_queued, self.deficit = label, deque(), 0, 0


class Limiter:
    """One pool: at most `concurrency` requests and `max_cost` cost units running at once; waiting requests queue
    per class (tenant), at most `queue` each, served by deficit round robin by cost across classes and FIFO inside
    one. RESOURCE_EXHAUSTED at once for a request costing more than `max_cost` on its own, a full class queue, or
    (with a deadline, once a throughput is measured) an estimated finish past the deadline.

    `max_cost` None: no cost budget (only the request count bounds). `on_wait(label, seconds)` and
    `on_refuse(label, reason)` report to metrics. Single event loop, no locks."""

    def __init__(self, concurrency: int, queue: int, max_cost: int | None = None, name: str = "",
                 on_wait: Callable[[str, float], None] = _nothing, on_refuse: Callable[[str, str], None] = _nothing,
                 clock: Callable[[], float] = time.monotonic):
        self.base = (concurrency, math.inf if max_cost is None else max_cost)  # per backend (set_backends)
        self.concurrency, self.max_cost = self.base
        self.queue, self.name, self.on_wait, self.on_refuse, self.clock = queue, name, on_wait, on_refuse, clock
        # a turn of deficit round robin grants max_cost units (every admissible request fits in one); without a
        # budget each request counts 1
        self.quantum = self.max_cost if self.max_cost != math.inf else 1
        self.running = 0  # requests admitted and not yet released
        self.cost_in_flight = 0  # their cost units
        self.cost_queued = 0  # cost units of the waiting requests
        self.classes: dict[str, _Class] = {}
        self._turns: deque[_Class] = deque()  # classes with waiters; [0] is the one whose turn it is
        self._units = self._busy = 0.0  # completed cost units and busy seconds, exponentially weighted
        self._mark = 0.0  # last release (or start of the busy period)

    @property
    def waiting(self) -> int:
        return sum(len(c.waiters) for c in self._turns)

    @property
    def rate(self) -> float | None:
        """Measured throughput in cost units per busy second (None before a request with a cost completed)."""
        return self._units / self._busy if self._units > 0 and self._busy > 0 else None

    def slot(self, cost: Cost = FREE, tenant: str = "", deadline: float | None = None) -> _Slot:
        return _Slot(self, cost, tenant, deadline)

    def scale(self, n: int) -> None:
        """n backends: n times the concurrency and budget (a single request is still bounded by one's budget)."""
        self.concurrency, self.max_cost = self.base[0] * n, self.base[1] * n
        self._wake()

    def label(self, tenant: str) -> str:
        return f"{self.name}/{tenant}" if tenant else self.name

    def _fits(self, units: int) -> bool:
        return self.running < self.concurrency and self.cost_in_flight + units <= self.max_cost

    def _charge(self, units: int) -> int:
        """What a request takes from its class's deficit: its cost (at least 1), 1 without a budget."""
        return 1 if self.base[1] == math.inf else max(units, 1)

    def _take(self, units: int) -> None:
        if self.running == 0:
            self._mark = self.clock()  # a busy period starts
        self.running += 1
        self.cost_in_flight += units

    def _budget(self) -> str:
        return (f"max_cost_in_flight {self.max_cost}" if self.max_cost != math.inf else "no cost budget")

    def _refuse(self, label: str, reason: str, message: str, retry_after: float | None = None) -> ApiError:
        self.on_refuse(label, reason)
        return ApiError(message, code="RESOURCE_EXHAUSTED", retry_after=retry_after)

    def estimate(self, c: _Class, mine: int) -> float | None:
        """Seconds until a request of class c finishes, `mine` being its own cost plus its class's queued ahead of
        it: the cost running, as much of each other class's queue as round robin serves first, and `mine`, at the
        measured throughput; None before any measurement."""
        rate = self.rate
        if rate is None:
            return None
        ahead = sum(min(o.cost_queued, mine) for o in self._turns if o is not c)
        return (self.cost_in_flight + ahead + mine) / rate

    def _late(self, label: str, cost: Cost, finish: float, left: float) -> ApiError:
        return self._refuse(label, "deadline", f"server busy: class {label} would finish this request in about "
                            f"{finish:.3g} s at the measured {self.rate:.4g} cost units/s ({self.running} running at "
                            f"cost {self.cost_in_flight}, {self.cost_queued} queued), past its deadline in "
                            f"{max(left, 0):.3g} s; this request's {cost}; retry later, or with a longer deadline",
                            retry_after=max(1, math.ceil(finish - left)))

    def _expire_hopeless(self) -> bool:
        """After a new measurement: refuse the queued requests whose estimated finish is past their deadline now
        (a 429 with Retry-After instead of a 504 later). True when any was."""
        now, expired = self.clock(), False
        for c in list(self._turns):
            mine = 0
            for w in list(c.waiters):
                mine += w.units
                finish = self.estimate(c, mine) if w.deadline is not None and not w.fut.done() else None
                if finish is not None and finish > w.deadline - now:
                    c.waiters.remove(w)
                    self._dequeued(c, w)
                    mine -= w.units
                    w.fut.set_exception(self._late(c.label, w.cost, finish, w.deadline - now))
                    expired = True
        return expired

    async def acquire(self, cost: Cost, tenant: str = "", deadline: float | None = None) -> None:
        units = cost.units
        c = self.classes.get(tenant) or self.classes.setdefault(tenant, _Class(self.label(tenant)))
        if units > self.base[1]:
            raise self._refuse(c.label, "over_budget", f"{cost} exceeds max_cost_in_flight {self.base[1]}: it can "
                               "never be admitted; ask for fewer samples or images, or fewer steps (cost = samples x "
                               "model evaluations, docs/api.md#admission)")
        if not self._turns and self._fits(units):
            self._take(units)
            self.on_wait(c.label, 0.0)
            return
        if len(c.waiters) >= self.queue:
            raise self._refuse(c.label, "queue_full", f"server busy: {self.running} requests running (max_concurrency "
                               f"{self.concurrency}) at cost {self.cost_in_flight} of {self._budget()}, "
                               f"{len(c.waiters)} queued (max_queue {self.queue}) in class {c.label}; this "
                               f"request's {cost}; retry with backoff")
        now = self.clock()
        finish = self.estimate(c, c.cost_queued + units) if deadline is not None else None
        if finish is not None and finish > deadline - now:
            raise self._late(c.label, cost, finish, deadline - now)
        w = _Waiter(cost, deadline, asyncio.get_running_loop().create_future(), now)
        c.waiters.append(w)
        c.cost_queued += units
        self.cost_queued += units
        if len(c.waiters) == 1:  # the class joins the round
            self._turns.append(c)
            if len(self._turns) == 1:
                c.deficit += self.quantum
        try:
            await w.fut
        except BaseException:  # cancelled (deadline, client gone) or refused (_expire_hopeless) while queued
            if w.fut.done() and not w.fut.cancelled() and w.fut.exception() is None:
                self.release(units, ok=False)  # granted just before the cancellation reached us: give it back
            elif w.queued:
                c.waiters.remove(w)
                self._dequeued(c, w)
                self._wake()  # it may have been the head that blocked the others
            raise

    def release(self, units: int, ok: bool = True) -> None:
        now = self.clock()
        if ok and units:  # the throughput: completed cost per busy second, weighted by busy time
            dt = now - self._mark
            decay = 0.5 ** (dt / RATE_HALF_LIFE_S)
            self._units, self._busy = self._units * decay + units, self._busy * decay + dt
        self._mark = now
        self.running -= 1
        self.cost_in_flight -= units
        self._wake()
        if ok and units and self._turns and self._expire_hopeless():
            self._wake()  # an expired head may have blocked the others

    def _dequeued(self, c: _Class, w: _Waiter) -> None:
        w.queued = False
        c.cost_queued -= w.units
        self.cost_queued -= w.units
        if not c.waiters:  # the class leaves the round: its turn (if it was its) passes on, its deficit is reset
            c.deficit = 0
            if self._turns[0] is c:
                self._turns.popleft()
                self._next_turn(rotate=False)
            else:
                self._turns.remove(c)

    def _next_turn(self, rotate: bool = True) -> None:
        if rotate:
            self._turns.rotate(-1)
        if self._turns:
            self._turns[0].deficit += self.quantum

    def _wake(self) -> None:
        """Admit waiters while they fit: the class whose turn it is serves its head while its deficit covers the
        head's cost, then the turn passes on; a head that does not fit the budget yet waits (is not overtaken)."""
        while self._turns:
            c = self._turns[0]
            w = c.waiters[0]
            if w.fut.done():  # cancelled, its owner not yet resumed: drop it here
                c.waiters.popleft()
                self._dequeued(c, w)
                continue
            if self._charge(w.units) > c.deficit:
                self._next_turn()
                continue
            if not self._fits(w.units):
                return
            c.waiters.popleft()
            c.deficit -= self._charge(w.units)
            self._dequeued(c, w)
            self._take(w.units)
            self.on_wait(c.label, self.clock() - w.since)
            w.fut.set_result(None)


class Admission:
    """One Limiter per pool (a Triton model, and LIST_POOL), made on first use with the same limits; the gauges'
    totals; set_backends() scales every pool to the number of healthy Triton backends."""

    def __init__(self, concurrency: int, queue: int, max_cost: int | None = None):
        self.limits = (concurrency, queue, max_cost)
        self.backends = 1
        self.pools: dict[str, Limiter] = {}
        self.on_wait: Callable[[str, float], None] = _nothing  # metrics hooks (GatewayMetrics.watch_admission)
        self.on_refuse: Callable[[str, str], None] = _nothing

    @property
    def max_cost(self) -> float:
        """One pool's budget (each pool has its own), times the backends."""
        return math.inf if self.limits[2] is None else self.limits[2] * self.backends

    cost_in_flight = property(lambda self: sum(p.cost_in_flight for p in self.pools.values()))
    cost_queued = property(lambda self: sum(p.cost_queued for p in self.pools.values()))

    def pool(self, name: str) -> Limiter:
        p = self.pools.get(name)
        if p is None:
            p = self.pools[name] = Limiter(*self.limits, name=name, on_wait=lambda *a: self.on_wait(*a),
                                           on_refuse=lambda *a: self.on_refuse(*a))
            p.scale(self.backends)
        return p

    def slot(self, pool: str, cost: Cost = FREE, tenant: str = "", deadline: float | None = None) -> _Slot:
        return self.pool(pool).slot(cost, tenant, deadline)

    def set_backends(self, n: int) -> None:
        """n >= 1 healthy Triton backends: every pool's concurrency and cost budget times n."""
        if n < 1:
            raise ValueError(f"set_backends needs n >= 1, got {n}")
        self.backends = n
        for p in self.pools.values():
            p.scale(n)

    def depths(self):
        """(class label, requests queued) of every class seen (the queue-depth gauge)."""
        for p in self.pools.values():
            for c in p.classes.values():
                yield c.label, len(c.waiters)
