"""The Triton python-backend models of model_repository/ (each <model>/1/model.py imports one class from here).

- SingleShotModel: the GAN generators and ddpm_unet; every queued request in one run, names from config.pbtxt.
- GenerateLoopModel, DenoiseLoopModel: a whole DDPM sampling loop in-process (no per-step round trips). Rows are
  checked by mnistgen.catalog.check_request against the model's entry (a bad request gets INVALID_ARG, the others run),
  grouped by (sampler, steps[, sigma]) into batched loops with per-item seeds (a row's result never depends on its
  batch), stopped before the next UNet evaluation once every request of a group is cancelled (client or deadline).
- Engines (mnistgen.engine): 1/engines.json beside the model, measured here at the first load when missing or stale.
Only importable inside Triton's python-backend stub (triton_python_backend_utils).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # only importable inside Triton's python-backend stub

from mnistgen import catalog
from mnistgen import engine as eng

eng.set_torch_env()  # OMP_WAIT_POLICY=PASSIVE unless set: before anything imports torch
MEASURE_MAX_BATCH = 256  # load-time measurement and warm-up stay below this (the UNet at 1024 rows is seconds)


def log(level: str, message: str) -> None:
    """Into Triton's log (pb_utils.Logger), falling back to stdout outside a stub that has it."""
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        getattr(logger, f"log_{level}")(message)
    else:
        print(message, flush=True)


def text(value) -> str:
    """A TYPE_STRING element (bytes from Triton) as str; undecodable bytes become U+FFFD, never an exception."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def request_ids(requests: list) -> str:
    """The requests' ids for a log line (the gateway sends its request id as Triton's), "" when none."""
    ids = [text(r.request_id()) for r in requests if hasattr(r, "request_id") and r.request_id()]
    return f" (request ids {', '.join(ids)})" if ids else ""


def error_response(message: str, code: str = "INTERNAL") -> "pb_utils.InferenceResponse":
    """A per-request error (the model stays up); `code` names a pb_utils.TritonError code, e.g. INVALID_ARG."""
    code_value = getattr(pb_utils.TritonError, code, None)
    err = pb_utils.TritonError(message) if code_value is None else pb_utils.TritonError(message, code_value)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def is_cancelled(request) -> bool:
    """Triton marks a request cancelled when its gRPC client cancels it or the client's deadline passes."""
    try:
        return bool(request.is_cancelled())
    except Exception:  # noqa: BLE001  (an older stub without request cancellation)
        return False


def cancelled_response(what: str = "") -> "pb_utils.InferenceResponse":
    return error_response(f"request cancelled (client cancelled or its deadline passed){what}", "CANCELLED")


def isolate(model_config: dict) -> int:
    """Compute isolation from config.pbtxt's `parameters` (docs/loadtest.md, "Compute isolation"): `nice` N > 0 lowers
    this instance's CPU priority (each instance is its own stub process; every thread it has now is reniced, and the
    threads its engines start later inherit it); `threads` N > 0 caps its engines' threads. -> the threads to use."""
    params = {k: int(v.get("string_value") or 0) for k, v in model_config.get("parameters", {}).items()
              if k in ("nice", "threads")}
    if params.get("nice", 0) > 0:
        for tid in os.listdir("/proc/self/task"):  # (Linux: a nice value is per thread)
            os.setpriority(os.PRIO_PROCESS, int(tid), os.getpriority(os.PRIO_PROCESS, int(tid)) + params["nice"])
    cores = eng.available_cores()
    return min(params["threads"], cores) if params.get("threads", 0) > 0 else cores


class EngineUsage:
    """Rows and runs per engine as counters on Triton's metrics endpoint (:8002), labels model, version, engine:
    mnistgen_engine_rows_total (rows each engine ran; DDPM loops: rows x UNet evaluations), mnistgen_engine_runs_total
    (engine calls). Flushed at a run at most every FLUSH_S seconds (each increment is a round trip to Triton)."""

    FLUSH_S = 1.0

    def __init__(self, model: str, version: str):
        self.labels, self.last_flush = {"model": model, "version": str(version)}, time.monotonic()
        self.pending: dict[str, list[int]] = {}  # engine -> [rows, runs] not yet sent
        self.metrics: dict[str, tuple] = {}
        try:
            self.families = tuple(pb_utils.MetricFamily(name=f"mnistgen_engine_{n}_total", description=d,
                                                        kind=pb_utils.MetricFamily.COUNTER) for n, d in (
                ("rows", "Rows each engine ran (samples; in the DDPM loops samples x UNet evaluations)"),
                ("runs", "Engine calls")))
        except Exception as e:  # noqa: BLE001  (AttributeError on an old stub, TritonModelException on a refusal)
            log("warn", f"{model}: engine usage metrics unavailable ({e})")
            self.families = None

    def count(self, engine: str, rows: int) -> None:
        c = self.pending.setdefault(engine, [0, 0])
        c[0], c[1] = c[0] + rows, c[1] + 1
        if self.families is not None and time.monotonic() - self.last_flush >= self.FLUSH_S:
            self.last_flush = time.monotonic()
            for engine, (rows, runs) in self.pending.items():
                if engine not in self.metrics:
                    self.metrics[engine] = tuple(f.Metric(labels={**self.labels, "engine": engine})
                                                 for f in self.families)
                self.metrics[engine][0].increment(rows)
                self.metrics[engine][1].increment(runs)
            self.pending = {}


class Engines:
    """ONNX Runtime (always: it also answers the name checks; split over one-thread sessions from the measured batch
    size) and TorchScript (where some batch size will use it) for one model version; `runner(batch)` picks."""

    def __init__(self, args: dict, model_config: dict, measure_batches: tuple[int, ...]):
        import onnxruntime as ort

        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.name, self.threads = model_config["name"], isolate(model_config)
        onnx_path, ts_path, bf16_path = (version_dir / f for f in ("model.onnx", "model.pt", eng.BF16_FILE))
        providers = None  # a GPU instance: CUDA at every batch size (TorchScript here is the CPU build)
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": int(args.get("model_instance_device_id") or 0)}),
                         "CPUExecutionProvider"]
        self.session = eng.ort_session(onnx_path, self.threads, providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        sha = self.session.get_modelmeta().custom_metadata_map.get("checkpoint_sha256", "")
        record = None
        if providers is None and ts_path.exists():
            record = self._record(version_dir / eng.ENGINES_FILE, onnx_path, ts_path, bf16_path, sha, measure_batches)
        self.threshold = (record or {}).get("threshold")
        self.precision = record.get("torchscript_precision", eng.FP32) if bf16_path.exists() and record else eng.FP32
        self.split_from = eng.effective_split_from(record, self.threads)
        self.runners = {eng.ORT: eng.OrtRunner([self.session], self.output_names)}
        if self.split_from is not None:
            self.runners[eng.ORT_SPLIT] = eng.split_runner(onnx_path, self.threads, self.output_names)
        self.ts = None
        if self.threshold is not None:
            import torch

            torch.set_num_threads(self.threads)
            bf16 = self.precision == eng.BF16
            self.ts = eng.TorchScriptRunner(eng.load_torchscript(bf16_path if bf16 else ts_path), self.input_names,
                                            eng.TORCHSCRIPT_BF16 if bf16 else eng.TORCHSCRIPT)
            for b in eng.warmup_batches(self.threshold, MEASURE_MAX_BATCH):
                for _ in range(3):
                    self.ts(eng.random_feeds(self.session, b))
        log("info", f"{self.name}: engines " + eng.describe(
            self.threshold, eng.ENGINES_FILE if record else "no measurement", self.threads,
            split_from=self.split_from, precision=self.precision) + f" OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
        self.usage = EngineUsage(self.name, args["model_version"])

    def _record(self, path: Path, onnx_path: Path, ts_path: Path, bf16_path: Path, sha: str,
                batches: tuple[int, ...]) -> dict:
        """engines.json when it matches this export, machine and thread count, else measured now and cached."""
        with eng.measuring_lock():  # models load in parallel: measure one at a time
            record = eng.read_record(path)  # another instance may have measured meanwhile
            if eng.record_matches(record, sha, self.threads, bf16_path.exists()):
                return record
            log("info", f"{self.name}: no engines.json for this machine / {self.threads} threads: measuring")
            record = eng.measure_engines(onnx_path, ts_path, tuple(b for b in batches if b <= MEASURE_MAX_BATCH),
                                         self.threads, budget_s=0.5, bf16_path=bf16_path,
                                         measured_by="triton-initialize", checkpoint_sha256=sha)
            if not eng.write_record(path, record):
                log("warn", f"{self.name}: {path} is not writable; the measurement is used but not kept")
            return record

    def runner(self, batch: int, torchscript: bool | None = None):
        """The runner for `batch` rows (counted in self.usage): TorchScript when `torchscript` (None: from the
        threshold on), else the ONNX Runtime variant for `batch`."""
        if torchscript is None:
            torchscript = self.threshold is not None and batch >= self.threshold
        run = self.ts if torchscript else self.runners[eng.engine_for(batch, None, 1, self.split_from)]
        self.usage.count(run.engine, batch)
        return run


class SingleShotModel:
    """Any single-shot model: names from config.pbtxt, dynamic batching (concatenate, run, split back)."""

    def initialize(self, args: dict) -> None:
        self.model_config = json.loads(args["model_config"])
        self.input_names = [i["name"] for i in self.model_config["input"]]
        self.output_names = [o["name"] for o in self.model_config["output"]]
        self.engines = Engines(args, self.model_config, eng.GENERATOR_BATCHES if "latent" in self.input_names
                               else eng.UNET_BATCHES)
        # per-row shape the ONNX graph expects, e.g. timestep: () for (B,) while Triton sends (B, 1)
        self.row_shapes = {i.name: tuple(i.shape[1:]) for i in self.engines.session.get_inputs()}
        if sorted(self.row_shapes) != sorted(self.input_names) or \
                sorted(self.engines.output_names) != sorted(self.output_names):
            raise pb_utils.TritonModelException(
                f"{self.model_config['name']}: model.onnx has inputs {sorted(self.row_shapes)} / outputs "
                f"{sorted(self.engines.output_names)}, but config.pbtxt declares {self.input_names} / "
                f"{self.output_names}: re-run training.export")

    def execute(self, requests: list) -> list:
        """Every queued request's rows run at once, split back; each request on the engine its OWN row count selects
        (mnistgen.engine.request_groups), so its images depend on its seed and size only."""
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.input_names} for r in requests]
        sizes = [f[self.input_names[0]].shape[0] for f in feeds]
        outputs: list = [None] * len(requests)
        for members, on_ts in eng.request_groups(sizes, self.engines.threshold):
            runner = self.engines.runner(sum(sizes[i] for i in members), torchscript=on_ts)
            try:
                batch = {n: np.concatenate([feeds[i][n] for i in members]).reshape(-1, *self.row_shapes[n])
                         for n in self.input_names}  # (sum B, ...)
                by_name = dict(zip(self.engines.output_names, runner(batch)))
            except Exception as e:  # noqa: BLE001  a failed run answers its requests with the error; the model stays up
                log("error", f"{self.model_config['name']}: {runner.engine} failed on {len(members)} request(s)"
                             f"{request_ids([requests[i] for i in members])}: {e}")
                for i in members:
                    outputs[i] = error_response(f"{runner.engine} failed: {e}")
                continue
            start = 0
            for i in members:
                outputs[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                    n, np.ascontiguousarray(by_name[n][start:start + sizes[i]])) for n in self.output_names])
                start += sizes[i]
        return outputs

    def finalize(self) -> None:
        self.engines = None


class EngineEps:
    """eps_fn(x (B, 1, 28, 28), t (B,) int64[, labels (B,) int64]) -> noise_pred (B, 1, 28, 28) on the engine for B."""

    def __init__(self, engines: Engines):
        self.engines = engines
        meta = engines.session.get_modelmeta().custom_metadata_map  # the training noise schedule, recorded by export
        self.scheduler_config = json.loads(meta["scheduler"]) if "scheduler" in meta else None

    def __call__(self, x, t, labels=None):
        import torch

        runner = self.engines.runner(x.shape[0])
        args = (x.contiguous(), t) + (() if labels is None else (labels,))
        if runner is self.engines.ts:  # torch in, torch out
            with torch.inference_mode():
                return runner.module(*args)
        feeds = {n: np.ascontiguousarray(a.detach().numpy()) for n, a in zip(self.engines.input_names, args)}
        return torch.from_numpy(runner(feeds)[0])  # (B, 1, 28, 28)


class StopWhenAllCancelled:
    """should_stop for a group shared by several requests: True once every one of them is cancelled."""

    def __init__(self, requests: list):
        self.pending = list(requests)

    def __call__(self) -> bool:
        self.pending = [r for r in self.pending if not is_cancelled(r)]
        return not self.pending


class DiffusionLoopModel:
    """Rows -> groups -> one batched loop per group -> a response per request. Subclasses: rows(request) ->
    [((sampler, steps, *key), (count, ...))], run(key, items, stop) -> per-item outputs, respond(a request's outputs)."""

    UNIT = "samples"  # what a row's count counts, for the log

    def initialize(self, args: dict) -> None:
        import torch

        self.model_config = json.loads(args["model_config"])
        self.name = self.model_config["name"]
        self.entry = catalog.BY_TRITON[self.name]  # its request limits
        self.engines = Engines(args, self.model_config, eng.UNET_BATCHES)
        # with ONNX Runtime alone torch only does the scheduler arithmetic: one thread, no fight with ORT's pool
        torch.set_num_threads(self.engines.threads if self.engines.ts is not None else 1)
        self.eps = EngineEps(self.engines)
        self.batched = int(self.model_config.get("max_batch_size", 0)) > 0  # outputs get the leading row axis

    def get(self, request, name: str) -> np.ndarray:
        return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

    def execute(self, requests: list) -> list:
        from mnistgen import diffusion

        responses: list = [None] * len(requests)
        results: dict[int, list] = {}  # request -> per-row outputs, filled group by group
        groups: dict[tuple, list[tuple]] = {}  # key -> [(request, row, item)]
        for r, request in enumerate(requests):
            try:
                rows = self.rows(request)
            except Exception as e:  # noqa: BLE001  a bad value or malformed tensors: answer it, keep the model up
                responses[r] = error_response(str(e) if isinstance(e, catalog.LimitError) else f"bad request: {e}",
                                              "INVALID_ARG")
                continue
            results[r] = [None] * len(rows)
            for j, (key, item) in enumerate(rows):
                groups.setdefault(key, []).append((r, j, item))
        for key, members in groups.items():
            rs = sorted({r for r, _, _ in members})
            if all(responses[r] is not None for r in rs):
                continue
            try:
                outs = self.run(key, [item for _, _, item in members], StopWhenAllCancelled([requests[r] for r in rs]))
            except diffusion.SamplingStopped as e:
                where = f"stopped at UNet evaluation {e.step + 1} of {e.steps}"
                log("info", f"{self.name}: {len(rs)} request(s) cancelled ({sum(m[2][0] for m in members)} "
                            f"{self.UNIT}, {key[0]}-{key[1]}): {where}{request_ids([requests[r] for r in rs])}")
                for r in rs:
                    responses[r] = cancelled_response(f"; {where}")
                continue
            except Exception as e:  # noqa: BLE001  e.g. an engine failure: fail only the requests in this group
                log("error", f"{self.name}: sampling failed{request_ids([requests[r] for r in rs])}: {e}")
                for r in rs:
                    responses[r] = error_response(f"{self.name} failed: {e}")
                continue
            for (r, j, _), out in zip(members, outs):
                results[r][j] = out
        for r, outs in results.items():
            if responses[r] is None:  # a cancelled request whose group ran on for others gets CANCELLED
                responses[r] = cancelled_response() if is_cancelled(requests[r]) else self.respond(outs)
        return responses

    def finalize(self) -> None:
        self.eps = self.engines = None


class GenerateLoopModel(DiffusionLoopModel):
    """DDPM sampling from x_T ~ N(0, I), class-conditional with classifier-free guidance where the entry is. Rows of
    (num_samples, steps, sampler, seed[, digit (-1: any), guidance]), one num_samples per request; sample i of a row is
    seeded with seed + i, as diffusion.generate seeds it. A conditional group mixes digits and scales freely (labelled
    and null passes in one UNet call per step). Output `image`: (rows, num_samples, 1, 28, 28)."""

    def rows(self, request) -> list[tuple]:
        names = ["num_samples", "steps", "sampler", "seed"] + (["digit", "guidance"] if self.entry.conditional else [])
        cols = [self.get(request, n).reshape(-1) for n in names]
        if len({len(c) for c in cols}) != 1 or len(cols[0]) == 0:
            raise ValueError(f"{', '.join(names)} must hold one value per row")
        if len(set(cols[0].tolist())) != 1:
            raise ValueError(f"every row of one request must ask for the same num_samples, got {cols[0].tolist()}")
        rows = []
        for n, steps, sampler, seed, *cond in zip(*cols):
            digit, w = (int(cond[0]), float(cond[1])) if cond else (-1, 0.0)
            catalog.check_request(self.entry, int(n), int(steps), text(sampler), int(seed), digit, w)
            rows.append(((text(sampler), int(steps)), (int(n), int(seed), digit, w)))
        return rows

    def run(self, key: tuple, items: list[tuple], stop) -> list:
        import torch

        from mnistgen import diffusion

        (sampler, steps), null = key, catalog.DIGITS  # the UNet's "no digit" class
        cond = {}
        if self.entry.conditional:
            cond = {"labels": [d if d >= 0 else null for n, _, d, _ in items for _ in range(n)],
                    "guidance": [w for n, _, _, w in items for _ in range(n)], "null": null}
        seeds = [seed + i for n, seed, _, _ in items for i in range(n)]  # sample i of a row: seed + i
        with torch.inference_mode():
            x = diffusion.generate(self.eps, len(seeds), sampler, steps, seeds=seeds, batch_size=256,
                                   scheduler_config=self.eps.scheduler_config, should_stop=stop, **cond).numpy()
        bounds = np.cumsum([0] + [n for n, *_ in items])
        return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]  # (n, 1, 28, 28) each

    def respond(self, outs: list) -> "pb_utils.InferenceResponse":
        image = np.stack(outs) if self.batched else outs[0]  # (rows, n, 1, 28, 28) or (n, 1, 28, 28)
        return pb_utils.InferenceResponse([pb_utils.Tensor("image", np.ascontiguousarray(image, np.float32))])


class DenoiseLoopModel(DiffusionLoopModel):
    """Rows of (clean x0 (1, 28, 28) in [-1, 1], sigma, steps, sampler, seed): y = x0 + sigma * n, then the reverse
    loop; a row's noise all from its own seed, as diffusion.denoise seeds item i. Outputs noisy, denoised."""

    UNIT = "images"

    def rows(self, request) -> list[tuple]:
        image = self.get(request, "image").astype(np.float32)  # (B, 1, 28, 28)
        cols = [self.get(request, n).reshape(-1) for n in ("sigma", "steps", "sampler", "seed")]  # (B,) each
        if not np.isfinite(image).all() or image.min() < -1.0 or image.max() > 1.0:
            raise catalog.LimitError("image", "values must be finite and in [-1, 1] (clean x0), got range "
                                              f"[{np.nanmin(image):.3g}, {np.nanmax(image):.3g}]")
        rows = []
        for x0, sigma, steps, sampler, seed in zip(image, *cols):
            catalog.check_request(self.entry, len(image), int(steps), text(sampler), int(seed), sigma=float(sigma))
            rows.append(((text(sampler), int(steps), float(sigma)), (1, int(seed), x0)))
        return rows

    def run(self, key: tuple, items: list[tuple], stop) -> list:
        import torch

        from mnistgen import diffusion

        sampler, steps, sigma = key
        x0 = torch.from_numpy(np.stack([x for _, _, x in items]))  # (G, 1, 28, 28)
        with torch.inference_mode():
            noisy, denoised = diffusion.denoise(self.eps, x0, sigma, sampler, steps, seeds=[s for _, s, _ in items],
                                                scheduler_config=self.eps.scheduler_config, should_stop=stop)
        return list(zip(noisy.numpy(), denoised.numpy()))

    def respond(self, outs: list) -> "pb_utils.InferenceResponse":
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(np.stack(part)))
                                           for name, part in zip(("noisy", "denoised"), zip(*outs))])
