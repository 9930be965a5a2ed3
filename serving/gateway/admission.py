"""Admission control by cost: what runs at once is bounded in UNet evaluations x samples, not in requests.

Cost unit: one model evaluation of one sample. A request's cost (docs/api.md, "Admission"):

    Generate, GAN model (dcgan-*, mlp)   num_samples x 1        (one generator pass per sample)
    Generate, ddpm                       num_samples x steps    (one UNet evaluation per step and sample)
    Denoise                              images x min(steps, t* + 1)   (the UNet evaluations mnistgen.diffusion
                                         runs: t* is sigma's timestep on the default training noise schedule)
    ListModels                           0                      (counts toward max_concurrency only)

The Limiter admits a request when fewer than `concurrency` requests run and the cost running plus its own stays
within `max_cost`; otherwise it waits in a FIFO queue of at most `queue` requests (strict order: a large request
at the head is not overtaken by small ones behind it, so it cannot starve). Refused at once, RESOURCE_EXHAUSTED /
HTTP 429, with the budget and the request's cost in the message: a request whose cost alone exceeds `max_cost`
(it could never run), and one that would have to wait while the queue is full.
"""
from __future__ import annotations

import asyncio
import math
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


class _Slot:
    """`async with limiter.slot(cost):` (a class, not an async generator: this runs on every request)."""

    __slots__ = ("limiter", "cost")

    def __init__(self, limiter: "Limiter", cost: Cost):
        self.limiter, self.cost = limiter, cost

    async def __aenter__(self) -> None:
        await self.limiter.acquire(self.cost)

    async def __aexit__(self, *exc) -> None:
        self.limiter.release(self.cost.units)


class Limiter:
    """At most `concurrency` requests and `max_cost` cost units running at once, at most `queue` requests waiting
    (FIFO); beyond that, or for a request costing more than `max_cost` on its own, RESOURCE_EXHAUSTED at once.

    `max_cost` None: no cost budget (only the request count bounds). Single event loop, no locks."""

    def __init__(self, concurrency: int, queue: int, max_cost: int | None = None):
        self.concurrency, self.queue = concurrency, queue
        self.max_cost = math.inf if max_cost is None else max_cost
        self.running = 0  # requests admitted and not yet released
        self.cost_in_flight = 0  # their cost units
        self.cost_queued = 0  # cost units of the waiting requests
        self._waiters: deque[list] = deque()  # [units, future], FIFO

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def slot(self, cost: Cost = FREE) -> _Slot:
        return _Slot(self, cost)

    def _fits(self, units: int) -> bool:
        return self.running < self.concurrency and self.cost_in_flight + units <= self.max_cost

    def _take(self, units: int) -> None:
        self.running += 1
        self.cost_in_flight += units

    def _budget(self) -> str:
        return (f"max_cost_in_flight {self.max_cost}" if self.max_cost != math.inf else "no cost budget")

    async def acquire(self, cost: Cost) -> None:
        units = cost.units
        if units > self.max_cost:
            raise ApiError(f"{cost} exceeds max_cost_in_flight {self.max_cost}: it can never be admitted; ask for "
                           "fewer samples or images, or fewer steps (cost = samples x model evaluations, "
                           "docs/api.md#admission)", code="RESOURCE_EXHAUSTED")
        if not self._waiters and self._fits(units):
            self._take(units)
            return
        if len(self._waiters) >= self.queue:
            raise ApiError(f"server busy: {self.running} requests running (max_concurrency {self.concurrency}) at "
                           f"cost {self.cost_in_flight} of {self._budget()}, {len(self._waiters)} queued "
                           f"(max_queue {self.queue}); this request's {cost}; retry with backoff",
                           code="RESOURCE_EXHAUSTED")
        waiter = [units, asyncio.get_running_loop().create_future()]
        self._waiters.append(waiter)
        self.cost_queued += units
        try:
            await waiter[1]
        except BaseException:  # cancelled (deadline, client gone) while queued
            if waiter[1].done() and not waiter[1].cancelled():
                self.release(units)  # granted just before the cancellation reached us: give it back
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
                self.cost_queued -= units
                self._wake()  # it may have been the head that blocked the others
            raise

    def release(self, units: int) -> None:
        self.running -= 1
        self.cost_in_flight -= units
        self._wake()

    def _wake(self) -> None:
        """Admit waiters from the head of the queue while they fit (strict FIFO)."""
        while self._waiters:
            units, fut = self._waiters[0]
            if fut.done():  # cancelled, its owner not yet resumed: drop it here
                self._waiters.popleft()
                self.cost_queued -= units
                continue
            if not self._fits(units):
                return
            self._waiters.popleft()
            self.cost_queued -= units
            self._take(units)
            fut.set_result(None)
