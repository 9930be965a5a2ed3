"""Bearer-token auth and TLS of the gateway, against real gateway processes with real TLS handshakes: a test CA
made with the `openssl` CLI, one module gateway with TLS on both ports and three tokens (two from a token file, as
during a rotation, one from MNISTGEN_API_TOKENS), other gateways for the token file's reload and config errors."""
from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving import client
from serving import gateway as gw_pkg
from serving.gateway.auth import TOKEN_FILE_CHECK_S, UNAUTHENTICATED_MESSAGE, ConfigError, TokenAuth, parse_tokens
from serving.generated.mnistgen.v1 import generation_pb2 as pb
from serving.generated.mnistgen.v1 import generation_pb2_grpc as pb_grpc
from serving.process import NotReady, wait_until
from serving.run import start_gateway

REPO_ROOT = Path(__file__).resolve().parents[2]

FILE_TOKENS = ("old-token-1", "new-token-2")  # a rotation in progress: both valid
ENV_TOKEN = "env.token_3~+/="
TOKEN_FILE_TEXT = f"# gateway tokens\n{FILE_TOKENS[0]}\n\n  {FILE_TOKENS[1]}   # added for the rotation\n"
DEADLINE_S = 20.0


# ---- test PKI --------------------------------------------------------------------------------------------
@dataclass
class Pki:
    ca: Path  # the CA clients trust
    cert: Path  # server certificate (SAN localhost, 127.0.0.1), signed by ca
    key: Path  # its key
    other_ca: Path  # a CA that signed nothing here (a client trusting only it must fail)
    ca_key: Path  # a key that is not the server certificate's


def openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)}:\n{r.stderr}"


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN=mnistgen test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not found: cannot make the test certificates")
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = make_ca(d, "ca")
    other_ca, _ = make_ca(d, "other-ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                                  "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "server.ext", cwd=d)
    return Pki(ca, d / "server.crt", d / "server.key", other_ca, ca_key)


@pytest.fixture(scope="module")
def secure_gateway(triton, pki, tmp_path_factory):
    """A gateway with TLS on both ports and three valid tokens (token file + MNISTGEN_API_TOKENS)."""
    triton.start()  # a no-op unless an earlier test left it stopped
    d = tmp_path_factory.mktemp("secure-gateway")
    token_file = d / "tokens"
    token_file.write_text(TOKEN_FILE_TEXT)
    gw = start_gateway(triton.grpc_url, d / "gateway.log", "--api-token-file", str(token_file),
                       "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
                       env={"MNISTGEN_API_TOKENS": ENV_TOKEN}, ca=pki.ca)
    try:
        gw.wait_ready(60)  # /readyz over https, no token
        yield gw
    finally:
        code = gw.stop()
        assert code == 0, f"gateway exited with {code} after SIGTERM:\n{gw.log_tail()}"
    log = gw.log_path.read_text(errors="replace")
    for token in (*FILE_TOKENS, ENV_TOKEN):
        assert token not in log, "a token was written to the gateway's log"


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def grpc_error(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=DEADLINE_S, **kw)
    return e.value


# ---- gRPC ------------------------------------------------------------------------------------------------
def test_grpc_refuses_missing_wrong_and_malformed_tokens_alike(secure_gateway):
    stub = secure_gateway.stub
    refused = {
        "none": grpc_error(stub.ListModels, pb.ListModelsRequest()),
        "wrong": grpc_error(stub.ListModels, pb.ListModelsRequest(), metadata=bearer("not-a-token")),
        "prefix": grpc_error(stub.ListModels, pb.ListModelsRequest(), metadata=bearer(FILE_TOKENS[0][:-1])),
        "no scheme": grpc_error(stub.ListModels, pb.ListModelsRequest(),
                                metadata=(("authorization", FILE_TOKENS[0]),)),
        "basic": grpc_error(stub.ListModels, pb.ListModelsRequest(), metadata=(("authorization", "Basic eDp5"),)),
        "empty bearer": grpc_error(stub.ListModels, pb.ListModelsRequest(), metadata=(("authorization", "Bearer"),)),
        # a bad request is not even parsed without a token: UNAUTHENTICATED, not INVALID_ARGUMENT
        "bad request": grpc_error(stub.Generate, pb.GenerateRequest(model="nope", num_samples=5000)),
    }
    for what, e in refused.items():
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (what, e.code(), e.details())
        assert e.details() == UNAUTHENTICATED_MESSAGE, (what, e.details())  # identical: never says which
        assert dict(e.trailing_metadata()).get("x-request-id"), what  # a refused call gets a request id too
    e = grpc_error(stub.ListModels, pb.ListModelsRequest(), metadata=(("x-request-id", "refused-1"),))
    assert dict(e.trailing_metadata())["x-request-id"] == "refused-1"


def test_grpc_accepts_every_configured_token(secure_gateway):
    for token in (*FILE_TOKENS, ENV_TOKEN):
        r = secure_gateway.stub.ListModels(pb.ListModelsRequest(), timeout=DEADLINE_S, metadata=bearer(token))
        assert "dcgan-baseline" in [m.name for m in r.models]
    # the scheme is case-insensitive (RFC 7235)
    secure_gateway.stub.ListModels(pb.ListModelsRequest(), timeout=DEADLINE_S,
                                   metadata=(("authorization", f"bearer {FILE_TOKENS[1]}"),))


def test_grpc_generate_with_token(secure_gateway, triton):
    triton.require("dcgan_generator")
    r = secure_gateway.stub.Generate(pb.GenerateRequest(model="dcgan-baseline", num_samples=3, seed=5),
                                     timeout=DEADLINE_S, metadata=bearer(FILE_TOKENS[1]))
    assert r.images.count == 3 and r.seed == 5
    e = grpc_error(secure_gateway.stub.Generate, pb.GenerateRequest(num_samples=5000), metadata=bearer(ENV_TOKEN))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT  # with a token, validation answers as usual


def test_grpc_health_and_reflection_stay_open(secure_gateway):
    health = health_pb2_grpc.HealthStub(secure_gateway.channel)
    for service in ("", "mnistgen.v1.GenerationService"):
        r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(secure_gateway.channel)
    (answer,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                         timeout=DEADLINE_S)
    names = {s.name for s in answer.list_services_response.service}
    assert "mnistgen.v1.GenerationService" in names and "grpc.health.v1.Health" in names


# ---- HTTP ------------------------------------------------------------------------------------------------
def test_http_refuses_missing_wrong_and_malformed_tokens_alike(secure_gateway):
    gw = secure_gateway
    refused = {
        "none": gw.http("GET", "/v1/models"),
        "wrong": gw.http("GET", "/v1/models", headers={"Authorization": "Bearer not-a-token"}),
        "no scheme": gw.http("GET", "/v1/models", headers={"Authorization": FILE_TOKENS[0]}),
        "basic": gw.http("GET", "/v1/models", headers={"Authorization": "Basic eDp5"}),
        "bad request": gw.http("POST", "/v1/generate", {"num_samples": 5000}),  # not parsed without a token
        "bad json": gw.http("POST", "/v1/generate", b"{not json", headers={"Authorization": "Bearer x"}),
        "unknown path": gw.http("GET", "/v1/secret-route"),  # route existence is not revealed either
    }
    bodies = set()
    for what, r in refused.items():
        assert r.status == 401, (what, r.status, r.body[:300])
        assert r.headers["WWW-Authenticate"].startswith("Bearer"), what
        err = r.json()["error"]
        assert (err["code"], err["http_status"], err["message"]) == ("UNAUTHENTICATED", 401, UNAUTHENTICATED_MESSAGE)
        assert r.headers.get("X-Request-Id"), what  # a refused call gets a request id too
        bodies.add(r.body)
    assert len(bodies) == 1, "the 401 bodies differ: they would tell a missing token from a wrong one"


def test_http_accepts_every_configured_token(secure_gateway, triton):
    for token in (*FILE_TOKENS, ENV_TOKEN):
        r = secure_gateway.http("GET", "/v1/models", headers={"Authorization": f"Bearer {token}"})
        assert r.status == 200, (token, r.body[:300])
    r = secure_gateway.http("POST", "/v1/generate", {"num_samples": 5000},
                            headers={"Authorization": f"Bearer {FILE_TOKENS[0]}"})
    assert r.status == 400 and r.json()["error"]["field"] == "num_samples"
    triton.require("dcgan_generator")
    r = secure_gateway.http("POST", "/v1/generate", {"num_samples": 2, "seed": 1},
                            headers={"Authorization": f"Bearer {ENV_TOKEN}"})
    assert r.status == 200 and r.json()["images"]["count"] == 2


def test_probes_and_metrics_stay_open(secure_gateway):
    gw = secure_gateway
    assert gw.http("GET", "/healthz").status == 200
    assert gw.http("GET", "/readyz").status == 200
    # one refusal of each kind, then the counters (by transport and reason) and the enabled gauge
    gw.http("GET", "/v1/models")
    gw.http("GET", "/v1/models", headers={"Authorization": "Bearer nope"})
    grpc_error(gw.stub.ListModels, pb.ListModelsRequest(), metadata=(("authorization", "Token x"),))
    r = gw.http("GET", "/metrics")
    assert r.status == 200
    text = r.body.decode()
    assert "mnistgen_gateway_auth_enabled 1.0" in text
    for transport, reason in (("http", "missing"), ("http", "invalid"), ("grpc", "malformed")):
        line = f'mnistgen_gateway_auth_failures_total{{reason="{reason}",transport="{transport}"}}'
        assert line in text, line
        value = float(text.split(line, 1)[1].split()[0])
        assert value >= 1


def test_auth_is_off_by_default(ready_gateway):
    assert "mnistgen_gateway_auth_enabled 0.0" in ready_gateway.metrics()
    assert ready_gateway.http("GET", "/v1/models").status == 200
    ready_gateway.stub.ListModels(pb.ListModelsRequest(), timeout=DEADLINE_S)


# ---- TLS: who can connect ----------------------------------------------------------------------------------
def test_plain_text_and_untrusting_clients_fail(secure_gateway, pki):
    gw = secure_gateway
    token = bearer(FILE_TOKENS[0])
    # plain-text gRPC against the TLS port
    with grpc.insecure_channel(gw.grpc_target) as ch:
        e = grpc_error(pb_grpc.GenerationServiceStub(ch).ListModels, pb.ListModelsRequest(), metadata=token)
        assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
    # TLS, but trusting another CA (and the system's, which know nothing of the test CA)
    for roots in (pki.other_ca.read_bytes(), None):
        with grpc.secure_channel(gw.grpc_target, grpc.ssl_channel_credentials(roots)) as ch:
            e = grpc_error(pb_grpc.GenerationServiceStub(ch).ListModels, pb.ListModelsRequest(), metadata=token)
            assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
    # plain HTTP against the TLS port: no HTTP answer comes back
    req = urllib.request.Request(f"http://{gw.http_target}/healthz")
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(req, timeout=DEADLINE_S).read()
    # https trusting the wrong CA: the handshake fails verification
    with pytest.raises(urllib.error.URLError) as e:
        urllib.request.urlopen(f"https://{gw.http_target}/healthz", timeout=DEADLINE_S,
                               context=ssl.create_default_context(cafile=str(pki.other_ca)))
    assert isinstance(e.value.reason, ssl.SSLCertVerificationError), e.value
    # and the gateway is none the worse for it
    gw.stub.ListModels(pb.ListModelsRequest(), timeout=DEADLINE_S, metadata=token)
    assert gw.http("GET", "/healthz").status == 200


# ---- the client CLI ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_client_cli_token_and_ca(secure_gateway, pki, capsys, monkeypatch, transport):
    monkeypatch.delenv(client.TOKEN_ENV, raising=False)
    target = secure_gateway.grpc_target if transport == "grpc" else secure_gateway.http_target
    base = ["models", "--transport", transport, "--target", target, "--timeout", "10"]
    assert client.main([*base, "--ca", str(pki.ca), "--token", FILE_TOKENS[1]]) == 0
    assert "dcgan-baseline" in capsys.readouterr().out
    assert client.main([*base, "--ca", str(pki.ca)]) == 2  # no token
    assert f"UNAUTHENTICATED: {UNAUTHENTICATED_MESSAGE}" in capsys.readouterr().err
    assert client.main([*base, "--ca", str(pki.ca), "--token", "wrong"]) == 2
    assert f"UNAUTHENTICATED: {UNAUTHENTICATED_MESSAGE}" in capsys.readouterr().err
    monkeypatch.setenv(client.TOKEN_ENV, ENV_TOKEN)  # the token from the environment
    assert client.main([*base, "--ca", str(pki.ca)]) == 0
    capsys.readouterr()
    assert client.main([*base, "--token", ENV_TOKEN]) == 2  # plain text against TLS
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert client.main([*base, "--ca", str(pki.other_ca)]) == 2  # a CA that did not sign the gateway's cert
    assert "UNAVAILABLE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        client.main([*base, "--token", "two words"])
    capsys.readouterr()


def test_client_api_generate_over_tls(secure_gateway, pki, triton):
    triton.require("dcgan_generator")
    for transport, target in (("grpc", secure_gateway.grpc_target), ("http", secure_gateway.http_target)):
        cfg = client.ClientConfig(transport, target, 30.0, token=FILE_TOKENS[0], ca=pki.ca)
        assert FILE_TOKENS[0] not in repr(cfg)
        with client.GatewayClient(cfg) as c:
            r = c.generate("dcgan-baseline", 4, seed=9)
        assert client.as_array(r.images).shape == (4, 1, 28, 28)


# ---- the token file: rotation without a restart -----------------------------------------------------------
def test_token_file_is_reloaded(make_gateway, tmp_path):
    """Missing at start: auth off (an optional Secret); appears: required; replaced: the new set holds;
    deleted again: the last tokens stay (a reload never turns auth off)."""
    token_file = tmp_path / "secret" / "tokens"
    gw = make_gateway("--api-token-file", str(token_file))
    assert "does not exist: auth stays off" in gw.log_path.read_text()
    assert gw.http("GET", "/v1/models").status == 200
    assert "mnistgen_gateway_auth_enabled 0.0" in gw.metrics()

    def status_with(token: str | None) -> int:
        return gw.http("GET", "/v1/models", headers={"Authorization": f"Bearer {token}"} if token else {}).status

    def until(expected: dict) -> None:
        def check() -> bool:
            got = {t: status_with(t) for t in expected}
            if got != expected:
                raise NotReady(f"statuses {got}, want {expected}")
            return True
        wait_until(check, 10 * TOKEN_FILE_CHECK_S + 5, "token file reload", proc=gw.proc, log=gw.log_path)

    token_file.parent.mkdir()
    token_file.write_text("first-token\n")
    until({None: 401, "first-token": 200, "second-token": 401})
    assert "mnistgen_gateway_auth_enabled 1.0" in gw.metrics()
    # kubelet-style update: a new file renamed over the old one
    tmp = token_file.with_suffix(".new")
    tmp.write_text("# rotated\nsecond-token\n")
    tmp.replace(token_file)
    until({None: 401, "first-token": 401, "second-token": 200})
    token_file.unlink()
    # a request makes the gateway look at the file (at most once per TOKEN_FILE_CHECK_S): poll with requests
    wait_until(lambda: status_with(None) == 401 and "disappeared: keeping the 1 token(s)" in gw.log_path.read_text(),
               10 * TOKEN_FILE_CHECK_S + 5, "the gateway noticing the token file is gone", proc=gw.proc,
               log=gw.log_path)
    assert status_with(None) == 401 and status_with("second-token") == 200
    e = grpc_error(gw.stub.ListModels, pb.ListModelsRequest())  # gRPC follows the same token set
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    gw.stub.ListModels(pb.ListModelsRequest(), timeout=DEADLINE_S, metadata=bearer("second-token"))


# ---- configuration errors: clear, and before anything listens ---------------------------------------------
def test_tls_needs_cert_and_key(capsys):
    for argv in (["--tls-cert", "server.crt"], ["--tls-key", "server.key"]):
        with pytest.raises(SystemExit):
            gw_pkg.parse_args(argv, environ={})
        assert "TLS needs both the certificate and its key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gw_pkg.parse_args([], environ={"MNISTGEN_TLS_CERT": "server.crt"})
    assert "tls_cert is set but tls_key is not" in capsys.readouterr().err


def test_unusable_tls_or_tokens_stop_the_gateway(triton, pki, tmp_path):
    cases = {
        "mismatch": (["--tls-cert", str(pki.cert), "--tls-key", str(pki.ca_key)], {},
                     "not a PEM certificate chain and its matching private key"),
        "missing": (["--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(pki.key)], {}, "cannot read"),
        "bad token": ([], {"MNISTGEN_API_TOKENS": "good-token, has space"}, "token #2 has characters"),
    }
    for name, (args, env, message) in cases.items():
        with pytest.raises(RuntimeError, match="exited with code 1") as e:
            start_gateway(triton.grpc_url, tmp_path / f"{name}.log", *args, env=env)
        assert message in str(e.value), (name, str(e.value)[-1500:])
        assert "Traceback" not in str(e.value), name
        assert "has space" not in str(e.value)  # tokens are never echoed


# ---- pure logic --------------------------------------------------------------------------------------------
def test_parse_tokens():
    assert parse_tokens(" a , b,,a ", "env") == ["a", "b"]
    assert parse_tokens("# c\nx1\n\n y2  # note\n#z\n", "file", comments=True) == ["x1", "y2"]
    assert parse_tokens("", "env") == []
    with pytest.raises(ConfigError, match="token #1") as e:
        parse_tokens("se cret", "env")
    assert "cret" not in str(e.value)


def test_token_auth_reasons_and_reload(tmp_path):
    now = [0.0]  # the clock TokenAuth reads
    f = tmp_path / "tokens"
    f.write_text("filetok\n")
    auth = TokenAuth(["static"], f, clock=lambda: now[0])
    assert auth.enabled
    assert auth.failure([]) == "missing"
    assert auth.failure(["Bearer a", "Bearer b"]) == "malformed"
    assert auth.failure(["Basic static"]) == "malformed" and auth.failure(["Bearer "]) == "malformed"
    assert auth.failure(["Bearer statiC"]) == "invalid" and auth.failure(["Bearer stat"]) == "invalid"
    assert auth.failure(["Bearer static"]) is None and auth.failure(["BEARER  filetok "]) is None
    f.write_text("other\n")
    assert auth.allows(["Bearer filetok"], "http")  # not re-read before TOKEN_FILE_CHECK_S
    now[0] += TOKEN_FILE_CHECK_S
    assert not auth.allows(["Bearer filetok"], "http") and auth.allows(["Bearer other"], "grpc")
    f.write_text("# nothing\n")  # emptied: keeps the tokens it had
    now[0] += TOKEN_FILE_CHECK_S
    assert auth.allows(["Bearer other"], "http")
    assert TokenAuth.from_config(gw_pkg.GatewayConfig()) is None  # nothing configured: auth off, nothing installed
