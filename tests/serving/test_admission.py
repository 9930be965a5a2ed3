"""Admission by cost (serving/gateway/admission.py): cost per request, the Limiter's budget, its per-class queues
served fairly by cost (deficit round robin), deadline-aware refusal, a pool per model, the --max-cost-in-flight
option, and a real gateway refusing / queueing by cost with the cost gauges and per-class metrics on /metrics."""
from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import threading

import grpc
import numpy as np
import pytest

from serving import gateway
from serving.gateway.admission import (
    FREE, Admission, Cost, Limiter, denoise_cost, denoise_evaluations, generate_cost, sigma_timestep,
)
from serving.generated.mnistgen.v1 import generation_pb2 as pb
from serving.process import wait_until
from serving.validation import ApiError, validate_denoise, validate_generate

RAW_IMAGE = np.zeros(784, "<f4").tobytes()


# -- cost of a request -----------------------------------------------------------------------------------------


def test_generate_cost_is_samples_times_evaluations():
    gan = generate_cost(validate_generate("dcgan-baseline", 64, 0, 0, "", 0))
    assert gan.units == 64 and gan.detail == "64 samples x 1 generator pass"
    ddpm = generate_cost(validate_generate("ddpm", 64, 0, 1000, "ddpm", 0))
    assert ddpm.units == 64_000 and str(ddpm) == "cost 64000 (64 samples x 1000 steps)"
    default = generate_cost(validate_generate("ddpm", 1, 0, 0, "", 0))  # steps 0 -> the sampler's default (20)
    assert default.units == 20 and default.detail == "1 sample x 20 steps"
    assert FREE.units == 0 and "no model evaluation" in str(FREE)


def test_denoise_cost_counts_the_unet_evaluations_actually_run():
    p = validate_denoise([], RAW_IMAGE * 4, 0.5, 20, "dpm-solver++", 0, 0)
    assert denoise_cost(p).units == 4 * 20
    p = validate_denoise([], RAW_IMAGE * 4, 0.5, 1000, "ddpm", 0, 0)  # t* ~ 144: only t* + 1 evaluations exist
    c = denoise_cost(p)
    assert c.units == 4 * (sigma_timestep(0.5) + 1) < 4 * 1000
    assert f"capped at t*+1 = {sigma_timestep(0.5) + 1} for sigma 0.5" in c.detail


def test_sigma_timestep_matches_the_diffusion_library():
    diffusion = pytest.importorskip("mnistgen.diffusion")  # torch + diffusers (the gateway itself loads neither)
    abar = diffusion.make_scheduler("ddpm").alphas_cumprod
    for sigma in np.linspace(0.005, 1.0, 200):
        t = diffusion.sigma_to_timestep(float(sigma), abar)
        assert sigma_timestep(float(sigma)) == t, sigma
        for steps in (1, 20, 100, 1000):
            assert denoise_evaluations(float(sigma), steps) == len(diffusion.inference_timesteps(t, steps))


# -- the Limiter (no server) ------------------------------------------------------------------------------------


def held(lim: Limiter, cost: Cost, release: asyncio.Event, order: list | None = None, name: str = "",
         tenant: str = ""):
    async def hold():
        async with lim.slot(cost, tenant):
            if order is not None:
                order.append(name)
            await release.wait()
    return asyncio.create_task(hold())


def test_budget_bounds_cost_not_requests():
    async def scenario():
        lim = Limiter(concurrency=16, queue=4, max_cost=100)
        release = asyncio.Event()
        a = held(lim, Cost(60), release)
        b = held(lim, Cost(40), release)
        await asyncio.sleep(0)
        assert (lim.running, lim.cost_in_flight, lim.waiting) == (2, 100, 0)
        c = held(lim, Cost(1), release)  # 101 > 100: waits although 14 request slots are free
        await asyncio.sleep(0)
        assert (lim.running, lim.waiting, lim.cost_queued) == (2, 1, 1)
        release.set()
        await asyncio.gather(a, b, c)
        assert (lim.running, lim.cost_in_flight, lim.cost_queued, lim.waiting) == (0, 0, 0, 0)

    asyncio.run(scenario())


def test_a_request_over_the_budget_is_refused_at_once_with_its_cost():
    async def scenario():
        lim = Limiter(concurrency=16, queue=64, max_cost=6400)
        c = generate_cost(validate_generate("ddpm", 64, 0, 1000, "ddpm", 0))
        with pytest.raises(ApiError) as e:
            async with lim.slot(c):
                pass
        assert e.value.code == "RESOURCE_EXHAUSTED"
        assert "cost 64000 (64 samples x 1000 steps) exceeds max_cost_in_flight 6400" in e.value.message
        assert (lim.running, lim.waiting) == (0, 0)
        async with lim.slot(Cost(6400)):  # exactly the budget fits
            assert lim.cost_in_flight == 6400

    asyncio.run(scenario())


def test_full_queue_is_refused_naming_budget_and_cost():
    async def scenario():
        lim = Limiter(concurrency=16, queue=1, max_cost=100)
        release = asyncio.Event()
        tasks = [held(lim, Cost(100), release), held(lim, Cost(50), release)]  # running, queued
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as e:
            async with lim.slot(Cost(7, lambda: "7 samples x 1 generator pass")):
                pass
        m = e.value.message
        assert e.value.code == "RESOURCE_EXHAUSTED" and m.startswith("server busy")
        assert "cost 100 of max_cost_in_flight 100" in m and "1 queued (max_queue 1)" in m
        assert "this request's cost 7 (7 samples x 1 generator pass)" in m
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_queue_is_fifo_a_large_head_is_not_overtaken():
    async def scenario():
        lim = Limiter(concurrency=16, queue=8, max_cost=100)
        first, order = asyncio.Event(), []
        a = held(lim, Cost(90), first, order, "a")
        await asyncio.sleep(0)
        rest = asyncio.Event()
        big = held(lim, Cost(80), rest, order, "big")  # waits for a
        await asyncio.sleep(0)
        small = held(lim, Cost(5), rest, order, "small")  # would fit now (95), but queues behind big
        await asyncio.sleep(0.01)
        assert order == ["a"] and lim.waiting == 2
        first.set()
        await asyncio.sleep(0.01)
        assert order == ["a", "big", "small"]  # 80 + 5 <= 100: both admitted once a left, in order
        rest.set()
        await asyncio.gather(a, big, small)

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_queue_and_unblocks_the_next():
    async def scenario():
        lim = Limiter(concurrency=16, queue=8, max_cost=100)
        release, order = asyncio.Event(), []
        a = held(lim, Cost(50), release, order, "a")
        await asyncio.sleep(0)
        big = held(lim, Cost(100), release, order, "big")  # head of the queue
        await asyncio.sleep(0)
        small = held(lim, Cost(10), release, order, "small")  # behind it
        await asyncio.sleep(0)
        assert lim.waiting == 2 and lim.cost_queued == 110
        big.cancel()  # its deadline passed while queued
        await asyncio.sleep(0.01)
        assert order == ["a", "small"] and lim.waiting == 0 and lim.cost_queued == 0
        assert lim.cost_in_flight == 60
        release.set()
        await asyncio.gather(a, small)
        with pytest.raises(asyncio.CancelledError):
            await big
        assert (lim.running, lim.cost_in_flight) == (0, 0)

    asyncio.run(scenario())


def test_timeout_while_queued_gives_nothing_back_twice():
    async def scenario():
        lim = Limiter(concurrency=1, queue=4, max_cost=100)
        release = asyncio.Event()
        a = held(lim, Cost(10), release)
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                async with lim.slot(Cost(10)):
                    pass
        assert (lim.running, lim.cost_in_flight, lim.waiting, lim.cost_queued) == (1, 10, 0, 0)
        release.set()
        await a
        assert (lim.running, lim.cost_in_flight) == (0, 0)

    asyncio.run(scenario())


def test_concurrency_limit_still_applies_to_free_requests():
    async def scenario():
        lim = Limiter(concurrency=1, queue=0, max_cost=100)
        release = asyncio.Event()
        a = held(lim, FREE, release)
        await asyncio.sleep(0)
        with pytest.raises(ApiError, match="server busy: 1 requests running \\(max_concurrency 1\\)"):
            async with lim.slot(FREE):
                pass
        release.set()
        await a

    asyncio.run(scenario())


# -- fairness across classes (tenants) and pools (models) --------------------------------------------------------


def passing(lim: Limiter, tenant: str, cost: int, order: list, name: str):
    """A request that records its admission and leaves at once (release -> the next admission, synchronously)."""
    async def run():
        async with lim.slot(Cost(cost), tenant):
            order.append(name)
    return asyncio.create_task(run())


async def one_running(queue: int):
    """A pool of one request at a time (budget 100) with a cost-1 request running until `release` is set."""
    lim, release = Limiter(concurrency=1, queue=queue, max_cost=100), asyncio.Event()
    holder = held(lim, Cost(1), release)
    await asyncio.sleep(0)
    return lim, release, [], holder


def test_classes_share_the_pool_by_cost_round_robin_fifo_inside_each():
    """One request at a time, budget (= a turn's quantum) 100: tenant a's 50-unit requests and tenant b's 25-unit
    ones alternate by cost (100 units per turn), each class in its own arrival order."""
    async def scenario():
        lim, release, order, holder = await one_running(queue=16)
        tasks = [passing(lim, "a", 50, order, f"a{i}") for i in range(1, 5)]
        tasks += [passing(lim, "b", 25, order, f"b{i}") for i in range(1, 9)]
        await asyncio.sleep(0)
        assert lim.waiting == 12 and lim.cost_queued == 4 * 50 + 8 * 25
        release.set()
        await asyncio.gather(holder, *tasks)
        assert order == ["a1", "a2", "b1", "b2", "b3", "b4", "a3", "a4", "b5", "b6", "b7", "b8"]
        assert (lim.running, lim.cost_in_flight, lim.cost_queued, lim.waiting) == (0, 0, 0, 0)
        assert all(c.deficit == 0 and not c.waiters for c in lim.classes.values())

    asyncio.run(scenario())


def test_a_flooding_class_does_not_delay_another_class_beyond_one_turn():
    """Tenant a queues 20 requests first; tenant b's single request is admitted after at most one turn of a's."""
    async def scenario():
        lim, release, order, holder = await one_running(queue=32)
        tasks = [passing(lim, "a", 50, order, f"a{i}") for i in range(20)]
        await asyncio.sleep(0)
        tasks.append(passing(lim, "b", 50, order, "b"))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(holder, *tasks)
        assert order.index("b") == 2  # a0, a1 (a's turn of 100 units), then b: not after a's 20
        assert [n for n in order if n != "b"] == [f"a{i}" for i in range(20)]

    asyncio.run(scenario())


def test_the_head_whose_turn_it_is_is_not_overtaken_so_it_cannot_starve():
    """Budget 100 with 60 running: a's 100-unit head waits for the budget; b's small requests, which would fit,
    wait behind it instead of overtaking it forever."""
    async def scenario():
        lim = Limiter(concurrency=16, queue=16, max_cost=100)
        first, rest, order = asyncio.Event(), asyncio.Event(), []
        x = held(lim, Cost(60), first, order, "x")
        await asyncio.sleep(0)
        big = held(lim, Cost(100), rest, order, "big", tenant="a")
        await asyncio.sleep(0)
        smalls = [held(lim, Cost(10), rest, order, f"s{i}", tenant="b") for i in range(3)]
        await asyncio.sleep(0.01)
        assert order == ["x"] and lim.waiting == 4
        first.set()
        await asyncio.sleep(0.01)
        assert order == ["x", "big"]  # the head first; the small ones wait for the budget it takes
        rest.set()
        await asyncio.gather(x, big, *smalls)
        assert order == ["x", "big", "s0", "s1", "s2"]

    asyncio.run(scenario())


def test_each_class_has_its_own_bounded_queue():
    async def scenario():
        lim, release, order, holder = await one_running(queue=2)
        a = [passing(lim, "a", 1, order, f"a{i}") for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ApiError, match=r"2 queued \(max_queue 2\) in class /a") as e:
            async with lim.slot(Cost(1), "a"):
                pass
        assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.retry_after is None
        b = [passing(lim, "b", 1, order, f"b{i}") for i in range(2)]  # b's queue is its own
        await asyncio.sleep(0)
        assert lim.waiting == 4
        release.set()
        await asyncio.gather(holder, *a, *b)
        assert sorted(order) == ["a0", "a1", "b0", "b1"]

    asyncio.run(scenario())


def test_cancelling_the_only_waiter_of_the_class_whose_turn_it_is_passes_the_turn_on():
    async def scenario():
        lim = Limiter(concurrency=16, queue=8, max_cost=100)
        release, order = asyncio.Event(), []
        x = held(lim, Cost(50), release, order, "x")
        await asyncio.sleep(0)

        async def wait_in(tenant: str, cost: int, name: str):
            async with lim.slot(Cost(cost), tenant):
                order.append(name)
                await release.wait()
        big = asyncio.create_task(wait_in("a", 100, "big"))  # a's turn: blocks the budget
        await asyncio.sleep(0)
        small = asyncio.create_task(wait_in("b", 10, "small"))  # would fit, waits behind a's head
        await asyncio.sleep(0)
        assert lim.waiting == 2 and lim.cost_queued == 110 and order == ["x"]
        big.cancel()
        await asyncio.sleep(0.01)
        assert order == ["x", "small"] and (lim.waiting, lim.cost_queued, lim.cost_in_flight) == (0, 0, 60)
        assert lim.classes["a"].deficit == 0 and not lim.classes["a"].waiters
        release.set()
        await asyncio.gather(x, small)
        with pytest.raises(asyncio.CancelledError):
            await big
        assert (lim.running, lim.cost_in_flight, lim.cost_queued) == (0, 0, 0)

    asyncio.run(scenario())


def test_pools_are_separate_a_gan_request_never_waits_for_diffusion():
    async def scenario():
        adm = Admission(concurrency=1, queue=4, max_cost=6400)
        release = asyncio.Event()
        ddpm = adm.pool("ddpm_generate")
        heavy = held(ddpm, Cost(6400), release)
        await asyncio.sleep(0)
        queued = held(ddpm, Cost(6400), release)
        await asyncio.sleep(0)
        assert (ddpm.running, ddpm.waiting) == (1, 1)
        async with adm.slot("dcgan_generator", Cost(1)):  # admitted at once, in its own pool
            assert adm.cost_in_flight == 6401 and adm.cost_queued == 6400
        release.set()
        await asyncio.gather(heavy, queued)
        assert sorted(adm.pools) == ["dcgan_generator", "ddpm_generate"]

    asyncio.run(scenario())


def test_set_backends_scales_every_pool_but_not_one_requests_limit():
    async def scenario():
        adm = Admission(concurrency=1, queue=0, max_cost=100)
        pool = adm.pool("p")
        adm.set_backends(2)
        assert (pool.concurrency, pool.max_cost, adm.max_cost) == (2, 200, 200)
        release = asyncio.Event()
        two = [held(pool, Cost(100), release) for _ in range(2)]  # both run: two backends' budgets
        await asyncio.sleep(0)
        assert (pool.running, pool.cost_in_flight) == (2, 200)
        with pytest.raises(ApiError, match="cost 150 .* exceeds max_cost_in_flight 100"):
            async with adm.slot("p", Cost(150)):  # one request runs on one backend
                pass
        release.set()
        await asyncio.gather(*two)
        assert adm.pool("q").concurrency == 2  # a pool made later is scaled too
        adm.set_backends(1)
        assert (pool.concurrency, pool.max_cost) == (1, 100)
        with pytest.raises(ValueError, match="n >= 1"):
            adm.set_backends(0)

    asyncio.run(scenario())


def test_random_arrivals_cancellations_and_releases_keep_the_books():
    """Seeded random traffic over three classes, with deadlines and cancellations: the budget and concurrency are
    never exceeded, each class is admitted in its arrival order, and everything is given back at the end."""
    async def scenario(seed: int):
        rng, ticks = np.random.default_rng(seed), itertools.count()
        lim = Limiter(concurrency=3, queue=6, max_cost=100, clock=lambda: next(ticks))  # a waiter's `since`: a tick
        tasks, peak, overtaken = [], {"running": 0, "cost": 0}, []

        async def request(tenant: str, i: int, cost: int, hold_s: float):
            arrival = next(ticks)  # before its own waiter's tick, after every earlier request's
            deadline = arrival + int(rng.integers(1, 400)) if i % 2 else None  # in ticks: some refused as late
            async with lim.slot(Cost(cost), tenant, deadline):
                c = lim.classes[tenant]  # admitted: nobody of its class who came earlier may still wait
                overtaken.extend((i, w.since) for w in c.waiters if w.since < arrival)
                peak["running"] = max(peak["running"], lim.running)
                peak["cost"] = max(peak["cost"], lim.cost_in_flight)
                await asyncio.sleep(hold_s)

        for i in range(200):
            tenant = "abc"[int(rng.integers(3))]
            t = asyncio.create_task(request(tenant, i, int(rng.integers(0, 101)), float(rng.uniform(0, 0.002))))
            tasks.append(t)
            if rng.random() < 0.15:
                tasks[int(rng.integers(len(tasks)))].cancel()
            await asyncio.sleep(float(rng.uniform(0, 0.0005)))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r is None or isinstance(r, (ApiError, asyncio.CancelledError)) for r in results)
        assert any(r is None for r in results)
        assert any(isinstance(r, ApiError) and "past its deadline" in r.message for r in results)
        assert peak["running"] <= 3 and peak["cost"] <= 100
        assert overtaken == []  # FIFO inside each class
        assert (lim.running, lim.cost_in_flight, lim.cost_queued, lim.waiting) == (0, 0, 0, 0)

    for seed in range(5):
        asyncio.run(scenario(seed))


# -- deadline-aware refusal ------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_request_that_cannot_finish_by_its_deadline_is_refused_at_once_with_retry_after():
    async def scenario():
        clock, waits, refusals = Clock(), [], []
        lim = Limiter(concurrency=1, queue=8, max_cost=1000, name="ddpm_generate", clock=clock,
                      on_wait=lambda label, s: waits.append((label, s)),
                      on_refuse=lambda label, reason: refusals.append((label, reason)))
        release = asyncio.Event()
        holder = held(lim, Cost(100), release)
        await asyncio.sleep(0)
        # before any measurement, a request that must wait is queued whatever its deadline
        early = asyncio.create_task(lim.acquire(Cost(100), "t1", deadline=clock.t + 0.001))
        await asyncio.sleep(0)
        assert lim.waiting == 1 and lim.rate is None
        early.cancel()
        await asyncio.sleep(0)
        clock.t += 2.0  # the holder's 100 units took 2 busy seconds: 50 units/s
        release.set()
        await holder
        assert lim.rate == pytest.approx(50.0)
        release.clear()
        holder = held(lim, Cost(100), release)  # 100 running (2 s of work)
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as e:  # 100 running + its own 100 at 50/s: 4 s > 3 s left
            await lim.acquire(Cost(100), "t1", deadline=clock.t + 3.0)
        assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.retry_after == 1
        assert "finish this request in about 4 s" in e.value.message and "deadline in 3 s" in e.value.message
        assert refusals == [("ddpm_generate/t1", "deadline")] and lim.waiting == 0
        fits = asyncio.create_task(lim.acquire(Cost(100), "t1", deadline=clock.t + 4.5))  # 4 s <= 4.5 s: queued
        await asyncio.sleep(0)
        assert lim.waiting == 1
        release.set()
        await holder
        await fits
        lim.release(100)
        assert [label for label, _ in waits] == ["ddpm_generate", "ddpm_generate", "ddpm_generate/t1"]
        async with lim.slot(Cost(100), "t2", deadline=clock.t + 0.001):  # can run now: admitted, no estimate
            pass

    asyncio.run(scenario())


def test_queued_requests_that_can_no_longer_meet_their_deadline_are_refused_once_measured():
    """Queued before any measurement, a request whose estimated finish is past its deadline once the first request
    completes is refused then (429, Retry-After) instead of timing out later; the others keep their places."""
    async def scenario():
        clock, refusals = Clock(), []
        lim = Limiter(concurrency=1, queue=8, max_cost=1000, name="p", clock=clock,
                      on_refuse=lambda label, reason: refusals.append((label, reason)))
        release = asyncio.Event()
        holder = held(lim, Cost(100), release)
        await asyncio.sleep(0)
        near = asyncio.create_task(lim.acquire(Cost(100), "t", deadline=clock.t + 3.0))
        late = asyncio.create_task(lim.acquire(Cost(100), "t", deadline=clock.t + 3.0))
        far = asyncio.create_task(lim.acquire(Cost(100), "t", deadline=clock.t + 100.0))
        await asyncio.sleep(0)
        assert lim.waiting == 3  # no measurement: queued whatever their deadlines
        clock.t += 2.0  # the holder's 100 units in 2 s: 50 units/s
        release.set()
        await holder
        await near  # admitted: it can run now
        with pytest.raises(ApiError) as e:  # near's 100 running + its own 100 at 50/s: 4 s > the 1 s left
            await late
        assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.retry_after == 3
        assert refusals == [("p/t", "deadline")]
        assert (lim.waiting, lim.cost_queued, lim.cost_in_flight) == (1, 100, 100)  # far keeps its place
        lim.release(100)
        await far
        lim.release(100)
        assert (lim.running, lim.cost_in_flight, lim.cost_queued, lim.waiting) == (0, 0, 0, 0)

    asyncio.run(scenario())


# -- configuration -----------------------------------------------------------------------------------------------


def test_max_cost_in_flight_option_and_env():
    assert gateway.parse_args([], environ={}).max_cost_in_flight == 64 * 100
    assert gateway.parse_args([], environ={"MNISTGEN_MAX_COST_IN_FLIGHT": "500"}).max_cost_in_flight == 500
    assert gateway.parse_args(["--max-cost-in-flight", "7"], environ={}).max_cost_in_flight == 7
    with pytest.raises(ValueError, match="max_cost_in_flight must be >= 1"):
        gateway.GatewayConfig(max_cost_in_flight=0)


# -- a real gateway ----------------------------------------------------------------------------------------------


def gauge(metrics: str, name: str) -> float:
    m = re.search(rf"^mnistgen_gateway_{name} ([\d.e+-]+)$", metrics, re.M)
    assert m, f"no {name} in /metrics"
    return float(m.group(1))


def labelled(metrics: str, name: str, **labels: str) -> float:
    """The value of mnistgen_gateway_<name>{labels...} (0 when the series is absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^mnistgen_gateway_{name}{{{re.escape(want)}}} ([\d.e+-]+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


def depth(gw, pool: str) -> float:
    return labelled(gw.metrics(), "queue_depth", **{"class": pool})


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    """fn(*args) in a thread; its result (or gRPC status code name) lands in the returned dict."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except grpc.RpcError as e:
            out["result"] = e.code().name
    t = threading.Thread(target=run)
    t.start()
    return t, out


HEAVY = pb.GenerateRequest(model="ddpm", num_samples=2, steps=1000, sampler="ddpm", seed=1)  # cost 2000, seconds


def test_gateway_refuses_over_budget_at_once(make_gateway, triton):
    triton.require("dcgan_generator")
    gw = make_gateway("--max-cost-in-flight", "100")
    with pytest.raises(grpc.RpcError) as e:
        gw.stub.Generate(pb.GenerateRequest(model="ddpm", num_samples=2, steps=100, sampler="ddim", seed=0), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cost 200 (2 samples x 100 steps) exceeds max_cost_in_flight 100" in e.value.details()
    r = gw.http("POST", "/v1/generate", {"model": "ddpm", "num_samples": 2, "steps": 100, "sampler": "ddim"})
    assert r.status == 429 and r.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert "cost 200 (2 samples x 100 steps) exceeds max_cost_in_flight 100" in r.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as e:
        gw.stub.Denoise(pb.DenoiseRequest(raw_images=RAW_IMAGE * 8, sigma=0.5, steps=20), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cost 160 (8 images x 20 UNet evaluations, steps 20) exceeds max_cost_in_flight 100" in e.value.details()
    m = gw.metrics()
    assert gauge(m, "max_cost_in_flight") == 100 and gauge(m, "cost_in_flight") == 0
    assert labelled(m, "admission_refusals_total", **{"class": "ddpm_generate", "reason": "over_budget"}) == 2
    assert labelled(m, "admission_refusals_total", **{"class": "ddpm_denoise", "reason": "over_budget"}) == 1
    # bad input is still INVALID_ARGUMENT (validated before admission), and what fits is served
    with pytest.raises(grpc.RpcError) as e:
        gw.stub.Generate(pb.GenerateRequest(model="ddpm", num_samples=65, steps=100), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert gw.stub.Generate(pb.GenerateRequest(num_samples=100, seed=0), timeout=30).images.count == 100


def test_gateway_admits_by_cost_per_model(make_gateway, triton):
    """Budget 400, no queue: while a DDPM request of cost 400 runs, another DDPM request of cost 20 is refused
    (its pool's budget is spent although 15 request slots are free), and a GAN request is served (its own pool)."""
    triton.require("ddpm_generate", "dcgan_generator")
    gw = make_gateway("--max-cost-in-flight", "400", "--max-concurrency", "16", "--max-queue", "0")
    long = pb.GenerateRequest(model="ddpm", num_samples=2, steps=200, sampler="ddim", seed=1)  # cost 400
    t, out = in_thread(lambda: gw.stub.Generate(long, timeout=120).images.count)
    try:
        wait_until(lambda: gauge(gw.metrics(), "cost_in_flight") == 400, 30, "the cost-400 request admitted",
                   proc=gw.proc, interval_s=0.01)
        with pytest.raises(grpc.RpcError) as e:
            gw.stub.Generate(pb.GenerateRequest(model="ddpm", num_samples=1, seed=0), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = e.value.details()
        assert "server busy: 1 requests running (max_concurrency 16) at cost 400 of max_cost_in_flight 400" in details
        assert "this request's cost 20 (1 sample x 20 steps)" in details
        r = gw.http("POST", "/v1/generate", {"model": "ddpm", "num_samples": 1})
        assert r.status == 429 and "at cost 400 of max_cost_in_flight 400" in r.json()["error"]["message"]
        assert r.headers.get("Retry-After") == "1"
        assert gw.stub.Generate(pb.GenerateRequest(num_samples=1, seed=0), timeout=30).images.count == 1
        assert gw.http("POST", "/v1/generate", {"num_samples": 1}).status == 200
    finally:
        t.join(120)
    assert out == {"result": 2}
    m = gw.metrics()
    assert gauge(m, "cost_in_flight") == 0 and gauge(m, "cost_queued") == 0
    assert labelled(m, "admission_refusals_total", **{"class": "ddpm_generate", "reason": "queue_full"}) == 2


def test_gateway_queues_by_cost_and_serves_in_order(make_gateway, triton):
    """Budget 400 with a queue: a request that does not fit waits (cost_queued and the class's queue depth show
    it) and runs once the budget frees, instead of being refused; both waits are in the class's histogram."""
    triton.require("ddpm_generate")
    gw = make_gateway("--max-cost-in-flight", "400", "--max-queue", "4")
    long = pb.GenerateRequest(model="ddpm", num_samples=2, steps=200, sampler="ddim", seed=1)  # cost 400
    t_long, long_out = in_thread(lambda: gw.stub.Generate(long, timeout=120).images.count)
    wait_until(lambda: gauge(gw.metrics(), "cost_in_flight") == 400, 30, "the cost-400 request admitted",
               proc=gw.proc, interval_s=0.01)
    short = pb.GenerateRequest(model="ddpm", num_samples=1, seed=2)  # cost 20
    t_short, short_out = in_thread(lambda: gw.stub.Generate(short, timeout=120).images.count)
    wait_until(lambda: gauge(gw.metrics(), "cost_queued") == 20 and depth(gw, "ddpm_generate") == 1, 30,
               "the short request queued", proc=gw.proc, interval_s=0.01)
    t_long.join(120)
    t_short.join(60)
    assert (long_out, short_out) == ({"result": 2}, {"result": 1})
    m = gw.metrics()
    assert labelled(m, "queue_wait_seconds_count", **{"class": "ddpm_generate"}) == 2
    assert labelled(m, "queue_depth", **{"class": "ddpm_generate"}) == 0 and gauge(m, "cost_queued") == 0


def test_gan_requests_answer_while_diffusion_floods_and_queues(make_gateway, triton):
    """A small mixed flood on a real gateway + Triton: four heavy DDPM requests, one running and three queued
    (one request at a time per model); batch-1 GAN requests over gRPC and HTTP all answer 200 meanwhile, and the
    diffusion work is still queued after the last of them; then every heavy request succeeds too."""
    triton.require("ddpm_generate", "dcgan_generator")
    gw = make_gateway("--max-concurrency", "1", "--max-queue", "8")
    flood = [in_thread(lambda: gw.stub.Generate(HEAVY, timeout=600).images.count) for _ in range(4)]
    try:
        wait_until(lambda: depth(gw, "ddpm_generate") == 3, 60, "three heavy requests queued", proc=gw.proc,
                   interval_s=0.01)
        for i in range(5):
            assert gw.stub.Generate(pb.GenerateRequest(num_samples=1, seed=i), timeout=60).images.count == 1
            assert gw.http("POST", "/v1/generate", {"num_samples": 1, "seed": i}).status == 200
        assert depth(gw, "ddpm_generate") >= 1  # the GAN requests did not wait for the diffusion queue to drain
    finally:
        for t, _ in flood:
            t.join(600)
    assert [out for _, out in flood] == [{"result": 2}] * 4
    m = gw.metrics()
    assert labelled(m, "queue_wait_seconds_count", **{"class": "dcgan_generator"}) == 10
    assert labelled(m, "queue_wait_seconds_count", **{"class": "ddpm_generate"}) == 4
    assert depth(gw, "ddpm_generate") == 0


def test_a_request_that_cannot_meet_its_deadline_gets_429_with_retry_after(make_gateway, triton):
    """Once the pool's throughput is measured, a request that would wait past its deadline behind a heavy one is
    refused at once (429 / RESOURCE_EXHAUSTED with Retry-After), not left to time out (504); with a deadline long
    enough, the same request is queued and served."""
    triton.require("ddpm_generate")
    gw = make_gateway("--max-concurrency", "1", "--max-queue", "8")
    small = pb.GenerateRequest(model="ddpm", num_samples=1, steps=20, sampler="ddim", seed=3)  # cost 20
    assert gw.stub.Generate(small, timeout=60).images.count == 1  # a measurement of the pool's throughput
    assert 'mnistgen_gateway_admission_throughput{pool="ddpm_generate"}' in gw.metrics()
    t, out = in_thread(lambda: gw.stub.Generate(HEAVY, timeout=600).images.count)
    try:
        wait_until(lambda: gauge(gw.metrics(), "cost_in_flight") == 2000, 30, "the heavy request admitted",
                   proc=gw.proc, interval_s=0.01)
        # 2000 units ahead at the rate 20 units took: far more than 1 s
        with pytest.raises(grpc.RpcError) as e:
            gw.stub.Generate(small, timeout=1.0)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "past its deadline" in e.value.details()
        retry = dict(e.value.trailing_metadata())["retry-after"]
        assert int(retry) >= 1
        r = gw.http("POST", "/v1/generate", {"model": "ddpm", "num_samples": 1, "steps": 20, "sampler": "ddim"},
                    headers={"X-Request-Timeout": "1"})
        assert r.status == 429 and "past its deadline" in r.json()["error"]["message"]
        assert int(r.headers["Retry-After"]) >= 1
        assert gw.stub.Generate(small, timeout=600).images.count == 1  # queued behind the heavy one, served
    finally:
        t.join(600)
    assert out == {"result": 2}
    m = gw.metrics()
    assert labelled(m, "admission_refusals_total", **{"class": "ddpm_generate", "reason": "deadline"}) == 2
    assert count_code(m, "DEADLINE_EXCEEDED") == 0


def count_code(metrics: str, code: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("mnistgen_gateway_requests_total{") and f'code="{code}"' in line)


def test_classes_per_tenant_carry_a_token_id_never_the_token(make_gateway, triton):
    """With auth on, each token is its own class (pool/t + 8 hex digits, the same id over gRPC and HTTP)."""
    from serving.gateway.auth import _digest, tenant_id
    triton.require("dcgan_generator")
    tokens = ("tenant-one-token-0123456789", "tenant-two-token-9876543210")
    gw = make_gateway(env={"MNISTGEN_API_TOKENS": ",".join(tokens)})
    ids = [tenant_id(_digest(t)) for t in tokens]
    assert ids[0] != ids[1] and all(re.fullmatch(r"t[0-9a-f]{8}", i) for i in ids)
    gw.stub.Generate(pb.GenerateRequest(num_samples=1, seed=0), timeout=30,
                     metadata=(("authorization", f"Bearer {tokens[0]}"),))
    r = gw.http("POST", "/v1/generate", {"num_samples": 1}, headers={"Authorization": f"Bearer {tokens[1]}"})
    assert r.status == 200
    m = gw.metrics()
    for i in ids:
        assert labelled(m, "queue_wait_seconds_count", **{"class": f"dcgan_generator/{i}"}) == 1
    assert not any(t in m for t in tokens)


def test_a_declared_oversize_body_gets_413_without_the_body(gateway):
    """Headers declaring 10 GB and no body: the 413 comes back (naming body and the limit), the body never sent."""
    limit = 8 << 20  # --max-request-bytes default
    with socket.create_connection(("127.0.0.1", gateway.config.http_port), timeout=30) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000000\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:200]
    error = json.loads(body)["error"]
    assert error["field"] == "body" and f"of 10000000000 bytes is over the limit of {limit} bytes" in error["message"]
    assert labelled(gateway.metrics(), "admission_refusals_total", **{"class": "unknown", "reason": "too_large"}) >= 1
