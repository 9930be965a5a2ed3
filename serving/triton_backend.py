"""Shared code of the Triton python-backend models in model_repository/ (imported by each <model>/1/model.py).

- SingleShotModel: every single-shot model (the three GAN generators and ddpm_unet), every queued request in one
  run; input and output names come from config.pbtxt, so nothing here is model-specific.
- Engines: which engine runs a batch (mnistgen.engine). ONNX Runtime on <version>/model.onnx below a batch-size
  threshold, TorchScript on <version>/model.pt (frozen, optimize_for_inference, oneDNN) at and above it. The threshold
  is measured (export writes <version>/engines.json; a missing or foreign record is re-measured here at the first
  start) and can be overridden in config.pbtxt:
      runtime           auto (default: per batch size) | onnxruntime | torchscript (one engine at every batch)
      engine_threshold  auto (default: engines.json) | none (ONNX Runtime only) | N (TorchScript from batch N)
      intra_op_threads  0 / absent = the cores this process may use (affinity, cgroup quota); N = N threads
      allow_spinning    ONNX Runtime worker threads spin while idle ("0" on shared machines)
  TorchScript is warmed up at initialize at the batch sizes it will get, so first requests are not slow.
- DiffusionLoopModel: the base of the DDPM loop models (ddpm_denoise, ddpm_generate): config, the UNet as eps_fn
  (same engine choice, per group batch size), stop checks for cancelled requests (request.is_cancelled(), which
  Triton sets when the gRPC client cancels or its deadline passes).
Only importable inside Triton's python-backend stub (it imports triton_python_backend_utils).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # only importable inside Triton's python-backend stub

from mnistgen import engine as eng

eng.set_torch_env()  # OMP_WAIT_POLICY=PASSIVE unless set: model.py files import this module before torch

SEED_MAX = 2**63 - 1  # seeds are int64 >= 0
MEASURE_MAX_BATCH = 256  # start-time measurement and warm-up stay below this (the UNet at 1024 rows is seconds)


def param(model_config: dict, key: str, default: str) -> str:
    """A `parameters { key: ... value { string_value: ... } }` entry of config.pbtxt."""
    return model_config.get("parameters", {}).get(key, {}).get("string_value", default)


def instance_threads(model_config: dict) -> int:
    """intra_op_threads: "0" / absent = the cores this process may use (affinity, cgroup quota)."""
    return eng.resolve_threads(param(model_config, "intra_op_threads", "0"))


def log(level: str, message: str) -> None:
    """Into Triton's log (pb_utils.Logger), falling back to stdout outside a stub that has it."""
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        getattr(logger, f"log_{level}")(message)
    else:
        print(message, flush=True)


def make_session(onnx_path: str, model_config: dict, instance_kind: str, device_id: int):
    """CUDA execution provider on a GPU instance when onnxruntime-gpu has it, else the CPU provider."""
    import onnxruntime as ort

    providers: list = ["CPUExecutionProvider"]
    if instance_kind == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
    return eng.ort_session(onnx_path, instance_threads(model_config), param(model_config, "allow_spinning", "0"),
                           providers)


def error_response(message: str, code: str = "INTERNAL") -> "pb_utils.InferenceResponse":
    """A per-request error (the model stays up); `code` names a pb_utils.TritonError code, e.g. INVALID_ARG."""
    code_value = getattr(pb_utils.TritonError, code, None)
    err = pb_utils.TritonError(message) if code_value is None else pb_utils.TritonError(message, code_value)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def is_cancelled(request) -> bool:
    """Triton marks a request cancelled when its gRPC client cancels it or the client's deadline passes."""
    try:
        return bool(request.is_cancelled())
    except Exception:  # an older stub without request cancellation
        return False


def cancelled_response(what: str = "") -> "pb_utils.InferenceResponse":
    return error_response(f"request cancelled (client cancelled or its deadline passed){what}", "CANCELLED")


class Engines:
    """ONNX Runtime (always loaded: it also answers the name checks) and TorchScript (only when some batch size
    will use it) for one model version; `runner(batch)` picks, `run(feeds)` runs."""

    def __init__(self, args: dict, model_config: dict, max_batch: int, measure_batches: tuple[int, ...]):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.name = model_config.get("name", version_dir.parent.name)
        self.allow_spinning = param(model_config, "allow_spinning", "0")
        kind = args.get("model_instance_kind", "CPU")
        self.threads = instance_threads(model_config)
        self.session = make_session(str(version_dir / "model.onnx"), model_config, kind,
                                    int(args.get("model_instance_device_id", 0) or 0))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ort = eng.OrtRunner(self.session, self.output_names)
        meta = self.session.get_modelmeta().custom_metadata_map
        runtime = param(model_config, "runtime", "auto")
        override = param(model_config, "engine_threshold", "auto")
        ts_path = version_dir / "model.pt"
        engines_path = version_dir / eng.ENGINES_FILE
        self.record = eng.read_record(engines_path)
        on_gpu = "CUDAExecutionProvider" in self.session.get_providers()
        if on_gpu:  # TorchScript here is the CPU build
            runtime = eng.ORT
        if (runtime == "auto" and not eng.parse_threshold(override)[0] and ts_path.exists()
                and not eng.record_matches(self.record, meta.get("checkpoint_sha256", ""), self.threads)):
            self.record = self._measure(version_dir, ts_path, meta, measure_batches, engines_path)
        self.threshold, self.source = eng.effective_threshold(runtime, override, self.record)
        self.ts = None
        if self.threshold is not None:
            if not ts_path.exists():
                raise pb_utils.TritonModelException(
                    f"{self.name}: TorchScript from batch {self.threshold} ({self.source}) but {ts_path} is missing: "
                    "re-run `python -m training.export --force`")
            import torch

            torch.set_num_threads(self.threads)
            self.ts = eng.TorchScriptRunner(eng.load_torchscript(ts_path), self.input_names)
            self._warm_up(min(max_batch, MEASURE_MAX_BATCH))
        log("info", f"{self.name}: engines {self.describe()}")

    def _measure(self, version_dir: Path, ts_path: Path, meta: dict, batches: tuple[int, ...], path: Path) -> dict:
        with eng.measuring_lock():  # models load in parallel: measure one at a time
            record = eng.read_record(path)  # another instance may have measured meanwhile
            if eng.record_matches(record, meta.get("checkpoint_sha256", ""), self.threads):
                return record
            log("info", f"{self.name}: no engines.json for this machine / {self.threads} threads: measuring")
            record = eng.measure_engines(
                version_dir / "model.onnx", ts_path, tuple(b for b in batches if b <= MEASURE_MAX_BATCH),
                self.threads, self.allow_spinning, budget_s=0.5, measured_by="triton-initialize",
                checkpoint_sha256=meta.get("checkpoint_sha256", ""))
            if not eng.write_record(path, record):
                log("warn", f"{self.name}: {path} is not writable; the measurement is used but not kept")
            return record

    def _warm_up(self, max_batch: int) -> None:
        for b in eng.warmup_batches(self.threshold, max_batch):
            feeds = eng.random_feeds(self.session, b)
            for _ in range(3):
                self.ts(feeds)

    def describe(self) -> str:
        s = eng.summary(self.record, self.threshold, self.source)
        if self.threshold is None:
            how = "onnxruntime at every batch size"
        elif self.threshold <= 1:
            how = "torchscript at every batch size"
        else:
            how = f"onnxruntime below batch {self.threshold}, torchscript from {self.threshold}"
        return f"{how} ({s['source']}; {self.threads} threads; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})"

    def runner(self, batch: int):
        return self.ts if self.threshold is not None and batch >= self.threshold else self.ort

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner(next(iter(feeds.values())).shape[0])(feeds)


class EngineEps:
    """eps_fn(x (B, 1, 28, 28), t (B,) int64) -> noise_pred (B, 1, 28, 28): the UNet on the engine for batch B."""

    def __init__(self, engines: Engines):
        from mnistgen import diffusion

        self.engines = engines
        meta = engines.session.get_modelmeta().custom_metadata_map
        # the training noise schedule, recorded in the ONNX file by training.export
        self.scheduler_config = (json.loads(meta["scheduler"]) if "scheduler" in meta
                                 else dict(diffusion.DEFAULT_SCHEDULER))

    def __call__(self, x, t):
        import torch

        runner = self.engines.runner(x.shape[0])
        if runner is self.engines.ts:  # torch in, torch out
            with torch.inference_mode():
                return runner.module(x.contiguous(), t)
        feeds = {"sample": np.ascontiguousarray(x.detach().numpy(), dtype=np.float32),  # (B, 1, 28, 28)
                 "timestep": np.ascontiguousarray(t.numpy(), dtype=np.int64)}  # (B,)
        return torch.from_numpy(runner(feeds)[0])  # (B, 1, 28, 28)


def text(value) -> str:
    """A TYPE_STRING element (bytes from Triton) as str; undecodable bytes become U+FFFD, never an exception."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class StopWhenAllCancelled:
    """should_stop for a batch shared by several requests: True once every one of them is cancelled (a group keeps
    running for the requests still waiting; the cancelled ones get CANCELLED responses when it ends)."""

    def __init__(self, requests: list):
        self.pending = list(requests)

    def __call__(self) -> bool:
        self.pending = [r for r in self.pending if not is_cancelled(r)]
        return not self.pending


class DiffusionLoopModel:
    """Base of the python-backend models that run a whole DDPM sampling loop in-process (no per-step round trips)."""

    def initialize(self, args: dict) -> None:
        import torch

        self.model_config = json.loads(args["model_config"])
        self.engines = Engines(args, self.model_config, max_batch=eng.UNET_BATCHES[-1],
                               measure_batches=eng.UNET_BATCHES)
        # with ONNX Runtime alone torch only does the scheduler arithmetic: one thread, no fight with ORT's pool
        torch.set_num_threads(self.engines.threads if self.engines.ts is not None else 1)
        self.eps = EngineEps(self.engines)

    def finalize(self) -> None:
        self.eps = self.engines = None


class SingleShotModel:
    """Any single-shot model: names from config.pbtxt, dynamic batching (concatenate, run once, split)."""

    def initialize(self, args: dict) -> None:
        self.model_config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.input_names = [i["name"] for i in self.model_config["input"]]
        self.output_names = [o["name"] for o in self.model_config["output"]]
        self.engines = Engines(args, self.model_config, max_batch=int(self.model_config.get("max_batch_size", 1)),
                               measure_batches=eng.GENERATOR_BATCHES if "latent" in self.input_names
                               else eng.UNET_BATCHES)
        session = self.engines.session
        # per-row shape the ONNX graph expects, e.g. timestep: () for (B,) while Triton sends (B, 1)
        self.row_shapes = {i.name: tuple(i.shape[1:]) for i in session.get_inputs()}
        onnx_inputs = sorted(self.row_shapes)
        onnx_outputs = sorted(o.name for o in session.get_outputs())
        if onnx_inputs != sorted(self.input_names) or onnx_outputs != sorted(self.output_names):
            raise pb_utils.TritonModelException(
                f"{version_dir / 'model.onnx'} has inputs {onnx_inputs} / outputs {onnx_outputs}, but "
                f"config.pbtxt declares {self.input_names} / {self.output_names}: re-run training.export"
            )

    def execute(self, requests: list) -> list:
        # concatenate every queued request along the batch axis, run once, split back
        feeds: dict[str, list[np.ndarray]] = {name: [] for name in self.input_names}
        sizes: list[int] = []
        for request in requests:
            for name in self.input_names:
                feeds[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(feeds[self.input_names[0]][-1].shape[0])
        runner = self.engines.runner(sum(sizes))
        try:
            batch = {name: np.concatenate(parts, axis=0).reshape(-1, *self.row_shapes[name])  # (sum B, ...)
                     for name, parts in feeds.items()}
            by_name = dict(zip(self.engines.output_names, runner(batch)))
            outputs = [by_name[name] for name in self.output_names]
        except Exception as e:  # a failed run answers every request with the error; the model stays up
            return [error_response(f"{runner.engine} failed: {e}") for _ in requests]
        responses, start = [], 0
        for n in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + n]))
                       for name, out in zip(self.output_names, outputs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses

    def finalize(self) -> None:
        self.engines = None
