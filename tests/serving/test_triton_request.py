"""The gateway's ModelInfer requests (serving/gateway/triton_client.py builds them straight from numpy, without
tritonclient's InferInput objects) are byte for byte what tritonclient would send."""
from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import InferInput, InferRequestedOutput, _utils

from serving.gateway.triton_client import infer_request, tensor


def tritonclient_request(model: str, arrays: list[tuple[str, np.ndarray, str]], outputs: list[str]):
    inputs = []
    for name, a, dtype in arrays:
        i = InferInput(name, list(a.shape), dtype)
        i.set_data_from_numpy(a)
        inputs.append(i)
    return _utils._get_inference_request(
        model_name=model, inputs=inputs, model_version="", request_id="",
        outputs=[InferRequestedOutput(o) for o in outputs], sequence_id=0, sequence_start=False, sequence_end=False,
        priority=0, timeout=None, parameters=None)


def test_request_matches_tritonclient():
    k = 3
    arrays = [("image", np.random.default_rng(0).standard_normal((k, 1, 28, 28), dtype=np.float32), "FP32"),
              ("sigma", np.full((k, 1), 0.5, np.float32), "FP32"),
              ("steps", np.full((k, 1), 20, np.int32), "INT32"),
              ("sampler", np.full((k, 1), b"dpm-solver++", np.object_), "BYTES"),
              ("seed", np.arange(k, dtype=np.int64).reshape(k, 1), "INT64")]
    ours = infer_request("ddpm_denoise", [tensor(*a) for a in arrays], ["noisy", "denoised"])
    theirs = tritonclient_request("ddpm_denoise", arrays, ["noisy", "denoised"])
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    # a tritonclient InferInput is taken as well
    mixed = infer_request("ddpm_denoise", [tensor(*arrays[0])] + list(_inputs(arrays[1:])), ["noisy", "denoised"])
    assert mixed.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)


def _inputs(arrays):
    for name, a, dtype in arrays:
        i = InferInput(name, list(a.shape), dtype)
        i.set_data_from_numpy(a)
        yield i


def test_non_contiguous_input_and_wrong_dtype():
    z = np.arange(2 * 512, dtype=np.float32).reshape(2, 512)[:, ::2]  # (2, 256), not contiguous
    req = infer_request("dcgan_generator", [tensor("latent", z, "FP32")], ["image"])
    assert req.raw_input_contents[0] == np.ascontiguousarray(z).tobytes() and list(req.inputs[0].shape) == [2, 256]
    with pytest.raises(TypeError, match="FP32 needs float32, got float64"):
        infer_request("dcgan_generator", [tensor("latent", z.astype(np.float64), "FP32")], ["image"])
