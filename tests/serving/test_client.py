"""serving.client against the real gateway: the CLI's generate / denoise / models over gRPC and HTTP."""
from __future__ import annotations

import json
import resource
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from serving import client
from serving import images as imgs
from serving.process import wait_until
from serving.triton_server import free_ports


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_cli_generate_grid_and_npy(ready_gateway, triton, tmp_path, capsys, transport):
    triton.require("dcgan_generator")
    target = ready_gateway.grpc_target if transport == "grpc" else ready_gateway.http_target
    out, npy = tmp_path / "grid.png", tmp_path / "x.npy"
    assert client.main(["generate", "--transport", transport, "--target", target, "--model", "dcgan-baseline",
                        "--n", "64", "--seed", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (8 * 28 + 7 * 2,) * 2
    assert "64 samples from dcgan-baseline v1 (seed 3)" in capsys.readouterr().out
    assert client.main(["generate", "--transport", transport, "--target", target, "--n", "4", "--seed", "3",
                        "--out", str(out), "--npy", str(npy)]) == 0
    x = np.load(npy)
    assert x.shape == (4, 1, 28, 28) and x.dtype == np.float32


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_cli_denoise_strip(ready_gateway, triton, tmp_path, capsys, transport):
    triton.require("ddpm_denoise")
    target = ready_gateway.grpc_target if transport == "grpc" else ready_gateway.http_target
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255
    src = tmp_path / "digit.png"
    src.write_bytes(imgs.encode_png(digit))
    out = tmp_path / "result.png"
    assert client.main(["denoise", "--transport", transport, "--target", target, "--input", str(src), str(src),
                        "--sigma", "0.5", "--steps", "2", "--seed", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 28 + 2 * 2, 2 * 28 + 2)  # clean | noisy | denoised, one row per input
    strip = np.asarray(Image.open(out))
    np.testing.assert_array_equal(strip[:28, :28], digit)  # the clean column is the input
    assert "(clean | noisy | denoised)" in capsys.readouterr().out


def test_cli_models_and_errors(ready_gateway, capsys):
    assert client.main(["models", "--target", ready_gateway.grpc_target]) == 0
    out = capsys.readouterr().out
    assert "dcgan-baseline" in out and "ddpm_generate" in out
    assert client.main(["generate", "--target", ready_gateway.grpc_target, "--n", "5000"]) == 2
    assert "INVALID_ARGUMENT: num_samples: must be in 1..1024" in capsys.readouterr().err
    assert client.main(["generate", "--transport", "http", "--target", ready_gateway.http_target,
                        "--model", "gan"]) == 2
    assert "INVALID_ARGUMENT: model: unknown model 'gan'" in capsys.readouterr().err


def test_client_unreachable_target(capsys):
    port = free_ports(1)[0]
    assert client.main(["models", "--target", f"127.0.0.1:{port}", "--timeout", "2"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert client.main(["models", "--transport", "http", "--target", f"127.0.0.1:{port}", "--timeout", "2"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_http_client_keeps_one_connection_alive(ready_gateway, triton):
    c = client.GatewayClient(transport="http", target=ready_gateway.http_target)
    first = c.generate(num_samples=2, seed=5)
    conn = c._local.http
    port = conn.sock.getsockname()[1]
    for n in (64, 1):
        c.generate(num_samples=n, seed=5)
    assert c._local.http is conn and conn.sock.getsockname()[1] == port  # the same TCP connection throughout
    assert c.generate(num_samples=2, seed=5).images.raw == first.images.raw
    with pytest.raises(client.ClientError) as e:  # an error answer keeps the connection too
        c.generate(num_samples=5000)
    assert (e.value.code, e.value.http_status) == ("INVALID_ARGUMENT", 400)
    assert c._local.http is conn
    c.close()
    assert c._local.http is None
    assert c.generate(num_samples=1, seed=5).images.count == 1  # a new connection after close()


class OneAnswerPerConnection:
    """A real HTTP/1.1 server on 127.0.0.1 that answers the first request on each connection and then, like a
    gateway at its keep-alive timeout or restarting, drops the connection: at once (`close_after_answer`) or when the
    next request arrives, without answering it."""

    def __init__(self, close_after_answer: bool):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.close_after_answer, self.requests, self.answered, self.closed = close_after_answer, 0, 0, 0
        body = json.dumps({"models": [{"name": "m"}]}).encode()
        self.answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                       + str(len(body)).encode() + b"\r\n\r\n" + body)
        threading.Thread(target=self.serve, daemon=True).start()

    def read_request(self, conn) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        self.requests += 1
        return True

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # the test closed the listening socket
                return
            with conn:
                if not self.read_request(conn):
                    continue
                conn.sendall(self.answer)
                self.answered += 1
                if not self.close_after_answer:
                    self.read_request(conn)  # the next request on this connection: dropped unanswered
            self.closed += 1


@pytest.mark.parametrize("close_after_answer", [True, False], ids=["closed-while-idle", "closed-on-next-request"])
def test_http_client_replaces_a_connection_the_server_closed(close_after_answer):
    server = OneAnswerPerConnection(close_after_answer)
    c = client.GatewayClient(transport="http", target=f"127.0.0.1:{server.port}", timeout_s=5)
    for i in range(3):
        assert [m.name for m in c.list_models().models] == ["m"]
        if close_after_answer:  # the server has closed the idle connection before the next call
            wait_until(lambda: server.closed == i + 1, 10, "the server's close", interval_s=0.005)
    # (the server thread counts an answer after sending it: the client may read it first)
    wait_until(lambda: server.answered == 3, 10, "the server's count of its answers", interval_s=0.005)
    assert server.requests == (3 if close_after_answer else 5)  # every call after the first sent twice
    server.sock.close()


def test_idle_connection_check_works_above_descriptor_1024(machine_skip):
    """readable() uses poll(): select() refuses descriptors over 1,023, which a load generator's process reaches."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        machine_skip(f"open-file hard limit {hard} < 1200 (raise it: ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if hard == resource.RLIM_INFINITY
                                                else min(max(soft, 1200), hard), hard))
    filler = [socket.socket() for _ in range(1030)]
    try:
        a, b = socket.socketpair()
        assert a.fileno() > 1024
        assert not client.readable(a)  # idle, open
        b.close()
        assert client.readable(a)  # the peer closed it
        a.close()
    finally:
        for s in filler:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
