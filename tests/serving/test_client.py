"""serving.client against the real gateway: the CLI's generate / denoise / models over gRPC and HTTP."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serving import client
from serving import images as imgs


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
    from serving.triton_server import free_port

    port = free_port()
    assert client.main(["models", "--target", f"127.0.0.1:{port}", "--timeout", "2"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert client.main(["models", "--transport", "http", "--target", f"127.0.0.1:{port}", "--timeout", "2"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
