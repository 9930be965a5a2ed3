"""The Triton launcher (start/ready/stop, errors) and every served model over gRPC and HTTP against PyTorch;
the engine choice per batch size (ONNX Runtime / TorchScript) and ddpm_generate's batching across requests."""
from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serving.process import wait_until
from serving.triton_server import TritonConfig, TritonServer, find_tritonserver, free_ports
from mnistgen import catalog
from mnistgen.engine import BF16_MEAN_TOL
from mnistgen.latent import sample_latent
from mnistgen.registry import load_generator

GEN_TOL = 1e-4  # ONNX Runtime in Triton vs eager PyTorch, fp32
UNET_TOL = 1e-4
LOOP_TOL = 1e-3  # a whole sampling loop accumulates ONNX-vs-PyTorch rounding

# -- launcher ----------------------------------------------------------------------------------------

SLEEPY_MODEL = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        time.sleep({sleep})
        {fail}

    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "x").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x * 2)]))
        return out
'''
TINY_CONFIG = '''
name: "tiny"
backend: "python"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
'''


def tiny_repository(root: Path, sleep: float = 0.0, fail: bool = False) -> Path:
    repo = root / "repo"
    (repo / "tiny" / "1").mkdir(parents=True)
    (repo / "tiny" / "config.pbtxt").write_text(TINY_CONFIG)
    fail_line = 'raise RuntimeError("tiny model refuses to load")' if fail else "pass"
    (repo / "tiny" / "1" / "model.py").write_text(SLEEPY_MODEL.format(sleep=sleep, fail=fail_line))
    (repo / "tiny" / "1" / "model.onnx").write_bytes(b"")  # marks the model as exported for the launcher
    return repo


def tiny_config(repo: Path, tmp_path: Path, **kw) -> TritonConfig:
    http, grpc, metrics = free_ports(3)
    return TritonConfig(model_repository=repo, bind_address="127.0.0.1", http_port=http, grpc_port=grpc,
                        metrics_port=metrics, log_file=tmp_path / "triton.log", stop_grace_s=5, **kw)


def test_find_tritonserver_paths_exist():
    install = find_tritonserver()
    for path in vars(install).values():
        assert path.exists(), path


@pytest.mark.parametrize("kw, match", [
    ({"log_verbose": 7}, "log_verbose must be one of"),
    ({"http_port": 9000, "grpc_port": 9000, "metrics_port": 9002}, "must differ"),
    ({"http_port": 70000}, r"http_port must be in 1\.\.65535"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TritonConfig(**kw)


def test_start_without_exports_names_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="training.export"):
        TritonServer(tiny_config(tmp_path / "empty", tmp_path)).start()


def test_wait_ready_timeout_names_ports_and_log(tmp_path):
    cfg = tiny_config(tiny_repository(tmp_path, sleep=60), tmp_path)
    server = TritonServer(cfg).start()
    try:
        with pytest.raises(TimeoutError) as err:
            server.wait_ready(timeout=3)
        msg = str(err.value)
        assert "http off" in msg and f"grpc {cfg.grpc_port}" in msg and f"metrics {cfg.metrics_port}" in msg
        assert "tritonserver" in msg.lower() or "loading" in msg.lower()  # the log tail is included
    finally:
        t0 = time.monotonic()
        server.close()
    assert not server.running
    assert time.monotonic() - t0 < 60, "close() waited for the 60 s model load instead of stopping it"


def test_failed_model_load_reports_the_models_error(tmp_path):
    server = TritonServer(tiny_config(tiny_repository(tmp_path, fail=True), tmp_path)).start()
    try:
        with pytest.raises(RuntimeError, match="tiny model refuses to load"):
            server.wait_ready(timeout=120)
    finally:
        server.close()


def test_start_infer_stop_restart_same_ports(tmp_path):
    cfg = tiny_config(tiny_repository(tmp_path), tmp_path)
    with TritonServer(cfg) as server:
        x = np.array([[1.0, 2.0]], np.float32)

        def infer():
            # a fresh channel each time: a gRPC channel that saw "connection refused" backs off before retrying
            client = grpcclient.InferenceServerClient(server.grpc_url)
            i = grpcclient.InferInput("x", x.shape, "FP32")
            i.set_data_from_numpy(x)
            return client.infer("tiny", [i]).as_numpy("y")

        np.testing.assert_array_equal(infer(), x * 2)
        assert server.stop() is not None and not server.running
        with pytest.raises(InferenceServerException):
            infer()
        server.start().wait_ready(timeout=120)  # the same ports again
        np.testing.assert_array_equal(infer(), x * 2)
        with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
            assert b"nv_inference_count" in r.read()


# -- served models -----------------------------------------------------------------------------------


def _grpc_infer(url, model, inputs, outputs):
    client = grpcclient.InferenceServerClient(url)
    ins = []
    for name, (arr, dtype) in inputs.items():
        i = grpcclient.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        ins.append(i)
    res = client.infer(model, ins, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
    return [res.as_numpy(o) for o in outputs]


def _http_infer(url, model, inputs, outputs):
    client = httpclient.InferenceServerClient(url)
    ins = []
    for name, (arr, dtype) in inputs.items():
        i = httpclient.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr, binary_data=True)
        ins.append(i)
    res = client.infer(model, ins, outputs=[httpclient.InferRequestedOutput(o, binary_data=True) for o in outputs])
    return [res.as_numpy(o) for o in outputs]


PROTOCOLS = {"grpc": (_grpc_infer, "grpc_url"), "http": (_http_infer, "http_url")}


def infer(triton, protocol, model, inputs, outputs):
    fn, attr = PROTOCOLS[protocol]
    return fn(getattr(triton, attr), model, inputs, outputs)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("name", sorted(catalog.GANS))
def test_generator_matches_pytorch(triton, checkpoint_dir, name, protocol):
    model, ckpt = catalog.GANS[name].triton, checkpoint_dir / catalog.GANS[name].checkpoint
    triton.require_checkpoint(model, ckpt)
    gen, config = load_generator(ckpt)
    dim = config["arch"]["latent_dim"]
    cfg = grpcclient.InferenceServerClient(triton.grpc_url).get_model_config(model).config
    assert list(cfg.input[0].dims) == [dim]  # how the gateway learns latent_dim
    z = sample_latent(5, dim, seed=123)  # (5, dim)
    (image,) = infer(triton, protocol, model, {"latent": (z, "FP32")}, ["image"])
    with torch.inference_mode():
        ref = gen(torch.from_numpy(z)).numpy()  # (5, 1, 28, 28)
    assert image.shape == (5, 1, 28, 28) and image.dtype == np.float32
    assert np.abs(image - ref).max() <= GEN_TOL


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_bad_shape_gets_triton_error_and_server_stays_up(triton, protocol):
    triton.require("dcgan_generator")
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    dim = client.get_model_config("dcgan_generator").config.input[0].dims[0]
    for bad in (np.zeros((2, dim + 3), np.float32), np.zeros((1025, dim), np.float32)):  # wrong dim, > max batch
        with pytest.raises(InferenceServerException):
            infer(triton, protocol, "dcgan_generator", {"latent": (bad, "FP32")}, ["image"])
    with pytest.raises(InferenceServerException):  # wrong dtype
        infer(triton, protocol, "dcgan_generator", {"latent": (np.zeros((1, dim), np.float64), "FP64")}, ["image"])
    assert client.is_server_live() and client.is_model_ready("dcgan_generator")
    (image,) = infer(triton, protocol, "dcgan_generator", {"latent": (np.zeros((1, dim), np.float32), "FP32")}, ["image"])
    assert image.shape == (1, 1, 28, 28)


@pytest.fixture(scope="module")
def unet(checkpoint_dir):
    from mnistgen.diffusion import load_unet

    path = checkpoint_dir / catalog.DENOISER.checkpoint
    if not path.exists():
        pytest.skip(f"{path} not found")
    torch.set_num_threads(1)
    return load_unet(path) + (path,)  # (unet, config, checkpoint path)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_ddpm_unet_matches_pytorch(triton, unet, protocol):
    model, _, path = unet
    triton.require_checkpoint("ddpm_unet", path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 28, 28), dtype=np.float32)  # (3, 1, 28, 28)
    t = np.array([[0], [500], [999]], np.int64)  # (3, 1)
    (eps,) = infer(triton, protocol, "ddpm_unet", {"sample": (x, "FP32"), "timestep": (t, "INT64")}, ["noise_pred"])
    with torch.inference_mode():
        ref = model(torch.from_numpy(x), torch.from_numpy(t[:, 0])).sample.numpy()
    assert np.abs(eps - ref).max() <= UNET_TOL


def denoise_inputs(x0, sigma, steps, sampler, seeds):
    b = x0.shape[0]
    return {
        "image": (x0.astype(np.float32), "FP32"),
        "sigma": (np.full((b, 1), sigma, np.float32), "FP32"),
        "steps": (np.full((b, 1), steps, np.int32), "INT32"),
        "sampler": (np.array([[sampler.encode()]] * b, dtype=object), "BYTES"),
        "seed": (np.asarray(seeds, np.int64).reshape(b, 1), "INT64"),
    }


def clean_images(n: int) -> np.ndarray:
    """Deterministic images in [-1, 1] (a blurred random field is enough for a numerical comparison)."""
    rng = np.random.default_rng(7)
    return np.tanh(rng.standard_normal((n, 1, 28, 28)).astype(np.float32))  # (n, 1, 28, 28)


@pytest.mark.parametrize("protocol, sampler, steps", [("grpc", "ddpm", 8), ("http", "ddim", 5), ("grpc", "dpm-solver++", 6),
                                                    ("http", "sde-dpm-solver++", 6)])
def test_ddpm_denoise_matches_pytorch_loop(triton, unet, protocol, sampler, steps):
    from mnistgen.diffusion import denoise

    model, config, path = unet
    triton.require_checkpoint("ddpm_denoise", path)
    x0, sigma, seed = clean_images(3), 0.5, 11
    noisy, denoised = infer(triton, protocol, "ddpm_denoise", denoise_inputs(x0, sigma, steps, sampler, [seed, seed + 1, seed + 2]),
                            ["noisy", "denoised"])
    ref_noisy, ref_denoised = denoise(model, torch.from_numpy(x0), sigma, sampler, steps, seed,
                                      scheduler_config=config.get("scheduler"))
    assert np.abs(noisy - ref_noisy.numpy()).max() <= 1e-5  # the same seeded noise
    assert np.abs(denoised - ref_denoised.numpy()).max() <= LOOP_TOL


def test_ddpm_denoise_rows_do_not_depend_on_batching(triton):
    triton.require("ddpm_denoise")
    x0 = clean_images(4)
    seeds = [5, 900, 17, 3]  # not consecutive: every row carries its own seed
    (together,) = infer(triton, "grpc", "ddpm_denoise", denoise_inputs(x0, 0.3, 4, "ddim", seeds), ["denoised"])
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    results = {}

    def done(i):
        return lambda result, error: results.__setitem__(i, error or result.as_numpy("denoised"))

    for i in range(4):  # concurrent single-row requests: the dynamic batcher may merge them with anything
        ins = []
        for name, (arr, dtype) in denoise_inputs(x0[i:i + 1], 0.3, 4, "ddim", [seeds[i]]).items():
            inp = grpcclient.InferInput(name, list(arr.shape), dtype)
            inp.set_data_from_numpy(arr)
            ins.append(inp)
        client.async_infer("ddpm_denoise", ins, done(i))
    deadline = time.monotonic() + 120
    while len(results) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    for i in range(4):
        assert not isinstance(results[i], Exception), results[i]
        assert np.abs(results[i][0] - together[i]).max() <= 1e-5


@pytest.mark.parametrize("field, value, match", [
    ("sampler", "euler", r"sampler: unknown sampler 'euler': expected one of"),
    ("steps", 0, r"steps: must be in 1\.\.1000, got 0"),
    ("steps", 1001, r"steps: must be in 1\.\.1000, got 1001"),
    ("sigma", -0.1, r"sigma: must satisfy 0 < sigma <= 1"),
    ("sigma", 1e6, r"sigma: must satisfy 0 < sigma <= 1"),
    ("seed", -1, r"seed: must be in 0\.\."),
])
def test_ddpm_denoise_bad_values_get_clear_errors(triton, field, value, match):
    triton.require("ddpm_denoise")
    args = {"sigma": 0.5, "steps": 2, "sampler": "ddim", "seeds": [0]}
    args.update({"seeds": [value]} if field == "seed" else {field: value})
    with pytest.raises(InferenceServerException, match=match):
        infer(triton, "grpc", "ddpm_denoise", denoise_inputs(clean_images(1), **args), ["denoised"])
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    assert client.is_server_live() and client.is_model_ready("ddpm_denoise")


def generate_inputs(n, steps, sampler, seed, rows=1):
    """One ddpm_generate request: `rows` rows (rows, 1) of (n, steps, sampler, seed + 1000 * row)."""
    seeds = [[seed + 1000 * r] for r in range(rows)]
    return {
        "num_samples": (np.full((rows, 1), n, np.int32), "INT32"),
        "steps": (np.full((rows, 1), steps, np.int32), "INT32"),
        "sampler": (np.full((rows, 1), sampler.encode(), dtype=object), "BYTES"),
        "seed": (np.array(seeds, np.int64), "INT64"),
    }


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_ddpm_generate_matches_pytorch_loop(triton, unet, protocol):
    from mnistgen.diffusion import generate

    model, config, path = unet
    triton.require_checkpoint("ddpm_generate", path)
    (images,) = infer(triton, protocol, "ddpm_generate", generate_inputs(2, 4, "dpm-solver++", 42), ["image"])
    ref = generate(model, 2, "dpm-solver++", 4, 42, scheduler_config=config.get("scheduler")).numpy()
    assert images.shape == (1, 2, 1, 28, 28)  # (rows, num_samples, 1, 28, 28)
    assert np.abs(images[0] - ref).max() <= LOOP_TOL


def _stats(client, model) -> tuple[int, int]:
    """(inference_count, execution_count) of a model: rows served, and execute() calls that served them."""
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def test_ddpm_generate_batches_requests_and_items_keep_their_seeds(triton):
    """Concurrent requests queued behind a running loop are handed over together and run as batched loops; an
    item's images do not depend on the batch: generate(n=4, seed=0)[2] == generate(n=1, seed=2)[0]."""
    triton.require("ddpm_generate")
    client = triton.server.client()  # with the launch key: statistics are a restricted API
    count0, exec0 = _stats(client, "ddpm_generate")
    results: dict[str, object] = {}

    def send(key, inputs):
        ins = []
        for name, (arr, dtype) in inputs.items():
            i = grpcclient.InferInput(name, list(arr.shape), dtype)
            i.set_data_from_numpy(arr)
            ins.append(i)
        client.async_infer("ddpm_generate", ins,
                           lambda result, error: results.__setitem__(key, error or result.as_numpy("image")))

    rows0 = engine_rows(triton, "ddpm_generate")
    send("blocker", generate_inputs(1, 500, "ddim", 9))  # keeps the instance busy (over a second) while the others queue
    wait_until(lambda: engine_rows(triton, "ddpm_generate") > rows0 or "blocker" in results, 120, "the blocker running",
               interval_s=0.02)
    assert "blocker" not in results, "the blocker ended before the others were sent: give it more steps"
    requests = {
        "a": generate_inputs(4, 3, "ddim", 0),  # items seeded 0, 1, 2, 3
        "b": generate_inputs(1, 3, "ddim", 2),  # item seeded 2: a's third
        "c": generate_inputs(2, 3, "ddpm", 2),  # another group (sampler), same seeds
        "d": generate_inputs(2, 3, "ddim", 1, rows=2),  # two rows: seeds 1, 2 and 1001, 1002
    }
    for key, inputs in requests.items():
        send(key, inputs)
    deadline = time.monotonic() + 300
    while len(results) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    for key in ("blocker", *requests):
        assert not isinstance(results.get(key), (Exception, type(None))), (key, results.get(key))
    a, b, c, d = (results[k] for k in "abcd")
    assert a.shape == (1, 4, 1, 28, 28) and b.shape == (1, 1, 1, 28, 28) and d.shape == (2, 2, 1, 28, 28)
    assert np.abs(a[0, 2] - b[0, 0]).max() <= 1e-4  # the same seed, batched differently
    assert np.abs(a[0, 1:3] - d[0]).max() <= 1e-4  # seeds 1, 2 in another request's batch
    assert np.abs(c[0] - a[0, 2:4]).max() > 1e-2  # ddpm is not ddim: a separate group, really run
    # Triton records a request's statistics around the time its response goes out: wait for all six rows
    wait_until(lambda: _stats(client, "ddpm_generate")[0] - count0 >= 6, 30, "the statistics of every request")
    count, execs = _stats(client, "ddpm_generate")
    assert count - count0 == 6, (count, count0)  # rows: blocker 1 + a, b, c 1 each + d 2
    assert execs - exec0 < 5, "the queued requests were not batched into one execute()"


def test_generator_engines_are_measured_per_machine_not_configured(triton):
    """The committed config carries no engine choice; 1/engines.json (untracked) holds what was measured here."""
    triton.require("dcgan_generator")
    cfg = grpcclient.InferenceServerClient(triton.grpc_url).get_model_config("dcgan_generator", as_json=True)["config"]
    assert not cfg.get("parameters")
    record = json.loads((triton.server.config.model_repository / "dcgan_generator" / "1" / "engines.json").read_text())
    threads = record["machine"]["threads"]
    # with more than one thread, ONNX Runtime is measured with the batch split over one-thread sessions too, and
    # TorchScript in bf16 (model_bf16.pt) where the CPU has native bf16 kernels
    want = {"onnxruntime", "torchscript"} | ({"onnxruntime-split"} if threads > 1 else set())
    want |= {"torchscript-bf16"} if record["bf16"]["native"] else set()
    assert set(record["ms_per_sample"]) == want and threads >= 1
    assert record["torchscript_precision"] in ("fp32", "bf16") and "ort_split_from" in record
    assert "dcgan_generator: engines " in triton.log_tail(100000)


def test_engines_json_switches_engines_and_start_measures_a_missing_record(tmp_path, checkpoint_dir):
    """A private Triton: dcgan_generator with a record saying TorchScript from 4 rows (ONNX Runtime below),
    dcgan_modified with one saying TorchScript in bf16 at every batch size, and mlp_generator without engines.json
    (measured at initialize, written beside the model, its bf16 TorchScript too)."""
    src = Path(__file__).resolve().parents[2] / "model_repository"
    repo = tmp_path / "repo"
    for model in ("dcgan_generator", "mlp_generator", "dcgan_modified"):
        if not (src / model / "1" / "engines.json").exists():
            pytest.skip(f"{model} not exported and measured")
        shutil.copytree(src / model, repo / model, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "mlp_generator" / "1" / "engines.json").unlink()
    for model, change in (("dcgan_generator", {"threshold": 4, "torchscript_precision": "fp32"}),
                          ("dcgan_modified", {"threshold": 1, "torchscript_precision": "bf16"})):
        path = repo / model / "1" / "engines.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with TritonServer(tiny_config(repo, tmp_path)) as server:
        server.wait_ready(timeout=300)
        log = server.log_tail(400)
        assert "dcgan_generator: engines onnxruntime for batch 1-3, torchscript from 4" in log, log
        assert "mlp_generator: no engines.json for this machine" in log, log
        record = json.loads((repo / "mlp_generator" / "1" / "engines.json").read_text())
        assert record["measured_by"] == "triton-initialize" and record["batches"][0] == 1
        assert record["bf16"]["native"] == ("torchscript-bf16" in record["ms_per_sample"])
        gen, config = load_generator(checkpoint_dir / catalog.GANS["dcgan-baseline"].checkpoint)
        dim = config["arch"]["latent_dim"]
        for b in (1, 3, 4, 37):  # both engines, batch sizes never seen before
            z = sample_latent(b, dim, seed=b)
            (image,) = _grpc_infer(server.grpc_url, "dcgan_generator", {"latent": (z, "FP32")}, ["image"])
            with torch.inference_mode():
                ref = gen(torch.from_numpy(z)).numpy()
            assert image.shape == (b, 1, 28, 28) and np.abs(image - ref).max() <= GEN_TOL, b
        assert "dcgan_modified: engines torchscript bf16 at every batch size (engines.json" in log, log
        gen, config = load_generator(checkpoint_dir / catalog.GANS["dcgan-modified"].checkpoint)
        z = sample_latent(64, config["arch"]["latent_dim"], seed=7)
        (image,) = _grpc_infer(server.grpc_url, "dcgan_modified", {"latent": (z, "FP32")}, ["image"])
        with torch.inference_mode():
            diff = np.abs(image - gen(torch.from_numpy(z)).numpy())
        assert image.dtype == np.float32 and diff.mean() <= BF16_MEAN_TOL and diff.max() > GEN_TOL  # bf16, really


@pytest.mark.parametrize("kw, match", [
    ({"n": 0}, r"num_samples: must be in 1\.\.64 for model 'ddpm', got 0"),
    ({"sampler": "heun"}, "sampler: unknown sampler 'heun'"),
    ({"steps": 5000}, r"steps: must be in 1\.\.1000, got 5000"),
])
def test_ddpm_generate_bad_values_get_clear_errors(triton, kw, match):
    triton.require("ddpm_generate")
    args = {"n": 1, "steps": 2, "sampler": "ddim", "seed": 0} | kw
    with pytest.raises(InferenceServerException, match=match):
        infer(triton, "http", "ddpm_generate", generate_inputs(**args), ["image"])
    assert grpcclient.InferenceServerClient(triton.grpc_url).is_model_ready("ddpm_generate")


def test_ddpm_generate_rows_of_one_request_must_agree_on_num_samples(triton):
    triton.require("ddpm_generate")
    inputs = generate_inputs(2, 2, "ddim", 0, rows=2)
    inputs["num_samples"] = (np.array([[2], [3]], np.int32), "INT32")
    with pytest.raises(InferenceServerException, match="same num_samples"):
        infer(triton, "grpc", "ddpm_generate", inputs, ["image"])


def test_metrics_endpoint_counts_inferences(triton):
    triton.require("dcgan_generator")
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as r:
        text = r.read().decode()
    assert "nv_inference_count" in text and 'model="dcgan_generator"' in text


def _engine_counters(url: str, model: str) -> dict[tuple[str, str], float]:
    """{(metric, engine): value} of the mnistgen_engine_* counters of `model` on Triton's metrics endpoint."""
    import re

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for m in re.finditer(r'^(mnistgen_engine_(?:rows|runs)_total)\{([^}]*)\} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.get("model") == model:
            out[m.group(1), labels["engine"]] = float(m.group(3))
    return out


def engine_rows(triton, model: str) -> float:
    """Rows `model` has counted on Triton's metrics endpoint: a rise while a request is in flight means its loop is
    running (a DDPM loop flushes the counters from inside, at most once a second: a loop that runs over a second
    always shows)."""
    counters = _engine_counters(triton.metrics_url, model)
    return sum(v for (metric, _), v in counters.items() if metric == "mnistgen_engine_rows_total")


def test_engine_usage_is_counted_per_engine_on_the_metrics_endpoint(triton):
    """Rows and runs per engine (the measured choice: ONNX Runtime variants below the threshold, TorchScript in its
    precision from it on), flushed to Triton's :8002 at most once a second."""
    triton.require("dcgan_generator")
    record = json.loads((triton.server.config.model_repository / "dcgan_generator" / "1" / "engines.json").read_text())
    threshold, precision = record["threshold"], record.get("torchscript_precision", "fp32")
    ts = "torchscript-bf16" if precision == "bf16" else "torchscript"
    z = np.zeros((64, 256), np.float32)
    time.sleep(1.2)  # a run past the flush interval sends what earlier tests left counted but unsent
    _grpc_infer(triton.grpc_url, "dcgan_generator", {"latent": (z[:1], "FP32")}, ["image"])
    before = _engine_counters(triton.metrics_url, "dcgan_generator")
    for b in (1, 64, 64):
        _grpc_infer(triton.grpc_url, "dcgan_generator", {"latent": (z[:b], "FP32")}, ["image"])
    time.sleep(1.2)  # past the flush interval: the next run sends the counts
    _grpc_infer(triton.grpc_url, "dcgan_generator", {"latent": (z[:1], "FP32")}, ["image"])
    after = _engine_counters(triton.metrics_url, "dcgan_generator")
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    big = ts if threshold is not None and threshold <= 64 else None
    if big is not None:
        assert delta[("mnistgen_engine_rows_total", big)] == 128 and delta[("mnistgen_engine_runs_total", big)] == 2
    small_rows = sum(v for (m, e), v in delta.items() if m == "mnistgen_engine_rows_total" and e != big)
    assert small_rows == (2 if big else 130), delta  # the batch-1 runs (and the 64s without TorchScript) on ONNX Runtime
    assert all(e.startswith("onnxruntime") or e == big for _, e in delta), delta
    # the DDPM loops count their UNet evaluations the same way (a family of the same name in several models)
    triton.require("ddpm_generate")
    before = _engine_counters(triton.metrics_url, "ddpm_generate")
    infer(triton, "grpc", "ddpm_generate", generate_inputs(1, 3, "ddim", 0), ["image"])
    time.sleep(1.2)
    infer(triton, "grpc", "ddpm_generate", generate_inputs(1, 3, "ddim", 1), ["image"])
    after = _engine_counters(triton.metrics_url, "ddpm_generate")
    rows = sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == "mnistgen_engine_rows_total")
    assert rows >= 4, after  # the first request's 3 UNet evaluations and at least the second's first
