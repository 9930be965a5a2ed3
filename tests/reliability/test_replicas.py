"""The gateway over Triton replicas (serving/gateway/backends.py) on real processes: two supervised Tritons of one
Stack (serving.run, TRITON_REPLICAS=2) share the load, a SIGKILLed one loses no request and is readmitted after
its restart, a retry returns the very same images, and a backend added to the address set gets traffic."""
from __future__ import annotations

import base64
import re
import threading
import time

import numpy as np
import pytest

from mnistgen import catalog
from serving import images as imgs
from serving.process import wait_until
from serving.run import RunConfig, Stack, start_gateway
from serving.triton_access import KEY_ENV
from serving.triton_server import DEFAULT_MODEL_REPOSITORY, available_models

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
MODELS = ("dcgan_generator", "ddpm_generate", "ddpm_denoise")  # GAN + DDPM Generate + Denoise, nothing more
GAN = next(m.name for m in catalog.MODELS if m.triton == "dcgan_generator")
BACKEND_OK = re.compile(r'mnistgen_gateway_backend_requests_total\{backend="([^"]+)",code="OK"\} (\S+)')
RETRIES = re.compile(r'mnistgen_gateway_backend_retries_total\{reason="[^"]+"\} (\S+)')
SPREAD = 0.15  # each backend's share within +-15% of an even split


@pytest.fixture(scope="module")
def stack(tmp_path_factory, checkpoint_dir):
    """Two Tritons (the models above) and a gateway, supervised by Stack.alive() in a thread: a killed Triton
    is restarted by the launcher, as under `make run TRITON_REPLICAS=2`."""
    from training.export import ExportConfig, run

    run(ExportConfig(checkpoint_dir=checkpoint_dir, model_repository=DEFAULT_MODEL_REPOSITORY))  # skips fresh ones
    missing = [m for m in MODELS if m not in available_models(DEFAULT_MODEL_REPOSITORY)]
    if missing:
        pytest.skip(f"models {missing} not exported")
    d = tmp_path_factory.mktemp("replicas")
    c = RunConfig(host="127.0.0.1", grpc_port=0, http_port=0, triton_http_port=0, triton_replicas=2, models=MODELS,
                  export=False, log_dir=d, gateway_log=d / "gateway.log", backoff_s=0.5,
                  gateway_args=("--probe-interval-s", "0.5", "--stop-grace-s", "5"))
    s = Stack(c)
    stop = threading.Event()
    try:
        s.start().wait_ready()

        def supervise():
            while not stop.wait(0.2):
                s.alive()

        threading.Thread(target=supervise, daemon=True).start()
        yield s
    finally:
        stop.set()
        s.close()


def ok_by_backend(gw) -> dict[str, float]:
    return {b: float(v) for b, v in BACKEND_OK.findall(gw.metrics())}


def retries(gw) -> float:
    return sum(float(v) for v in RETRIES.findall(gw.metrics()))


def all_ready(stack: Stack, gw=None) -> dict:
    """Wait until both Tritons run and the gateway (default: the stack's) lists both backends ready."""
    gw = gw or stack.gateway

    def ready():
        body = gw.http("GET", "/readyz", timeout=5).json()
        return body if body["backends_ready"] == len(stack.tritons) else None
    return wait_until(ready, 300, "both Triton backends ready in /readyz", interval_s=0.2)


def generate(gw, seed: int | None = None, model: str = GAN, **extra) -> tuple[int, dict]:
    body = {"model": model, "num_samples": 1, "format": "RAW_FLOAT32", **extra}
    if seed is not None:
        body["seed"] = seed
    r = gw.http("POST", "/v1/generate", body, timeout=60)
    return r.status, r.json()


def test_two_replicas_share_the_load_evenly(stack):
    body = all_ready(stack)
    assert [b["state"] for b in body["backends"]] == ["ready", "ready"]
    assert {b["backend"] for b in body["backends"]} == {t.grpc_url for t in stack.tritons}
    before = ok_by_backend(stack.gateway)
    n, clients = 400, 4
    answers: list[int] = []

    def client(k: int):
        for i in range(k, n, clients):
            answers.append(generate(stack.gateway, i)[0])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers.count(200) == n
    after = ok_by_backend(stack.gateway)
    counts = {b: after[b] - before.get(b, 0.0) for b in after}
    assert sum(counts.values()) == n and len(counts) == 2, counts
    for b, c in counts.items():
        assert abs(c - n / 2) <= SPREAD * n / 2, f"{b} served {c:g} of {n}: {counts}"


def test_a_retry_on_another_backend_returns_the_same_images(stack, tmp_path):
    """A backend the gateway still holds ready (its probe is far off) dies: the request that picks it is sent again
    to the other one and answers 200, with the images its seed gives on any backend."""
    all_ready(stack)
    gw = start_gateway(stack.gateway.config.triton_url, tmp_path / "gw.log", "--probe-interval-s", "600",
                       env={KEY_ENV: stack.key})
    try:
        gw.wait_ready(60)
        all_ready(stack, gw)
        victim = stack.tritons[1]
        victim.proc.kill()
        victim.proc.wait(10)
        for _ in range(40):  # each request picks the dead backend with probability 1/2 until one does
            r0 = retries(gw)
            status, body = generate(gw)  # no seed: the gateway draws one before the first try
            assert status == 200, body
            if retries(gw) > r0:
                break
        else:
            pytest.fail("no request was retried in 40 (the dead backend never picked?)")
        assert generate(gw, int(body["seed"]))[1]["images"] == body["images"]
        ready = gw.http("GET", "/readyz").json()
        assert [b["state"] for b in ready["backends"]] == ["ready", "ejected"], ready
    finally:
        gw.stop(20)
    all_ready(stack)  # the launcher restarted it and the stack's gateway readmitted it


def test_sigkill_of_one_replica_under_mixed_load_loses_nothing(stack):
    all_ready(stack)
    gw, victim = stack.gateway, stack.tritons[0]
    png = base64.b64encode(imgs.encode_pngs(np.zeros((1, 1, 28, 28), np.float32))[0]).decode()
    calls = [lambda i: generate(gw, i),
             lambda i: generate(gw, i, model="ddpm", steps=2),
             lambda i: (lambda r: (r.status, r.json()))(gw.http("POST", "/v1/denoise", {
                 "png_images": [png], "sigma": 0.3, "steps": 2, "seed": i}, timeout=60))]
    answers: list[tuple[int, dict]] = []
    not_ready: list[dict] = []
    stop = threading.Event()

    def client(k: int):
        i = k
        while not stop.is_set():
            answers.append(calls[i % len(calls)](i))
            i += 8

    def watch():
        while not stop.is_set():
            r = gw.http("GET", "/readyz", timeout=5)
            if r.status != 200:
                not_ready.append(r.json())
            time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(answers) >= 16, 120, "load running", interval_s=0.1)
        pid = victim.proc.pid
        victim.proc.kill()
        # the launcher restarts it; the gateway readmits it; then it serves again
        wait_until(lambda: victim.running and victim.proc.pid != pid, 120, "Triton 0 restarted", interval_s=0.2)
        all_ready(stack)
        served = ok_by_backend(gw).get(victim.grpc_url, 0.0)
        wait_until(lambda: ok_by_backend(gw).get(victim.grpc_url, 0.0) > served, 120,
                   "the restarted replica serving again", interval_s=0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    bad = [a for a in answers if a[0] != 200]
    assert not bad, f"{len(bad)} of {len(answers)} failed, e.g. {bad[:3]}"
    assert not not_ready, f"/readyz not 200 {len(not_ready)} times, e.g. {not_ready[0]}"


def test_a_backend_added_to_the_address_set_gets_traffic(stack, tmp_path):
    """--triton-url @FILE is re-read every --resolve-interval-s (as a DNS name is re-resolved)."""
    all_ready(stack)
    first, second = (t.grpc_url for t in stack.tritons)
    names = tmp_path / "backends.txt"
    names.write_text(first + "\n")
    gw = start_gateway(f"@{names}", tmp_path / "gw.log", "--resolve-interval-s", "1", env={KEY_ENV: stack.key})
    try:
        gw.wait_ready(60)
        assert [b["backend"] for b in gw.http("GET", "/readyz").json()["backends"]] == [first]
        assert generate(gw, 1)[0] == 200
        names.write_text(f"{first}\n{second}\n")

        def second_served():
            assert generate(gw, 2)[0] == 200
            return ok_by_backend(gw).get(second, 0) > 0
        wait_until(second_served, 60, f"traffic on {second} after it joined the address set", interval_s=0.05)
        assert [b["backend"] for b in gw.http("GET", "/readyz").json()["backends"]] == [first, second]
    finally:
        gw.stop(20)
