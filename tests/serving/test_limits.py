"""One source for the request limits: mnistgen.catalog.check_request, run by the gateway and by the Triton models.

The gateway once refused ddpm num_samples over 64 while Triton's ddpm_generate took up to 256, and later the limit was
repeated as a config.pbtxt parameter; now the Triton loop models look their catalog entry up by their own name and
answer a bad row with check_request's own message.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnistgen import catalog
from training.export import read_model_config

REPO = Path(__file__).resolve().parents[2]
LOOPS = [m for m in catalog.MODELS if m.kind != catalog.GAN and m.rpc != catalog.INTERNAL]


@pytest.mark.parametrize("model", [m.triton for m in LOOPS])
def test_triton_loop_configs_repeat_no_limit(model):
    cfg = read_model_config(REPO / "model_repository" / model / "config.pbtxt")
    # no max_num_samples: the catalog entry (catalog.BY_TRITON[name]) has it; only compute isolation's parameters
    assert set(cfg.parameters) <= {"nice", "threads"}
    assert "LoopModel as TritonPythonModel" in (REPO / "model_repository" / model / "1" / "model.py").read_text()


def test_diffusion_steps_limit_agrees():
    diffusion = pytest.importorskip("mnistgen.diffusion")  # (torch)
    assert diffusion.MAX_STEPS == catalog.MAX_STEPS


def test_docs_state_the_limits():
    api = (REPO / "docs" / "api.md").read_text()
    for m in catalog.MODELS:
        if m.rpc != catalog.INTERNAL:
            row = next(line for line in api.splitlines() if line.startswith(f"| `{m.name}`") and f"| {m.rpc} |" in line)
            assert f"1..{m.max_samples}" in row, row


def test_triton_refuses_one_more_than_the_catalog_allows_with_its_message(triton):
    """The running ddpm_generate answers num_samples max_samples + 1 with check_request's message (before any
    sampling), and a good row of the same request shape still runs."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    entry = catalog.GENERATORS["ddpm"]
    triton.require(entry.triton)
    client = grpcclient.InferenceServerClient(triton.grpc_url)

    def request(n: int) -> list:
        inputs = []
        for name, value, dtype in (("num_samples", np.array([[n]], np.int32), "INT32"),
                                   ("steps", np.array([[1]], np.int32), "INT32"),
                                   ("sampler", np.array([[b"ddim"]], np.object_), "BYTES"),
                                   ("seed", np.array([[0]], np.int64), "INT64")):
            inputs.append(grpcclient.InferInput(name, list(value.shape), dtype))
            inputs[-1].set_data_from_numpy(value)
        return inputs

    with pytest.raises(catalog.LimitError) as want:
        catalog.check_request(entry, entry.max_samples + 1, 1, "ddim", 0)
    with pytest.raises(InferenceServerException) as got:
        client.infer(entry.triton, request(entry.max_samples + 1), client_timeout=60)
    assert str(want.value) in str(got.value)
    assert client.infer(entry.triton, request(1), client_timeout=60).as_numpy("image").shape == (1, 1, 1, 28, 28)
