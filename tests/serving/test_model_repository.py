"""Every config.pbtxt (CPU repository and generated GPU variant) parses as a Triton ModelConfig and keeps the contract."""
from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from mnistgen.checkpoint import read_config
from training.export import GENERATORS, MODELS, SINGLE_SHOT, read_model_config, write_gpu_repository
from mnistgen.registry import GAN_MODELS

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
FP32, INT32, INT64, BYTES = mc.TYPE_FP32, mc.TYPE_INT32, mc.TYPE_INT64, mc.TYPE_STRING
IMG = [1, 28, 28]

# The contract the gateway codes against: model -> (max_batch_size, inputs, outputs); None dims = latent_dim.
CONTRACT = {
    "dcgan_generator": (1024, {"latent": (FP32, None)}, {"image": (FP32, IMG)}),
    "dcgan_modified": (1024, {"latent": (FP32, None)}, {"image": (FP32, IMG)}),
    "mlp_generator": (1024, {"latent": (FP32, None)}, {"image": (FP32, IMG)}),
    "ddpm_unet": (1024, {"sample": (FP32, IMG), "timestep": (INT64, [1])}, {"noise_pred": (FP32, IMG)}),
    "ddpm_denoise": (256, {"image": (FP32, IMG), "sigma": (FP32, [1]), "steps": (INT32, [1]),
                           "sampler": (BYTES, [1]), "seed": (INT64, [1])},
                     {"noisy": (FP32, IMG), "denoised": (FP32, IMG)}),
    "ddpm_generate": (0, {"num_samples": (INT32, [1]), "steps": (INT32, [1]), "sampler": (BYTES, [1]),
                          "seed": (INT64, [1])}, {"image": (FP32, [-1, 1, 28, 28])}),
}
LATENT_DIMS = {"dcgan_generator": 256, "dcgan_modified": 64, "mlp_generator": 100}  # the committed checkpoints'


def test_repository_holds_exactly_the_contract_models():
    dirs = sorted(d.name for d in MODEL_REPOSITORY.iterdir() if (d / "config.pbtxt").exists())
    assert dirs == sorted(CONTRACT) == sorted(MODELS)


@pytest.mark.parametrize("model", sorted(CONTRACT))
def test_config_parses_and_matches_contract(model):
    cfg = read_model_config(MODEL_REPOSITORY / model / "config.pbtxt")  # ParseError on any typo
    max_batch, inputs, outputs = CONTRACT[model]
    assert cfg.name == model and cfg.backend == "python" and not cfg.platform
    assert cfg.max_batch_size == max_batch
    assert cfg.HasField("dynamic_batching") == (max_batch > 0)
    assert [g.kind for g in cfg.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert all(g.count >= 1 for g in cfg.instance_group)
    got_in = {i.name: (i.data_type, list(i.dims)) for i in cfg.input}
    want_in = {k: (t, [LATENT_DIMS[model]] if d is None else d) for k, (t, d) in inputs.items()}
    assert got_in == want_in
    assert {o.name: (o.data_type, list(o.dims)) for o in cfg.output} == outputs
    assert (MODEL_REPOSITORY / model / "1" / "model.py").is_file()


@pytest.mark.parametrize("model", sorted(GENERATORS))
def test_latent_dims_match_committed_checkpoint(model):
    ckpt = REPO_ROOT / "checkpoints" / GAN_MODELS[GENERATORS[model]]
    if not ckpt.exists():
        pytest.skip(f"{ckpt} not committed yet")
    cfg = read_model_config(MODEL_REPOSITORY / model / "config.pbtxt")
    assert list(cfg.input[0].dims) == [read_config(ckpt)["arch"]["latent_dim"]]


def test_single_shot_models_share_one_model_py():
    texts = {m: (MODEL_REPOSITORY / m / "1" / "model.py").read_text() for m in SINGLE_SHOT}
    assert len(set(texts.values())) == 1, "the generic ONNX model.py copies have diverged"


def test_gpu_variant_configs_parse(tmp_path):
    written = write_gpu_repository(MODEL_REPOSITORY, tmp_path)
    assert sorted(written) == sorted(MODELS)
    for model in MODELS:
        cfg = read_model_config(tmp_path / model / "config.pbtxt")
        cpu = read_model_config(MODEL_REPOSITORY / model / "config.pbtxt")
        assert cfg.name == model and cfg.max_batch_size == cpu.max_batch_size
        assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == \
               [(i.name, i.data_type, list(i.dims)) for i in cpu.input]
        assert [g.kind for g in cfg.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        if model in SINGLE_SHOT:
            assert cfg.platform == "onnxruntime_onnx" and not cfg.backend
            (trt,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
            assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
            assert not (tmp_path / model / "1" / "model.py").exists()
        else:
            assert cfg.backend == "python" and not cfg.platform
            assert (tmp_path / model / "1" / "model.py").read_text() == \
                   (MODEL_REPOSITORY / model / "1" / "model.py").read_text()
