"""Admission by cost (serving/gateway/admission.py): cost per request, the Limiter's budget, FIFO queue and refusals,
the --max-cost-in-flight option, and a real gateway refusing / queueing by cost with the cost gauges on /metrics."""
from __future__ import annotations

import asyncio
import re
import threading
import time

import grpc
import numpy as np
import pytest

from serving import gateway
from serving.gateway.admission import (
    FREE, Cost, Limiter, denoise_cost, denoise_evaluations, generate_cost, sigma_timestep,
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


def held(lim: Limiter, cost: Cost, release: asyncio.Event, order: list | None = None, name: str = ""):
    async def hold():
        async with lim.slot(cost):
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


def test_gateway_refuses_over_budget_at_once(make_gateway, triton):
    gw = make_gateway("--max-cost-in-flight", "100")
    t0 = time.monotonic()
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
    assert time.monotonic() - t0 < 5.0  # no Triton work, no waiting
    m = gw.metrics()
    assert gauge(m, "max_cost_in_flight") == 100 and gauge(m, "cost_in_flight") == 0
    # bad input is still INVALID_ARGUMENT (validated before admission), and what fits is served
    with pytest.raises(grpc.RpcError) as e:
        gw.stub.Generate(pb.GenerateRequest(model="ddpm", num_samples=65, steps=100), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    if "dcgan_generator" in triton.models:
        assert gw.stub.Generate(pb.GenerateRequest(num_samples=100, seed=0), timeout=30).images.count == 100


def test_gateway_admits_by_cost_with_free_request_slots(make_gateway, triton):
    """16 request slots, budget 400: while a DDPM request of cost 400 runs, a GAN request of cost 1 is refused
    (no queue), the cost gauge shows 400; afterwards both gauges are back to 0 and the GAN request is served."""
    triton.require("ddpm_generate", "dcgan_generator")
    gw = make_gateway("--max-cost-in-flight", "400", "--max-concurrency", "16", "--max-queue", "0")
    long = pb.GenerateRequest(model="ddpm", num_samples=2, steps=200, sampler="ddim", seed=1)  # cost 400
    result: dict = {}

    def run_long() -> None:
        try:
            result["images"] = gw.stub.Generate(long, timeout=120).images.count
        except grpc.RpcError as e:
            result["error"] = e.code().name

    t = threading.Thread(target=run_long)
    t.start()
    try:
        wait_until(lambda: gauge(gw.metrics(), "cost_in_flight") == 400, 30, "the cost-400 request admitted",
                   proc=gw.proc, interval_s=0.01)
        with pytest.raises(grpc.RpcError) as e:
            gw.stub.Generate(pb.GenerateRequest(num_samples=1, seed=0), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = e.value.details()
        assert "server busy: 1 requests running (max_concurrency 16) at cost 400 of max_cost_in_flight 400" in details
        assert "this request's cost 1 (1 sample x 1 generator pass)" in details
        r = gw.http("POST", "/v1/generate", {"num_samples": 1})
        assert r.status == 429 and "at cost 400 of max_cost_in_flight 400" in r.json()["error"]["message"]
        assert r.headers.get("Retry-After") == "1"
    finally:
        t.join(120)
    assert result == {"images": 2}
    m = gw.metrics()
    assert gauge(m, "cost_in_flight") == 0 and gauge(m, "cost_queued") == 0
    assert gw.stub.Generate(pb.GenerateRequest(num_samples=1, seed=0), timeout=30).images.count == 1


def test_gateway_queues_by_cost_and_serves_in_order(make_gateway, triton):
    """Budget 400 with a queue: a request that does not fit waits (cost_queued shows it) and runs once the budget
    frees, instead of being refused."""
    triton.require("ddpm_generate", "dcgan_generator")
    gw = make_gateway("--max-cost-in-flight", "400", "--max-queue", "4")
    long = pb.GenerateRequest(model="ddpm", num_samples=2, steps=200, sampler="ddim", seed=1)  # cost 400
    done: dict[str, float] = {}

    def call(name: str, req: pb.GenerateRequest) -> None:
        gw.stub.Generate(req, timeout=120)
        done[name] = time.monotonic()

    t_long = threading.Thread(target=call, args=("long", long))
    t_long.start()
    wait_until(lambda: gauge(gw.metrics(), "cost_in_flight") == 400, 30, "the cost-400 request admitted",
               proc=gw.proc, interval_s=0.01)
    t_gan = threading.Thread(target=call, args=("gan", pb.GenerateRequest(num_samples=16, seed=2)))  # cost 16
    t_gan.start()
    wait_until(lambda: gauge(gw.metrics(), "cost_queued") == 16, 30, "the GAN request queued", proc=gw.proc,
               interval_s=0.01)
    t_long.join(120)
    t_gan.join(60)
    assert set(done) == {"long", "gan"} and done["gan"] >= done["long"] - 0.5  # ran after the long one
