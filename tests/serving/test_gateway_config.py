"""Gateway configuration (CLI + MNISTGEN_* environment) and the generated protobuf code being up to date."""
from __future__ import annotations

import asyncio

import pytest

from serving import gateway
from serving.proto import gen
from serving.validation import ApiError


def test_cli_and_env_overrides():
    d = gateway.parse_args([], environ={})
    assert (d.grpc_port, d.http_port, d.triton_url) == (50051, 8080, "127.0.0.1:8001")
    env = {"MNISTGEN_TRITON_URL": "triton:8001", "MNISTGEN_GRPC_PORT": "6000", "MNISTGEN_STOP_GRACE_S": "2.5"}
    c = gateway.parse_args([], environ=env)
    assert (c.triton_url, c.grpc_port, c.stop_grace_s) == ("triton:8001", 6000, 2.5)
    c = gateway.parse_args(["--grpc-port", "7000", "--log-level", "debug"], environ=env)  # CLI beats env
    assert (c.grpc_port, c.log_level) == (7000, "DEBUG")
    with pytest.raises(SystemExit):
        gateway.parse_args([], environ={"MNISTGEN_HTTP_PORT": "eighty"})
    with pytest.raises(SystemExit):
        gateway.parse_args(["--grpc-port", "70000"], environ={})


def test_limiter_refuses_beyond_queue():
    async def scenario():
        lim = gateway.Limiter(concurrency=1, queue=1)
        release = asyncio.Event()

        async def hold():
            async with lim.slot():
                await release.wait()

        first = asyncio.create_task(hold())
        await asyncio.sleep(0)
        second = asyncio.create_task(hold())  # queued
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as e:
            async with lim.slot():
                pass
        assert e.value.code == "RESOURCE_EXHAUSTED"
        release.set()
        await asyncio.gather(first, second)
        async with lim.slot():  # free again
            pass

    asyncio.run(scenario())


def test_generated_code_is_up_to_date(tmp_path):
    """serving/generated is exactly what `python -m serving.proto.gen` writes from the .proto."""
    for f in gen.generate(tmp_path):
        committed = gen.OUT_ROOT / f.relative_to(tmp_path)
        assert committed.read_text() == f.read_text(), f"{committed} is stale: run `python -m serving.proto.gen`"
