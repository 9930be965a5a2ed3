"""One source for the request limits: mnistgen.limits, read by the gateway and by the Triton models.

The gateway once refused ddpm num_samples over 64 while Triton's ddpm_generate took up to 256; now both read
MAX_DDPM_SAMPLES (Triton through its config.pbtxt parameter, which must repeat it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from mnistgen import limits
from serving import validation

REPO = Path(__file__).resolve().parents[2]
DDPM_GENERATE = REPO / "model_repository" / "ddpm_generate"


def model_config(model_dir: Path):
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_gateway_limits_are_mnistgen_limits():
    assert validation.MODELS["ddpm"].max_num_samples == validation.MAX_DDPM_SAMPLES == limits.MAX_DDPM_SAMPLES
    assert all(validation.MODELS[m].max_num_samples == limits.MAX_GAN_SAMPLES
               for m in ("dcgan-baseline", "dcgan-modified", "mlp"))
    assert validation.DENOISE_MODEL.max_num_samples == limits.MAX_DENOISE_IMAGES
    assert validation.MAX_STEPS == limits.MAX_STEPS


@pytest.mark.parametrize("model", ["ddpm_generate", "ddpm_cond_generate"])
def test_triton_ddpm_generate_config_agrees(model):
    cfg = model_config(DDPM_GENERATE.parent / model)
    assert cfg.parameters["max_num_samples"].string_value == str(limits.MAX_DDPM_SAMPLES), (
        f"model_repository/{model}/config.pbtxt's max_num_samples must equal mnistgen.limits.MAX_DDPM_SAMPLES")
    assert "GenerateLoopModel" in (DDPM_GENERATE.parent / model / "1" / "model.py").read_text()
    source = (REPO / "serving" / "triton_backend.py").read_text()  # GenerateLoopModel
    assert "limits.MAX_DDPM_SAMPLES" in source  # its fallback when the parameter is absent
    assert validation.MODELS["ddpm-cond"].max_num_samples == limits.MAX_DDPM_SAMPLES


def test_diffusion_steps_limit_agrees():
    diffusion = pytest.importorskip("mnistgen.diffusion")  # (torch)
    assert diffusion.MAX_STEPS == limits.MAX_STEPS


def test_docs_state_the_limits():
    api = (REPO / "docs" / "api.md").read_text()
    ddpm_row = next(line for line in api.splitlines() if line.startswith("| `ddpm` |"))
    assert f"1..{limits.MAX_DDPM_SAMPLES}" in ddpm_row and f"1..{limits.MAX_STEPS}" in ddpm_row
    assert f"1..{limits.MAX_GAN_SAMPLES}" in api


def test_triton_refuses_one_more_than_the_gateway(triton):
    """The running ddpm_generate answers num_samples MAX_DDPM_SAMPLES + 1 with the same limit (before any sampling)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    triton.require("ddpm_generate")
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    batched = client.get_model_config("ddpm_generate").config.max_batch_size > 0  # then a leading row axis
    inputs = []
    for name, value, dtype in (("num_samples", np.array([limits.MAX_DDPM_SAMPLES + 1], np.int32), "INT32"),
                               ("steps", np.array([1], np.int32), "INT32"),
                               ("sampler", np.array([b"ddim"], np.object_), "BYTES"),
                               ("seed", np.array([0], np.int64), "INT64")):
        value = value.reshape(1, 1) if batched else value
        inputs.append(grpcclient.InferInput(name, list(value.shape), dtype))
        inputs[-1].set_data_from_numpy(value)
    with pytest.raises(InferenceServerException, match=rf"num_samples must be an integer in \[1, "
                                                       rf"{limits.MAX_DDPM_SAMPLES}\]"):
        client.infer("ddpm_generate", inputs, client_timeout=60)
