"""The backend set's pure logic (serving/gateway/backends.py): address parsing and resolution, the least-loaded pick,
which failures are retried (once, on another ready backend) and which are not. Fake Triton clients: the behaviour on
real Tritons is tests/reliability/test_replicas.py."""
from __future__ import annotations

import asyncio

import pytest

from serving.gateway import backends as bk
from serving.gateway.config import GatewayConfig
from serving.metrics import GatewayMetrics
from serving.validation import ApiError


class FakeClient:
    """A TritonClient stand-in: infer answers `answer` (a value, or an ApiError to raise)."""

    def __init__(self, url: str, answer=None):
        self.url, self.answer, self.calls, self.forgot = url, answer, 0, 0

    async def infer(self, model, inputs, outputs, timeout):
        self.calls += 1
        if isinstance(self.answer, ApiError):
            raise self.answer
        return (self.url, inputs)

    async def readiness(self, models, timeout):
        ok = not isinstance(self.answer, ApiError)
        return ok, {m: ok for m in models}

    def forget(self):
        self.forgot += 1

    async def close(self):
        pass


def backend_set(urls: list[str], answers: dict, metrics=None) -> bk.BackendSet:
    s = bk.BackendSet.__new__(bk.BackendSet)
    s.spec, s.metrics, s.on_change, s.healthy, s._resolve_soon, s._tasks = ",".join(urls), metrics, None, -1, False, set()
    s.lookup, s.resolve_interval_s, s._resolved_at = (lambda h, p: [f"{h}:{p}"]), 3600.0, float("inf")
    s.backends = {u: bk.Backend(u, FakeClient(u, answers.get(u))) for u in urls}
    for b in s.backends.values():
        b.state = bk.READY
    return s


def metric(m: GatewayMetrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_resolve_lists_names_and_files(tmp_path):
    lookup = {"triton-headless": ["10.0.0.2:8001", "10.0.0.1:8001"]}
    f = tmp_path / "backends.txt"
    f.write_text("10.0.0.9:8001\n10.0.0.2:8001\n")
    urls = bk.resolve(f"127.0.0.1:9001, triton-headless:8001, [::1]:9002, @{f}", lambda h, p: lookup[h])
    assert urls == ["127.0.0.1:9001", "10.0.0.2:8001", "10.0.0.1:8001", "[::1]:9002", "10.0.0.9:8001"]


@pytest.mark.parametrize("bad", ["", "triton", "triton:", "triton:0", "triton:99999", "a:1,b"])
def test_bad_triton_url_names_the_field_and_the_form(bad):
    with pytest.raises(ValueError, match="triton_url") as e:
        GatewayConfig(triton_url=bad)
    assert "host:port" in str(e.value)


def test_pick_prefers_the_less_loaded_of_two():
    s = backend_set(["a:1", "b:1"], {})
    s.backends["a:1"].outstanding = 100
    assert {s.pick().url for _ in range(50)} == {"b:1"}  # with two backends both are always drawn
    s.backends["a:1"].state = bk.EJECTED
    s.backends["a:1"].outstanding = 0
    assert {s.pick().url for _ in range(20)} == {"b:1"}  # an ejected one only when none is ready


def test_unavailable_is_ejected_and_retried_once_on_another_with_the_same_request():
    m = GatewayMetrics()
    s = backend_set(["a:1", "b:1"], {"a:1": ApiError("failed to connect to all addresses; Connection refused",
                                                      code="UNAVAILABLE")}, m)
    s.backends["b:1"].outstanding = 5  # the pick tries a first
    url, inputs = asyncio.run(s.infer("m", ["same"], ["out"], 5.0, cost=3))
    assert (url, inputs) == ("b:1", ["same"])
    assert s.backends["a:1"].state == bk.EJECTED and s.backends["a:1"].client.forgot == 1
    assert [b.outstanding for b in s.backends.values()] == [0, 5]
    assert metric(m, "mnistgen_gateway_backend_retries_total", reason="connect") == 1
    assert metric(m, "mnistgen_gateway_backend_requests_total", backend="a:1", code="UNAVAILABLE") == 1
    assert metric(m, "mnistgen_gateway_backend_requests_total", backend="b:1", code="OK") == 1
    assert metric(m, "mnistgen_gateway_backends_healthy") == 1


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED",
                                  "INTERNAL"])
def test_answers_are_never_retried(code):
    s = backend_set(["a:1", "b:1"], {"a:1": ApiError("no", code=code), "b:1": ApiError("no", code=code)})
    with pytest.raises(ApiError) as e:
        asyncio.run(s.infer("m", [], [], 5.0))
    assert e.value.code == code
    assert sum(b.client.calls for b in s.backends.values()) == 1
    assert all(b.state == bk.READY for b in s.backends.values())


def test_only_one_retry_and_the_first_error_when_none_is_left():
    down = ApiError("unavailable", code="UNAVAILABLE")
    s = backend_set(["a:1", "b:1", "c:1"], {u: down for u in ("a:1", "b:1", "c:1")})
    with pytest.raises(ApiError) as e:
        asyncio.run(s.infer("m", [], [], 5.0))
    assert e.value.code == "UNAVAILABLE"
    assert sum(b.client.calls for b in s.backends.values()) == 2
    one = backend_set(["a:1"], {"a:1": down})
    with pytest.raises(ApiError):
        asyncio.run(one.infer("m", [], [], 5.0))
    assert one.backends["a:1"].client.calls == 1  # no other backend: no retry on the same one
    # all ejected: the next call still tries one (a restarted Triton answers before the probe sees it)
    one.backends["a:1"].client.answer = None
    assert asyncio.run(one.infer("m", [], [], 5.0))[0] == "a:1"


def test_probe_readmits_and_reports_the_healthy_count():
    seen: list[int] = []
    s = backend_set(["a:1", "b:1"], {"a:1": ApiError("down", code="UNAVAILABLE")})
    s.on_change = seen.append
    asyncio.run(s.probe(["m"], 1.0))
    assert [b.state for b in s.backends.values()] == [bk.EJECTED, bk.READY] and seen == [1]
    s.backends["a:1"].client.answer = None
    detail = asyncio.run(s.probe(["m"], 1.0))
    assert [d["state"] for d in detail] == [bk.READY, bk.READY] and seen == [1, 2]


def test_reresolution_follows_the_file_and_keeps_the_set_on_a_bad_one(tmp_path):
    f = tmp_path / "backends.txt"
    f.write_text("127.0.0.1:1\n")

    async def scenario() -> list[list[str]]:
        s = bk.BackendSet(f"@{f}", 1 << 20, resolve_interval_s=0.0)
        seen = [list(s.backends)]
        for text in ("127.0.0.1:1\n127.0.0.1:2\n", "nonsense\n", "127.0.0.1:2\n"):
            f.write_text(text)
            await s.reresolve()
            seen.append(list(s.backends))
        await s.close()
        return seen

    assert asyncio.run(scenario()) == [["127.0.0.1:1"], ["127.0.0.1:1", "127.0.0.1:2"], ["127.0.0.1:1", "127.0.0.1:2"],
                                       ["127.0.0.1:2"]]


def test_a_model_missing_on_one_backend_is_retried_without_ejecting_it():
    from tritonclient.utils import InferenceServerException

    from serving.gateway.triton_client import triton_error

    missing = triton_error(InferenceServerException("Request for unknown model: 'm' is not found",
                                                    status="StatusCode.UNAVAILABLE"), "m")  # as Triton says it
    s = backend_set(["a:1", "b:1"], {"a:1": missing})
    s.backends["b:1"].outstanding = 5
    assert asyncio.run(s.infer("m", [], [], 5.0))[0] == "b:1"
    assert all(b.state == bk.READY for b in s.backends.values())
