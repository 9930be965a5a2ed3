"""Shared code of the Triton python-backend models in model_repository/ (imported by each <model>/1/model.py).

- SingleShotModel: one ONNX Runtime session over <version>/model.onnx, every queued request in one run. It serves
  every single-shot model (the three GAN generators and ddpm_unet): input and output names come from config.pbtxt,
  so nothing here is model-specific. With the config.pbtxt parameter `runtime` = "torchscript" it runs
  <version>/model.pt (same export, PyTorch kernels) instead: on CPUs where ONNX Runtime's kernels are slower
  than PyTorch's (stride-2 ConvTranspose here).
- DiffusionLoopModel: the base of the DDPM loop models (ddpm_denoise, ddpm_generate): config, ONNX Runtime UNet as
  eps_fn (OrtEps), torch limited to the scheduler arithmetic; make_session / error_response / param / text too.
Only importable inside Triton's python-backend stub (it imports triton_python_backend_utils).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # only importable inside Triton's python-backend stub


def param(model_config: dict, key: str, default: str) -> str:
    """A `parameters { key: ... value { string_value: ... } }` entry of config.pbtxt."""
    return model_config.get("parameters", {}).get(key, {}).get("string_value", default)


def make_session(onnx_path: str, model_config: dict, instance_kind: str, device_id: int) -> ort.InferenceSession:
    """CUDA execution provider on a GPU instance when onnxruntime-gpu has it, else the CPU provider."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(param(model_config, "intra_op_threads", "0"))  # 0 = ORT picks (all cores)
    opts.inter_op_num_threads = 1
    # spinning worker threads burn the CPU they wait on: on a shared machine they slow everything down
    opts.add_session_config_entry("session.intra_op.allow_spinning", param(model_config, "allow_spinning", "1"))
    providers: list = ["CPUExecutionProvider"]
    if instance_kind == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
    return ort.InferenceSession(onnx_path, sess_options=opts, providers=providers)


RUNTIMES = ("onnxruntime", "torchscript")


class TorchScriptRunner:
    """session.run()-compatible wrapper over a traced single-input module (the generators' model.pt)."""

    def __init__(self, path: str, model_config: dict, output_names: list[str]):
        import torch

        threads = int(param(model_config, "intra_op_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        self.torch = torch
        self.module = torch.jit.load(path).eval()
        self.output_names = output_names

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self.torch.inference_mode():
            out = self.module(*[self.torch.from_numpy(v) for v in feeds.values()])
        return [out.numpy()]


def error_response(message: str, code: str = "INTERNAL") -> "pb_utils.InferenceResponse":
    """A per-request error (the model stays up); `code` names a pb_utils.TritonError code, e.g. INVALID_ARG."""
    code_value = getattr(pb_utils.TritonError, code, None)
    err = pb_utils.TritonError(message) if code_value is None else pb_utils.TritonError(message, code_value)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def instance_session(args: dict, model_config: dict) -> ort.InferenceSession:
    """make_session over <version>/model.onnx for the instance Triton is initialising."""
    version_dir = Path(args["model_repository"]) / args["model_version"]
    return make_session(str(version_dir / "model.onnx"), model_config,
                        args.get("model_instance_kind", "CPU"), int(args.get("model_instance_device_id", 0) or 0))


class OrtEps:
    """eps_fn(x (B, 1, 28, 28), t (B,) int64) -> noise_pred (B, 1, 28, 28), running the exported UNet in ORT."""

    def __init__(self, session: ort.InferenceSession):
        from mnistgen import diffusion

        self.session = session
        meta = session.get_modelmeta().custom_metadata_map
        # the training noise schedule, recorded in the ONNX file by training.export
        self.scheduler_config = json.loads(meta["scheduler"]) if "scheduler" in meta else dict(diffusion.DEFAULT_SCHEDULER)

    def __call__(self, x, t):
        import torch

        feeds = {"sample": np.ascontiguousarray(x.detach().numpy(), dtype=np.float32),  # (B, 1, 28, 28)
                 "timestep": np.ascontiguousarray(t.numpy(), dtype=np.int64)}  # (B,)
        return torch.from_numpy(self.session.run(["noise_pred"], feeds)[0])  # (B, 1, 28, 28)


SEED_MAX = 2**63 - 1  # seeds are int64 >= 0


def text(value) -> str:
    """A TYPE_STRING element (bytes from Triton) as str; undecodable bytes become U+FFFD, never an exception."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class DiffusionLoopModel:
    """Base of the python-backend models that run a whole DDPM sampling loop in-process (no per-step round trips)."""

    def initialize(self, args: dict) -> None:
        import torch

        torch.set_num_threads(1)  # the UNet runs in ONNX Runtime; torch only does the scheduler arithmetic
        self.model_config = json.loads(args["model_config"])
        self.eps = OrtEps(instance_session(args, self.model_config))

    def finalize(self) -> None:
        self.eps = None


class SingleShotModel:
    """Any single-shot ONNX model: names from config.pbtxt, dynamic batching (concatenate, run once, split)."""

    def initialize(self, args: dict) -> None:
        self.model_config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.input_names = [i["name"] for i in self.model_config["input"]]
        self.output_names = [o["name"] for o in self.model_config["output"]]
        self.session = instance_session(args, self.model_config)  # also for the name checks below
        runtime = param(self.model_config, "runtime", "onnxruntime")
        if runtime not in RUNTIMES:
            raise pb_utils.TritonModelException(f"parameter runtime must be one of {RUNTIMES}, got {runtime!r}")
        # per-row shape the ONNX graph expects, e.g. timestep: () for (B,) while Triton sends (B, 1)
        self.row_shapes = {i.name: tuple(i.shape[1:]) for i in self.session.get_inputs()}
        onnx_inputs = sorted(self.row_shapes)
        onnx_outputs = sorted(o.name for o in self.session.get_outputs())
        if onnx_inputs != sorted(self.input_names) or onnx_outputs != sorted(self.output_names):
            raise pb_utils.TritonModelException(
                f"{version_dir / 'model.onnx'} has inputs {onnx_inputs} / outputs {onnx_outputs}, but "
                f"config.pbtxt declares {self.input_names} / {self.output_names}: re-run training.export"
            )
        if runtime == "torchscript":
            self.session = TorchScriptRunner(str(version_dir / "model.pt"), self.model_config, self.output_names)

    def execute(self, requests: list) -> list:
        # concatenate every queued request along the batch axis, run once, split back
        feeds: dict[str, list[np.ndarray]] = {name: [] for name in self.input_names}
        sizes: list[int] = []
        for request in requests:
            for name in self.input_names:
                feeds[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(feeds[self.input_names[0]][-1].shape[0])
        try:
            batch = {name: np.concatenate(parts, axis=0).reshape(-1, *self.row_shapes[name])  # (sum B, ...)
                     for name, parts in feeds.items()}
            outputs = self.session.run(self.output_names, batch)
        except Exception as e:  # a failed run answers every request with the error; the model stays up
            return [error_response(f"onnxruntime failed: {e}") for _ in requests]
        responses, start = [], 0
        for n in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + n]))
                       for name, out in zip(self.output_names, outputs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses

    def finalize(self) -> None:
        self.session = None
