"""Cancellation inside Triton: a long DDPM sampling loop stops within about one UNet step once its gRPC client's
deadline passes (client_timeout) or the client cancels, so the next request runs at once; a request still queued
past its own `timeout` (the queue policy's allow_timeout_override) is rejected without running.

Triton 2.51's gRPC endpoint marks an in-flight request cancelled when its deadline passes or the client cancels, and
the python backend's request.is_cancelled() sees it: model.py checks it before every UNet evaluation
(mnistgen.diffusion's should_stop hook) and answers CANCELLED.
"""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from loadtest.bench_triton import _grpc_inputs
from mnistgen.diffusion import SamplingStopped, denoise, generate
from serving.process import wait_until
from test_triton_server import engine_rows

BIG_STEPS = 1000  # a whole DDPM-1000 loop: minutes on a few CPU cores
STOPPED = re.compile(r"(ddpm_\w+): \d+ request\(s\) cancelled \((\d+) \w+, ([\w+-]+)-(\d+)\): "
                     r"stopped at UNet evaluation (\d+) of (\d+)")


# -- the loop hook (no Triton) ----------------------------------------------------------------------


def counting_eps():
    calls: list[int] = []

    def eps(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    return eps, calls


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_should_stop_ends_generate_before_the_next_unet_evaluation(sampler):
    eps, calls = counting_eps()
    with pytest.raises(SamplingStopped) as err:
        generate(eps, 2, sampler, 50, seed=0, should_stop=lambda: len(calls) >= 3)
    assert len(calls) == 3 and err.value.step == 3 and err.value.steps == 50
    assert "evaluation 4 of 50" in str(err.value)


def test_should_stop_ends_denoise_and_is_asked_once_per_evaluation():
    eps, calls = counting_eps()
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(len(calls))
        return False

    denoise(eps, torch.zeros(2, 1, 28, 28), 0.5, "ddim", 7, seed=0, should_stop=should_stop)
    assert asked == list(range(7)) and len(calls) == 7  # before each of the 7 evaluations, never after the last
    with pytest.raises(SamplingStopped) as err:
        denoise(eps, torch.zeros(2, 1, 28, 28), 0.5, "ddim", 7, seed=0, should_stop=lambda: True)
    assert err.value.step == 0


# -- Triton ---------------------------------------------------------------------------------------------


def generate_request(n: int, steps: int, sampler: str = "ddpm", seed: int = 0) -> list:
    return _grpc_inputs({
        "num_samples": (np.full((1, 1), n, np.int32), "INT32"),
        "steps": (np.full((1, 1), steps, np.int32), "INT32"),
        "sampler": (np.full((1, 1), sampler.encode(), dtype=object), "BYTES"),
        "seed": (np.full((1, 1), seed, np.int64), "INT64"),
    })


def denoise_request(k: int, sigma: float, steps: int, sampler: str = "ddpm") -> list:
    x0 = np.tanh(np.random.default_rng(0).standard_normal((k, 1, 28, 28)).astype(np.float32))
    return _grpc_inputs({
        "image": (x0, "FP32"),
        "sigma": (np.full((k, 1), sigma, np.float32), "FP32"),
        "steps": (np.full((k, 1), steps, np.int32), "INT32"),
        "sampler": (np.full((k, 1), sampler.encode(), dtype=object), "BYTES"),
        "seed": (np.arange(k, dtype=np.int64).reshape(k, 1), "INT64"),
    })


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def stops_logged(triton, model: str) -> list[tuple]:
    return [m.groups() for m in STOPPED.finditer(triton.log_tail(2000)) if m.group(1) == model]


def unet_step_s(client, model: str, request) -> float:
    """Seconds per UNet evaluation of `request` (a 4-step version of the big one): the scale for a deadline and for "seconds of work".
    The fastest of two calls after a warm-up one: a first call (a session's lazy setup) or a load spike on a shared
    machine would overstate it, and the tests size "seconds of work" from it."""
    client.infer(model, request)
    return min(timed(lambda: client.infer(model, request))[0] for _ in range(2)) / 4


def test_client_timeout_stops_a_running_generate_loop(triton):
    triton.require("ddpm_generate")
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    step_s = unet_step_s(client, "ddpm_generate", generate_request(64, 4))
    before = len(stops_logged(triton, "ddpm_generate"))
    timeout_s = max(2.0, 5 * step_s)
    with pytest.raises(InferenceServerException) as err:
        client.infer("ddpm_generate", generate_request(64, BIG_STEPS), client_timeout=timeout_s,
                     request_id="cancel-gen-1")
    assert "DEADLINE_EXCEEDED" in str(err.value.status()), err.value
    # the instance is free again: a small request runs, and the log says the big loop stopped early
    result = client.infer("ddpm_generate", generate_request(1, 2, "ddim"))
    assert result.as_numpy("image").shape == (1, 1, 1, 28, 28)
    stops = stops_logged(triton, "ddpm_generate")[before:]
    assert stops, triton.log_tail(40)
    _, samples, sampler, steps, at, of = stops[-1]
    assert (samples, sampler, steps, of) == ("64", "ddpm", str(BIG_STEPS), str(BIG_STEPS))
    assert int(at) < BIG_STEPS / 4  # stopped near the deadline, nowhere near the end
    assert f"stopped at UNet evaluation {at} of {of} (request ids cancel-gen-1)" in triton.log_tail(2000)


def test_client_cancel_stops_a_running_denoise_loop(triton):
    triton.require("ddpm_denoise")
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    sigma = 1.0  # the largest the catalog allows: t* ~ 258, so ~259 evaluations for steps=1000
    client.infer("ddpm_denoise", denoise_request(32, sigma, 4))  # a warm-up: a first call's lazy setup
    before = len(stops_logged(triton, "ddpm_denoise"))
    outcome: dict = {}
    rows0 = engine_rows(triton, "ddpm_denoise")
    future = client.async_infer("ddpm_denoise", denoise_request(32, sigma, BIG_STEPS),
                                lambda result, error: outcome.setdefault("error", error))
    wait_until(lambda: engine_rows(triton, "ddpm_denoise") > rows0, 120, "the denoise loop running", interval_s=0.05)
    future.cancel()
    result = client.infer("ddpm_denoise", denoise_request(1, 0.3, 2, "ddim"))
    assert result.as_numpy("denoised").shape == (1, 1, 28, 28)
    wait_until(lambda: "error" in outcome, 60, "the cancelled request's answer")
    assert outcome.get("error") is not None and "CANCELLED" in str(outcome["error"].status())
    stops = stops_logged(triton, "ddpm_denoise")[before:]
    assert stops and int(stops[-1][4]) < int(stops[-1][5]) / 4, triton.log_tail(40)


def settled_inference_count(client, model: str) -> int:
    """The model's inference_count once two reads 0.2 s apart agree (Triton records a request's statistics around the
    time its response goes out, so a read right after a call can miss it)."""
    def read() -> int:
        return int(client.get_inference_statistics(model, as_json=True)["model_stats"][0].get("inference_count", 0))
    last, now = None, read()
    while now != last:
        time.sleep(0.2)
        last, now = now, read()
    return now


def test_queued_request_past_its_own_timeout_is_rejected_unrun(triton):
    """allow_timeout_override: the request's `timeout` (microseconds) bounds its wait in Triton's queue."""
    triton.require("ddpm_generate")
    client = triton.server.client()  # with the launch key: statistics are a restricted API
    step_s = unet_step_s(client, "ddpm_generate", generate_request(8, 4))
    count0 = settled_inference_count(client, "ddpm_generate")  # the warm-up calls' statistics may still land
    outcome: dict = {}
    busy_steps = int(min(BIG_STEPS, max(8, 5.0 / step_s)))  # ~5 s of work ahead of the queued request
    rows0 = engine_rows(triton, "ddpm_generate")
    client.async_infer("ddpm_generate", generate_request(8, busy_steps),
                       lambda result, error: outcome.setdefault("blocker", error or result))
    wait_until(lambda: engine_rows(triton, "ddpm_generate") > rows0, 120, "the blocker running", interval_s=0.05)
    with pytest.raises(InferenceServerException) as err:
        client.infer("ddpm_generate", generate_request(1, 2, "ddim"), timeout=300_000)  # 0.3 s in the queue
    assert "timeout" in str(err.value).lower(), err.value
    wait_until(lambda: "blocker" in outcome, 300, "the blocker's answer")
    assert not isinstance(outcome.get("blocker"), (Exception, type(None))), outcome
    count = settled_inference_count(client, "ddpm_generate")
    assert count - count0 == 1  # the blocker; the rejected request never ran
