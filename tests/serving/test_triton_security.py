"""Triton is reachable only through the gateway (docs/security.md): loopback sockets, restricted APIs that need the
launch's key, the gateway holding that key, and a model Triton stops serving answered UNAVAILABLE / 503 naming it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from mnistgen import catalog
from mnistgen.files import REPO_ROOT
from serving.generated.mnistgen.v1 import generation_pb2 as pb
from serving.process import wait_until
from serving.run import RunConfig, Stack
from serving.triton_access import ADMIN_APIS, ALL_BUT_HEALTH, KEY_HEADER, is_loopback
from serving.triton_server import TritonConfig, TritonServer

GAN = next(m for m in catalog.MODELS if m.triton == "dcgan_generator")  # the model the tests unload
MODELS = (GAN.triton, catalog.DENOISER.triton)


def listening(pid: int) -> list[str]:
    """host:port of every TCP socket the process and its children (python-backend stubs) listen on."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return [f"{c.laddr.ip}:{c.laddr.port}" for p in procs for c in p.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN]


def refused(call) -> str:
    """The message of a gRPC call that Triton refuses for want of the key."""
    with pytest.raises(InferenceServerException) as e:
        call()
    assert "restricted" in e.value.message(), e.value.message()
    return e.value.message()


def http_call(method: str, url: str, headers: dict | None = None, body: dict | None = None) -> tuple[int, str]:
    data = None if method == "GET" else json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# -- configuration rules ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"bind_address": "0.0.0.0"}, "bind_reason"),
    ({"bind_address": "10.0.0.7", "bind_reason": "  "}, "bind_reason"),
    ({"restricted": ("model-repository", "admin")}, r"\['admin'\] are not Triton APIs"),
])
def test_config_refuses_exposure_without_a_reason_and_unknown_apis(kw, match):
    with pytest.raises(ValueError, match=match):
        TritonConfig(**kw)


def test_config_defaults_are_loopback_http_off_admin_apis_keyed_and_the_key_is_never_shown():
    a, b = TritonConfig(), TritonConfig()
    assert is_loopback(a.bind_address) and not a.http and a.restricted == ADMIN_APIS
    assert a.key and a.key != b.key and a.key not in repr(a)  # a fresh key per launch, kept out of repr
    assert TritonConfig(bind_address="0.0.0.0", bind_reason="container; NetworkPolicy admits the gateway only")
    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "ipv6:[::1]", "localhost", "::ffff:127.0.0.1"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "::ffff:10.1.2.3", "triton"))


def test_command_restricts_both_protocols_and_turns_http_off(tmp_path):
    server = TritonServer(TritonConfig(model_repository=tmp_path))
    cmd = server.command()
    assert "--allow-http=false" in cmd and not any(a.startswith("--http-") for a in cmd)
    assert f"--grpc-restricted-protocol={','.join(ADMIN_APIS)}:{KEY_HEADER}={server.config.key}" in cmd
    assert {a.split("=", 1)[1] for a in cmd if a.split("=")[0] in ("--grpc-address", "--metrics-address")} == {
        "127.0.0.1"}
    assert server.config.key not in server.describe()
    server.close()


# -- the session's Triton (tests keep its HTTP on): admin APIs refused without the key ------------------------------

def test_session_triton_listens_on_loopback_only(triton):
    assert all(is_loopback(a.rsplit(":", 1)[0]) for a in listening(triton.server.proc.pid)), \
        listening(triton.server.proc.pid)


def test_session_triton_http_admin_apis_need_the_key(triton):
    base = f"http://{triton.http_url}/v2"
    key = {KEY_HEADER: triton.server.config.key}
    for method, path in (("POST", "/repository/index"), ("POST", "/repository/models/no_such_model/unload"),
                         ("POST", "/systemsharedmemory/region/r/register"), ("GET", "/models/stats"),
                         ("GET", "/logging"), ("GET", "/trace/setting")):
        status, body = http_call(method, base + path, body={"key": "/r", "offset": 0, "byte_size": 8})
        assert status != 200 and "restricted" in body, (path, status, body)
    status, body = http_call("POST", base + "/repository/index", key)
    assert status == 200 and {m["name"] for m in json.loads(body)} >= set(triton.models), body


def test_session_triton_grpc_admin_apis_need_the_key(triton):
    stranger, keyed = triton.server.client(key=False), triton.server.client()
    refused(stranger.get_model_repository_index)
    refused(lambda: stranger.unload_model("no_such_model"))
    refused(lambda: stranger.register_system_shared_memory("r", "/mnistgen_r", 8))
    refused(stranger.get_inference_statistics)
    refused(stranger.get_log_settings)
    refused(stranger.get_trace_settings)
    assert {m.name for m in keyed.get_model_repository_index().models} >= set(triton.models)
    assert keyed.get_inference_statistics().model_stats
    assert stranger.is_server_ready()  # health stays open: probes and the supervisor need no key


# -- `make run`'s stack: every API but health keyed; the gateway holds the key -------------------------------------

@pytest.fixture(scope="module")
def stack(triton, tmp_path_factory):
    """serving.run's Stack (what `make run` starts) with the GAN the tests unload and the denoiser."""
    triton.require(*MODELS)  # exported by the session fixture
    tmp = tmp_path_factory.mktemp("secure-stack")
    cfg = RunConfig(grpc_port=0, http_port=0, triton_http_port=0, models=MODELS, export=False, log_dir=tmp,
                    gateway_log=tmp / "gateway.log", gateway_args=("--probe-interval-s", "0.5"))
    with Stack(cfg) as s:
        yield s


def test_stack_triton_is_loopback_only_with_http_off(stack):
    t = stack.triton
    addresses = listening(t.proc.pid)
    assert addresses and all(is_loopback(a.rsplit(":", 1)[0]) for a in addresses), addresses
    ports = {int(a.rsplit(":", 1)[1]) for a in addresses}
    assert t.config.grpc_port in ports and t.config.metrics_port in ports and t.config.http_port not in ports
    assert t.config.restricted == ALL_BUT_HEALTH
    log = stack.gateway.log_path.read_text() + t.log_path.read_text()
    assert t.config.key not in log  # the key is in no log, nor in the gateway's argv (it gets it by environment)
    assert t.config.key not in " ".join(stack.gateway.proc.args)


def test_stack_triton_refuses_strangers_and_the_gateway_still_works(stack):
    t, gw = stack.triton, stack.gateway
    stranger, keyed = t.client(key=False), t.client()
    refused(stranger.get_model_repository_index)
    refused(lambda: stranger.unload_model(GAN.triton))
    refused(lambda: stranger.register_system_shared_memory("r", "/mnistgen_r", 8))
    latent = grpcclient.InferInput("latent", [1, 64], "FP32")  # (the shape is never looked at: refused first)
    latent.set_data_from_numpy(np.zeros((1, 64), np.float32))
    refused(lambda: stranger.infer(GAN.triton, [latent]))  # no inference around the gateway's auth and admission
    refused(lambda: stranger.get_model_config(GAN.triton))
    assert stranger.is_server_ready() and stranger.is_model_ready(GAN.triton)
    assert {m.name for m in keyed.get_model_repository_index().models} >= set(MODELS)

    r = gw.http("POST", "/v1/generate", {"model": GAN.name, "num_samples": 2, "seed": 1})
    assert r.status == 200, r.body
    clean = np.zeros((1, 1, 28, 28), "<f4").tobytes()
    d = gw.stub.Denoise(pb.DenoiseRequest(raw_images=clean, sigma=0.5, steps=2, sampler="ddim", seed=3), timeout=120)
    assert d.denoised.count == 1

    # the bench's Triton-direct path: its client carries the key (loadtest/bench.py)
    dim = int(keyed.get_model_metadata(GAN.triton).inputs[0].shape[-1])
    latent = grpcclient.InferInput("latent", [2, dim], "FP32")
    latent.set_data_from_numpy(np.zeros((2, dim), np.float32))
    assert keyed.infer(GAN.triton, [latent]).as_numpy("image").shape == (2, 1, 28, 28)


def test_keyed_shared_memory_registration_works(stack):
    import tritonclient.utils.shared_memory as shm

    keyed = stack.triton.client()
    region = shm.create_shared_memory_region("mnistgen_r", "/mnistgen_h31_r", 64)
    try:
        keyed.register_system_shared_memory("mnistgen_r", "/mnistgen_h31_r", 64)
        assert [r.name for r in keyed.get_system_shared_memory_status().regions.values()] == ["mnistgen_r"]
        keyed.unregister_system_shared_memory("mnistgen_r")
    finally:
        shm.destroy_shared_memory_region(region)


def test_a_model_triton_stops_serving_is_503_naming_it_and_readyz_says_which(stack):
    gw, keyed = stack.gateway, stack.triton.client()
    assert gw.http("POST", "/v1/generate", {"model": GAN.name, "num_samples": 1}).status == 200  # config cached
    assert GAN.triton not in gw.http("GET", "/readyz").json()["missing"]
    keyed.unload_model(GAN.triton)
    try:
        wait_until(lambda: not keyed.is_model_ready(GAN.triton), 60, f"{GAN.triton} unloaded")
        r = gw.http("POST", "/v1/generate", {"model": GAN.name, "num_samples": 1})
        assert r.status == 503 and r.headers.get("Retry-After"), (r.status, r.body)
        assert GAN.triton in r.json()["error"]["message"], r.body
        with pytest.raises(grpc.RpcError) as e:
            gw.stub.Generate(pb.GenerateRequest(model=GAN.name, num_samples=1), timeout=30)
        assert e.value.code().name == "UNAVAILABLE" and GAN.triton in e.value.details()
        def missing() -> dict | None:
            body = gw.http("GET", "/readyz").json()
            return body if GAN.triton in body["missing"] else None

        body = wait_until(missing, 30, "/readyz naming the missing model")
        assert GAN.triton in body["reason"] and body["ready"], body  # the denoiser still serves: ready, one missing
    finally:
        keyed.load_model(GAN.triton)
    wait_until(lambda: keyed.is_model_ready(GAN.triton), 120, f"{GAN.triton} loaded again")
    assert gw.http("POST", "/v1/generate", {"model": GAN.name, "num_samples": 1}).status == 200


# -- the gateway itself fails closed: no tokens, beyond loopback, no opt-out: no start -----------------------------

def test_gateway_config_rule_without_tokens():
    from serving.gateway.config import parse_args, unauthenticated_refusal

    wide = parse_args(["--host", "0.0.0.0"], environ={})
    assert "--allow-unauthenticated" in unauthenticated_refusal(wide, has_tokens=False)
    assert unauthenticated_refusal(wide, has_tokens=True) is None
    assert unauthenticated_refusal(parse_args(["--host", "127.0.0.1"], environ={}), has_tokens=False) is None
    opted_out = parse_args(["--host", "0.0.0.0"], environ={"MNISTGEN_ALLOW_UNAUTHENTICATED": "true"})
    assert unauthenticated_refusal(opted_out, has_tokens=False) is None


@pytest.mark.parametrize("token_file", ["absent", "empty"])
def test_gateway_beyond_loopback_without_tokens_refuses_to_start(tmp_path, token_file):
    """Under the k8s rule (a token file, listening on 0.0.0.0) a missing or empty file stops the gateway at start."""
    path = tmp_path / "tokens"
    if token_file == "empty":
        path.write_text("# no token yet\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNISTGEN_")}
    argv = [sys.executable, "-m", "serving.gateway", "--host", "0.0.0.0", "--grpc-port", "0", "--http-port", "0",
            "--triton-url", "127.0.0.1:1", "--api-token-file", str(path)]
    r = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--allow-unauthenticated" in r.stderr and "listening" not in r.stdout, r
