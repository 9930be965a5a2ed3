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
      ort_parallel      auto (default: engines.json `ort_split_from`) | split (from batch 2: the batch in N chunks on N
                        one-thread ONNX Runtime sessions side by side) | intra-op (one session, N intra-op threads)
      allow_spinning    ONNX Runtime worker threads spin while idle ("0" on shared machines)
      precision         of the TorchScript engine: auto (default: engines.json `torchscript_precision`, bf16 where
                        <version>/model_bf16.pt was measured faster than fp32 and within tolerance) | fp32 | bf16
  TorchScript is warmed up at initialize at the batch sizes it will get, so first requests are not slow.
- DiffusionLoopModel: the base of the DDPM loop models (ddpm_denoise, ddpm_generate, ddpm_cond_generate): config,
  the UNet as eps_fn (same engine choice, per group batch size), stop checks for cancelled requests
  (request.is_cancelled(), which Triton sets when the gRPC client cancels or its deadline passes).
- GenerateLoopModel: ddpm_generate and ddpm_cond_generate (class-conditional, classifier-free guidance), whole.
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


def request_ids(requests: list) -> str:
    """The requests' ids for a log line ("ids a, b"; the gateway sends its request id as Triton's), "" when none."""
    ids = []
    for r in requests:
        try:
            rid = r.request_id()
        except Exception:  # noqa: BLE001  (a stub without it)
            rid = ""
        if rid:
            ids.append(text(rid))
    return f" (request ids {', '.join(ids)})" if ids else ""


def log(level: str, message: str) -> None:
    """Into Triton's log (pb_utils.Logger), falling back to stdout outside a stub that has it."""
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        getattr(logger, f"log_{level}")(message)
    else:
        print(message, flush=True)


class EngineUsage:
    """Rows and runs per engine as Prometheus counters on Triton's metrics endpoint (:8002):
        mnistgen_engine_rows_total{model, version, engine}  rows each engine ran (DDPM loops: rows x UNet evaluations)
        mnistgen_engine_runs_total{model, version, engine}  engine calls
    engine: onnxruntime | onnxruntime-1thread | onnxruntime-split | torchscript | torchscript-bf16. Counted in memory
    and flushed to Triton at most every FLUSH_S seconds, at a run (each increment is a round trip from the stub to
    Triton: not once per UNet step), so the counters trail the traffic by up to FLUSH_S (and an idle model's last
    FLUSH_S of counts shows at its next run). A Triton without the custom
    metrics API, or one that refuses the families, leaves the model serving without them (logged)."""

    ROWS, RUNS = "mnistgen_engine_rows_total", "mnistgen_engine_runs_total"
    FLUSH_S = 1.0

    def __init__(self, model: str, version: str):
        import time

        self.clock, self.labels = time.monotonic, {"model": model, "version": str(version)}
        self.pending: dict[str, list[int]] = {}  # engine -> [rows, runs] not yet sent
        self.metrics: dict[str, tuple] = {}
        self.last_flush = self.clock()
        try:
            counter = pb_utils.MetricFamily.COUNTER
            self.families = (
                pb_utils.MetricFamily(name=self.ROWS, description="Rows each engine ran (samples; in the DDPM loops "
                                      "samples x UNet evaluations)", kind=counter),
                pb_utils.MetricFamily(name=self.RUNS, description="Engine calls", kind=counter))
        except Exception as e:  # noqa: BLE001  (AttributeError on an old stub, TritonModelException on a refusal)
            log("warn", f"{model}: engine usage metrics unavailable ({e})")
            self.families = None

    def count(self, engine: str, rows: int) -> None:
        c = self.pending.setdefault(engine, [0, 0])
        c[0] += rows
        c[1] += 1
        if self.families is not None and self.clock() - self.last_flush >= self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        self.last_flush = self.clock()
        for engine, (rows, runs) in self.pending.items():
            if engine not in self.metrics:
                labels = {**self.labels, "engine": engine}
                self.metrics[engine] = tuple(f.Metric(labels=labels) for f in self.families)
            self.metrics[engine][0].increment(rows)
            self.metrics[engine][1].increment(runs)
        self.pending = {}


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
        ts_path, bf16_path = version_dir / "model.pt", version_dir / eng.BF16_FILE
        engines_path = version_dir / eng.ENGINES_FILE
        self.record = eng.read_record(engines_path)
        on_gpu = "CUDAExecutionProvider" in self.session.get_providers()
        if on_gpu:  # TorchScript here is the CPU build
            runtime = eng.ORT
        if (runtime == "auto" and not eng.parse_threshold(override)[0] and ts_path.exists()
                and not eng.record_matches(self.record, meta.get("checkpoint_sha256", ""), self.threads,
                                           bf16_path.exists())):
            self.record = self._measure(version_dir, ts_path, bf16_path, meta, measure_batches, engines_path)
        # TorchScript in bf16 (model_bf16.pt) where engines.json measured it faster and within tolerance
        self.precision = eng.effective_precision(param(model_config, "precision", "auto"), self.record,
                                                 bf16_path.exists())
        self.threshold, self.source = eng.effective_threshold(runtime, override, self.record, self.precision)
        # ONNX Runtime with one thread below the measured batch size (engines.json ort_multithread_from), with all of
        # the instance's threads from it on: the batch split over one-thread sessions, or one session's intra-op pool
        self.multithread_from = 1 if on_gpu else eng.effective_multithread_from(self.record, self.threads,
                                                                                 self.threshold)
        self.split_from = None if on_gpu else eng.effective_split_from(
            self.record, self.threads, param(model_config, "ort_parallel", "auto"))
        self.split = (eng.split_runner(str(version_dir / "model.onnx"), self.threads, self.output_names,
                                       self.allow_spinning) if self.split_from is not None else None)
        self.ort1 = None
        if self.multithread_from != 1:  # the split's first session is a one-thread session already
            one_thread = (self.split.sessions[0] if self.split is not None
                          else eng.ort_session(str(version_dir / "model.onnx"), 1, self.allow_spinning))
            self.ort1 = eng.OrtRunner(one_thread, self.output_names)
        self.ts = None
        if self.threshold is not None:
            if not ts_path.exists():
                raise pb_utils.TritonModelException(
                    f"{self.name}: TorchScript from batch {self.threshold} ({self.source}) but {ts_path} is missing: "
                    "re-run `python -m training.export --force`")
            import torch

            torch.set_num_threads(self.threads)
            self.ts = eng.TorchScriptRunner(eng.load_torchscript(bf16_path if self.precision == eng.BF16 else ts_path),
                                            self.input_names)
            self._warm_up(min(max_batch, MEASURE_MAX_BATCH))
        log("info", f"{self.name}: engines {self.describe()}")
        self.usage = EngineUsage(self.name, args["model_version"])

    def _measure(self, version_dir: Path, ts_path: Path, bf16_path: Path, meta: dict, batches: tuple[int, ...],
                 path: Path) -> dict:
        with eng.measuring_lock():  # models load in parallel: measure one at a time
            record = eng.read_record(path)  # another instance may have measured meanwhile
            if eng.record_matches(record, meta.get("checkpoint_sha256", ""), self.threads, bf16_path.exists()):
                return record
            log("info", f"{self.name}: no engines.json for this machine / {self.threads} threads: measuring")
            record = eng.measure_engines(
                version_dir / "model.onnx", ts_path, tuple(b for b in batches if b <= MEASURE_MAX_BATCH),
                self.threads, self.allow_spinning, budget_s=0.5, bf16_path=bf16_path, measured_by="triton-initialize",
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
        return (eng.describe(self.threshold, source=self.source, threads=self.threads,
                             multithread_from=self.multithread_from, split_from=self.split_from,
                             precision=self.precision)
                + f" OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")

    def runner(self, batch: int, torchscript: bool | None = None):
        """The runner for `batch` rows (counted in self.usage): TorchScript or the ONNX Runtime variant for `batch` as
        `torchscript` says; None = as the threshold says."""
        if torchscript is None:
            torchscript = self.threshold is not None and batch >= self.threshold
        which = eng.TORCHSCRIPT if torchscript else eng.engine_for(batch, None, self.multithread_from, self.split_from)
        self.usage.count(eng.TORCHSCRIPT_BF16 if which == eng.TORCHSCRIPT and self.precision == eng.BF16 else which,
                         batch)
        return {eng.TORCHSCRIPT: self.ts, eng.ORT_1T: self.ort1, eng.ORT_SPLIT: self.split}.get(which, self.ort)

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

    def __call__(self, x, t, labels=None):
        """`labels` (B,) int64: class labels, for a class-conditional UNet (its ONNX input `class_labels`)."""
        import torch

        runner = self.engines.runner(x.shape[0])
        if runner is self.engines.ts:  # torch in, torch out
            with torch.inference_mode():
                return runner.module(x.contiguous(), t) if labels is None else runner.module(x.contiguous(), t, labels)
        feeds = {"sample": np.ascontiguousarray(x.detach().numpy(), dtype=np.float32),  # (B, 1, 28, 28)
                 "timestep": np.ascontiguousarray(t.numpy(), dtype=np.int64)}  # (B,)
        if labels is not None:
            feeds["class_labels"] = np.ascontiguousarray(labels.numpy(), dtype=np.int64)  # (B,)
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
        """Every queued request's rows concatenated and run at once, split back; except that each request runs on the
        engine its OWN row count selects (mnistgen.engine.request_groups): rows below the TorchScript threshold on ONNX
        Runtime together, rows of requests at or above it on TorchScript together. So a request's images depend on
        its seed and size only, never on what it was batched with (TorchScript in bf16 differs from ONNX Runtime fp32
        by bf16 rounding; each engine alone gives a row the same result in any batch)."""
        feeds: list[dict[str, np.ndarray]] = []
        for request in requests:
            feeds.append({name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                          for name in self.input_names})
        sizes = [f[self.input_names[0]].shape[0] for f in feeds]
        outputs: list[list[np.ndarray] | None] = [None] * len(requests)
        errors: dict[int, str] = {}
        for members, on_ts in eng.request_groups(sizes, self.engines.threshold):
            runner = self.engines.runner(sum(sizes[i] for i in members), torchscript=on_ts)
            try:
                batch = {name: np.concatenate([feeds[i][name] for i in members], axis=0).reshape(
                    -1, *self.row_shapes[name]) for name in self.input_names}  # (sum B, ...)
                by_name = dict(zip(self.engines.output_names, runner(batch)))
            except Exception as e:  # a failed run answers its requests with the error; the model stays up
                errors.update({i: f"{runner.engine} failed: {e}" for i in members})
                log("error", f"{self.model_config.get('name', 'model')}: {runner.engine} failed on {len(members)} "
                             f"request(s){request_ids([requests[i] for i in members])}: {e}")
                continue
            start = 0
            for i in members:
                outputs[i] = [by_name[name][start:start + sizes[i]] for name in self.output_names]
                start += sizes[i]
        return [error_response(errors[i]) if i in errors else pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(out)) for name, out in zip(self.output_names, outputs[i])])
                for i in range(len(requests))]

    def finalize(self) -> None:
        self.engines = None


class GenerateLoopModel(DiffusionLoopModel):
    """DDPM sampling from x_T ~ N(0, I), the whole loop in-process: ddpm_generate and (class-conditional, with
    classifier-free guidance) ddpm_cond_generate.

    Requests are rows of (num_samples, steps, sampler, seed[, digit, guidance]); Triton's dynamic batcher hands over
    every queued request at once. Rows are validated (a bad request gets its own INVALID_ARG error naming the field,
    the others still run), grouped by (steps, sampler), and each group runs as one batched sampling loop
    (mnistgen.diffusion.generate with per-item seeds, and per-item digit and guidance: a conditional group mixes
    digits and scales freely, its labelled and null passes batched into one UNet call per step). Sample i of a row is
    seeded with seed + i, exactly as diffusion.generate(n, seed=seed) seeds it, so a row's images do not depend on
    what they were batched with. digit -1 = any digit (the null class: unconditional sampling).

    Cancellation: the loop asks before every UNet evaluation whether the group's requests are still wanted
    (request.is_cancelled(): the gRPC client cancelled or its deadline passed); when none is, it stops there and they
    get CANCELLED. A group also serving live requests runs on; its cancelled requests get CANCELLED at the end.
    Output `image`: (rows, num_samples, 1, 28, 28) per request (every row of one request asks for the same
    num_samples).
    """

    def initialize(self, args: dict) -> None:
        from mnistgen import limits

        super().initialize(args)
        self.max_num_samples = int(param(self.model_config, "max_num_samples", str(limits.MAX_DDPM_SAMPLES)))
        self.loop_batch = int(param(self.model_config, "max_loop_batch", "256"))  # images per batched loop
        self.batched = int(self.model_config.get("max_batch_size", 0)) > 0  # image gets the leading row axis
        self.conditional = "class_labels" in self.engines.input_names  # the UNet takes a digit
        self.null = limits.DIGITS  # the UNet's "no digit" class
        self.max_guidance = limits.MAX_GUIDANCE

    def _parse(self, request) -> tuple[list[tuple], str | None]:
        """[(num_samples, steps, sampler, seed, digit, guidance)] per row, or an error naming the field and range."""
        from mnistgen import diffusion

        get = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)  # noqa: E731
        names = ["num_samples", "steps", "sampler", "seed"] + (["digit", "guidance"] if self.conditional else [])
        cols = [get(name) for name in names]
        if len({len(c) for c in cols}) != 1 or len(cols[0]) == 0:
            return [], f"{', '.join(names)} must hold one value per row"
        if not self.conditional:
            cols += [np.full(len(cols[0]), -1), np.ones(len(cols[0]))]
        rows = [(int(n), int(steps), text(sampler), int(seed), int(digit), float(w))
                for n, steps, sampler, seed, digit, w in zip(*cols)]
        for n, steps, sampler, seed, digit, w in rows:
            if not 1 <= n <= self.max_num_samples:
                return rows, f"num_samples must be an integer in [1, {self.max_num_samples}], got {n}"
            if not 1 <= steps <= diffusion.MAX_STEPS:
                return rows, f"steps must be an integer in [1, {diffusion.MAX_STEPS}], got {steps}"
            if sampler not in diffusion.SAMPLERS:
                return rows, f"sampler must be one of {list(diffusion.SAMPLERS)}, got {sampler!r}"
            if not 0 <= seed <= SEED_MAX:
                return rows, f"seed must be an integer in [0, {SEED_MAX}], got {seed}"
            if not -1 <= digit < self.null:
                return rows, f"digit must be an integer in [0, {self.null - 1}] or -1 (any digit), got {digit}"
            if not (np.isfinite(w) and 0.0 <= w <= self.max_guidance):
                return rows, f"guidance must be a number in [0, {self.max_guidance:g}], got {w}"
        if len({r[0] for r in rows}) != 1:
            return rows, f"every row of one request must ask for the same num_samples, got {[r[0] for r in rows]}"
        return rows, None

    def _sample(self, members: list[tuple], steps: int, sampler: str, stop) -> "torch.Tensor":
        """One batched loop for a group's rows [(request, row, n, seed, digit, guidance)] -> (sum n, 1, 28, 28)."""
        import torch

        from mnistgen import diffusion

        seeds = [seed + i for _, _, n, seed, _, _ in members for i in range(n)]  # sample i of a row: seed + i
        cond = {}
        if self.conditional:
            cond = {"labels": [d if d >= 0 else self.null for _, _, n, _, d, _ in members for _ in range(n)],
                    "guidance": [w for _, _, n, _, _, w in members for _ in range(n)], "null": self.null}
        with torch.inference_mode():
            return diffusion.generate(self.eps, len(seeds), sampler, steps, seeds=seeds, batch_size=self.loop_batch,
                                      scheduler_config=self.eps.scheduler_config, should_stop=stop, **cond)

    def execute(self, requests: list) -> list:
        from mnistgen import diffusion

        name = self.model_config.get("name", "ddpm_generate")
        responses: list = [None] * len(requests)
        images: dict[int, list] = {}  # request -> per-row (n, 1, 28, 28), filled group by group
        groups: dict[tuple[int, str], list[tuple]] = {}  # (steps, sampler) -> [(r, row, n, seed, digit, guidance)]
        for r, request in enumerate(requests):
            try:
                rows, error = self._parse(request)
            except Exception as e:  # malformed tensors: answer this request, keep the model up
                rows, error = [], f"bad request: {e}"
            if error is not None:
                responses[r] = error_response(error, "INVALID_ARG")
                continue
            images[r] = [None] * len(rows)
            for j, (n, steps, sampler, seed, digit, w) in enumerate(rows):
                groups.setdefault((steps, sampler), []).append((r, j, n, seed, digit, w))

        for (steps, sampler), members in groups.items():
            rs = sorted({m[0] for m in members})
            if all(responses[r] is not None for r in rs):
                continue
            try:
                x = self._sample(members, steps, sampler, StopWhenAllCancelled([requests[r] for r in rs]))
            except diffusion.SamplingStopped as e:
                samples = sum(m[2] for m in members)
                log("info", f"{name}: {len(rs)} request(s) cancelled ({samples} samples, {sampler}-{steps}): "
                            f"stopped at UNet evaluation {e.step + 1} of {e.steps}"
                            f"{request_ids([requests[r] for r in rs])}")
                for r in rs:
                    responses[r] = cancelled_response(f"; stopped at UNet evaluation {e.step + 1} of {e.steps}")
                continue
            except Exception as e:  # e.g. an engine failure: fail only the requests in this group
                log("error", f"{name}: generate failed{request_ids([requests[r] for r in rs])}: {e}")
                for r in rs:
                    responses[r] = error_response(f"generate failed: {e}")
                continue
            start = 0
            for r, j, n, *_ in members:
                images[r][j] = x[start:start + n].numpy()  # (n, 1, 28, 28)
                start += n

        for r, rows in images.items():
            if responses[r] is not None:
                continue
            if is_cancelled(requests[r]):  # its group ran on for other requests
                responses[r] = cancelled_response()
                continue
            out = np.stack(rows) if self.batched else rows[0]  # (rows, n, 1, 28, 28) or (n, 1, 28, 28)
            responses[r] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("image", np.ascontiguousarray(out, dtype=np.float32))])
        return responses
