"""Every config.pbtxt (CPU repository and generated GPU variant) parses as a Triton ModelConfig, keeps the contract and
stays static (the engine choice lives in the untracked 1/engines.json); the engine choice itself (mnistgen.engine)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from mnistgen import catalog
from mnistgen import engine as eng
from mnistgen.checkpoint import read_config
from training.export import MODELS, read_model_config, write_gpu_repository

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
FP32, INT32, INT64, BYTES = mc.TYPE_FP32, mc.TYPE_INT32, mc.TYPE_INT64, mc.TYPE_STRING
IMG = [1, 28, 28]
SINGLE_SHOT = [m.triton for m in catalog.MODELS if m.kind == catalog.GAN or m.rpc == catalog.INTERNAL]

# The contract the gateway codes against: model -> (max_batch_size, inputs, outputs); None dims = latent_dim.
CONTRACT = {
    "dcgan_generator": (1024, {"latent": (FP32, None)}, {"image": (FP32, IMG)}),
    "dcgan_modified": (1024, {"latent": (FP32, None)}, {"image": (FP32, IMG)}),
    "mlp_generator": (1024, {"latent": (FP32, None)}, {"image": (FP32, IMG)}),
    "ddpm_unet": (1024, {"sample": (FP32, IMG), "timestep": (INT64, [1])}, {"noise_pred": (FP32, IMG)}),
    "ddpm_denoise": (256, {"image": (FP32, IMG), "sigma": (FP32, [1]), "steps": (INT32, [1]),
                           "sampler": (BYTES, [1]), "seed": (INT64, [1])},
                     {"noisy": (FP32, IMG), "denoised": (FP32, IMG)}),
    # batched across requests: each input is (rows, 1), `image` is (rows, num_samples, 1, 28, 28)
    "ddpm_generate": (8, {"num_samples": (INT32, [1]), "steps": (INT32, [1]), "sampler": (BYTES, [1]),
                          "seed": (INT64, [1])}, {"image": (FP32, [-1, 1, 28, 28])}),
    # class-conditional: + digit (-1 = any) and the guidance scale per row
    "ddpm_cond_generate": (8, {"num_samples": (INT32, [1]), "steps": (INT32, [1]), "sampler": (BYTES, [1]),
                               "seed": (INT64, [1]), "digit": (INT32, [1]), "guidance": (FP32, [1])},
                           {"image": (FP32, [-1, 1, 28, 28])}),
}
LOOP_MODELS = ("ddpm_denoise", "ddpm_generate", "ddpm_cond_generate")
LATENT_DIMS = {"dcgan_generator": 256, "dcgan_modified": 64, "mlp_generator": 100}  # the committed checkpoints'


def test_repository_holds_exactly_the_catalog_models():
    dirs = sorted(d.name for d in MODEL_REPOSITORY.iterdir() if (d / "config.pbtxt").exists())
    assert dirs == sorted(CONTRACT) == sorted(MODELS) == sorted(catalog.BY_TRITON)


@pytest.mark.parametrize("model", sorted(CONTRACT))
def test_config_parses_matches_contract_and_is_static(model):
    cfg = read_model_config(MODEL_REPOSITORY / model / "config.pbtxt")  # ParseError on any typo
    max_batch, inputs, outputs = CONTRACT[model]
    assert cfg.name == model and cfg.backend == "python" and not cfg.platform
    assert cfg.max_batch_size == max_batch
    assert cfg.HasField("dynamic_batching") == (max_batch > 0)
    assert [g.kind for g in cfg.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert all(g.count >= 1 for g in cfg.instance_group)
    got_in = {i.name: (i.data_type, list(i.dims)) for i in cfg.input}
    assert got_in == {k: (t, [LATENT_DIMS[model]] if d is None else d) for k, (t, d) in inputs.items()}
    assert {o.name: (o.data_type, list(o.dims)) for o in cfg.output} == outputs
    # no parameters but compute isolation's (serving/triton_backend.py isolate): limits are the catalog's, the
    # engine choice is 1/engines.json's (measured, untracked)
    assert set(cfg.parameters) <= {"nice", "threads"}


@pytest.mark.parametrize("model", LOOP_MODELS)
def test_loop_models_have_a_queue_policy(model):
    cfg = read_model_config(MODEL_REPOSITORY / model / "config.pbtxt")
    policy = cfg.dynamic_batching.default_queue_policy
    assert policy.timeout_action == mc.ModelQueuePolicy.REJECT and policy.allow_timeout_override
    assert policy.max_queue_size > 0 and policy.default_timeout_microseconds > 0


@pytest.mark.parametrize("name", sorted(catalog.GANS))
def test_latent_dims_match_committed_checkpoint(name):
    m = catalog.GANS[name]
    ckpt = REPO_ROOT / "checkpoints" / m.checkpoint
    if not ckpt.exists():
        pytest.skip(f"{ckpt} not committed yet")
    cfg = read_model_config(MODEL_REPOSITORY / m.triton / "config.pbtxt")
    assert list(cfg.input[0].dims) == [read_config(ckpt)["arch"]["latent_dim"]]


def test_model_py_files_are_one_import_line():
    texts = {m: (MODEL_REPOSITORY / m / "1" / "model.py").read_text() for m in MODELS}
    for m, text in texts.items():
        assert text.startswith("from serving.triton_backend import ") and text.count("\n") == 1, m
        assert "sys.path" not in text
    assert len({texts[m] for m in SINGLE_SHOT}) == 1, "the single-shot model.py copies have diverged"


def test_engine_records_are_never_tracked():
    """The measurement is a cache beside the exported files: git ignores it, and nothing tracked holds it."""
    r = subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "-q",
                        f"model_repository/{MODELS[0]}/1/{eng.ENGINES_FILE}"], check=False)
    assert r.returncode == 0, "engines.json must be git-ignored"
    assert not (REPO_ROOT / ".gitattributes").exists()


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


# -- engine choice (mnistgen.engine) -----------------------------------------------------------------


def test_threads_are_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(eng.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(eng, "cgroup_cpu_quota", lambda root="": None)
    assert eng.available_cores() == 4
    monkeypatch.setattr(eng, "cgroup_cpu_quota", lambda root="": 1.5)  # cpu.max "150000 100000"
    assert eng.available_cores() == 2


def test_cgroup_quota_files(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert eng.cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert eng.cgroup_cpu_quota(tmp_path) == 2.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert eng.cgroup_cpu_quota(v1) == 0.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert eng.cgroup_cpu_quota(v1) is None


BATCHES = [1, 4, 16, 64, 256]


def _col(values, batches=BATCHES) -> dict[str, float]:
    return dict(zip(map(str, batches), values))


@pytest.mark.parametrize("ort, ts, want", [
    ([0.3, 0.3, 0.3, 0.3, 0.3], [1.0, 0.5, 0.2, 0.15, 0.2], 16),  # TorchScript from 16 on
    ([0.3, 0.3, 0.3, 0.3, 0.3], [1.0, 0.5, 0.4, 0.4, 0.4], None),  # never faster
    ([0.3, 0.3, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2], 1),  # faster everywhere
    ([0.3, 0.3, 0.3, 0.3, 0.3], [1.0, 0.5, 0.2, 0.15, 0.31], 16),  # one noisy cell above does not move it
    ([0.3, 0.3, 0.3, 0.3, 0.3], [1.0, 0.2, 0.5, 0.5, 0.2], 256),  # a lone win at 4 is noise, not a threshold
])
def test_threshold_is_where_torchscript_wins_and_stays_ahead(ort, ts, want):
    choice = eng.choose({eng.ORT: _col(ort), eng.TORCHSCRIPT: _col(ts)}, BATCHES)
    assert choice == {"threshold": want, "torchscript_precision": eng.FP32, "ort_split_from": None}


@pytest.mark.parametrize("intra, split, want", [
    ([2.0, 1.4, 1.2, 1.2], [2.0, 1.1, 0.9, 0.95], 4),  # split faster from 4 rows on
    ([2.0, 1.0, 0.8, 0.8], [2.1, 1.1, 0.9, 0.95], None),  # intra-op faster throughout
    ([2.0, 1.0, 0.8, 0.8], [2.1, 1.1, 0.7, 0.7], 16),  # split faster from 16 on
    ([2.0, 1.0, 0.8, 0.8], [2.1, 0.9, 0.9, 0.9], None),  # one lucky cell is no crossover
])
def test_split_from_is_where_the_split_sessions_win_and_the_threshold_compares_against_it(intra, split, want):
    batches = [1, 4, 16, 64]
    ms = {eng.ORT: _col(intra, batches), eng.ORT_SPLIT: _col(split, batches)}
    choice = eng.choose(ms, batches)
    assert choice["ort_split_from"] == want
    assert [eng.engine_for(b, None, split_from=want) for b in batches] == [
        eng.ORT_SPLIT if want is not None and b >= want else eng.ORT for b in batches]
    assert eng.effective_split_from(choice, 2) == want and eng.effective_split_from(choice, 1) is None


def test_the_threshold_compares_torchscript_with_onnx_runtime_as_served():
    batches = [1, 4, 16, 64]
    ms = {eng.ORT: _col([2.0, 1.4, 1.2, 1.2], batches), eng.TORCHSCRIPT: _col([9.0, 9.0, 1.0, 1.0], batches)}
    assert eng.choose(ms, batches)["threshold"] == 16  # beats one session's threads from 16 on
    ms[eng.ORT_SPLIT] = _col([2.0, 1.1, 0.9, 0.95], batches)
    assert eng.choose(ms, batches) == {"threshold": None, "torchscript_precision": eng.FP32, "ort_split_from": 4}


BF16_MS = {eng.ORT: _col([0.3] * 4, [1, 16, 64, 256]),
           eng.TORCHSCRIPT: _col([2.0, 0.30, 0.24, 0.20], [1, 16, 64, 256]),
           eng.TORCHSCRIPT_BF16: _col([1.8, 0.20, 0.12, 0.08], [1, 16, 64, 256])}


@pytest.mark.parametrize("bf16, ms, want", [
    ({"within_tolerance": True}, BF16_MS, (eng.BF16, 16)),
    ({"within_tolerance": False}, BF16_MS, (eng.FP32, 64)),  # faster but off by more than bf16 rounding
    ({"within_tolerance": True}, {**BF16_MS, eng.TORCHSCRIPT: BF16_MS[eng.TORCHSCRIPT_BF16],  # slower (emulated)
                                  eng.TORCHSCRIPT_BF16: BF16_MS[eng.TORCHSCRIPT]}, (eng.FP32, 16)),
    (None, BF16_MS, (eng.FP32, 64)),
])
def test_torchscript_runs_bf16_only_where_measured_faster_and_within_tolerance(bf16, ms, want):
    choice = eng.choose(ms, [1, 16, 64, 256], bf16)
    assert (choice["torchscript_precision"], choice["threshold"]) == want  # the threshold of the precision served


def test_the_choice_reads_well_and_old_records_still_render():
    assert eng.describe(16, "engines.json", 2, split_from=4, precision=eng.BF16) == (
        "onnxruntime (the batch split over 2 one-thread sessions from 4) for batch 1-15, torchscript bf16 from 16 "
        "(engines.json, 2 threads)")
    assert eng.describe(None, threads=2, split_from=1) == (
        "onnxruntime (the batch split over 2 one-thread sessions) at every batch size (2 threads)")
    assert eng.describe(4, split_from=16) == "onnxruntime for batch 1-3, torchscript from 4"  # split never served
    assert eng.describe(1) == "torchscript at every batch size"
    # records measured with the dropped one-thread column (reports/bench/results.json) keep their meaning
    assert [eng.engine_for(b, 64, 4) for b in (1, 4, 64)] == [eng.ORT_1T, eng.ORT, eng.TORCHSCRIPT]
    assert eng.describe(64, threads=2, multithread_from=4) == (
        "onnxruntime (1 thread below batch 4) for batch 1-63, torchscript from 64 (2 threads)")


def _row_model(path: Path) -> Path:
    """A tiny ONNX model, image = 2 * latent + row-independent bias: every output row depends on its own input row."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [3], [0.5, -1.0, 3.0])
    graph = helper.make_graph([helper.make_node("Mul", ["latent", "two"], ["scaled"]),
                               helper.make_node("Add", ["scaled", "bias"], ["image"])], "rows", [x], [y],
                              initializer=[two, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("sessions", [1, 2, 3])
def test_split_runner_returns_the_rows_of_one_session_in_order(tmp_path, sessions):
    path = _row_model(tmp_path / "rows.onnx")
    whole = eng.OrtRunner([eng.ort_session(path, 1)], ["image"])
    split = eng.split_runner(path, sessions, ["image"])
    assert len(split.sessions) == sessions and (whole.engine, split.engine) == (eng.ORT, eng.ORT_SPLIT)
    for batch in (1, 2, 3, 7, 64):
        feeds = {"latent": np.arange(batch * 3, dtype=np.float32).reshape(batch, 3)}
        (got,), (want,) = split(feeds), whole(feeds)
        assert got.shape == (batch, 3) and np.array_equal(got, want)


def test_measure_times_every_engine_at_every_batch_and_the_threshold_follows():
    import time

    fixed = lambda feeds: time.sleep(0.002)  # noqa: E731  2 ms a call: cheap rows, costly small batches
    per_row = lambda feeds: time.sleep(0.0005 * len(feeds["x"]))  # noqa: E731  0.5 ms a row
    table = eng.measure({eng.ORT: per_row, eng.TORCHSCRIPT: fixed}, lambda b: {"x": np.zeros((b, 1))},
                        (1, 2, 8, 16), budget_s=0.05, min_rounds=3, max_rounds=3, warmup=1)
    assert table["batches"] == [1, 2, 8, 16] and set(table["ms_per_sample"]) == {eng.ORT, eng.TORCHSCRIPT}
    assert table["ms_per_sample"][eng.TORCHSCRIPT]["16"] < table["ms_per_sample"][eng.ORT]["16"]
    assert eng.choose(table["ms_per_sample"], table["batches"])["threshold"] == 8  # 2 ms < 0.5 ms * 8 rows
    assert eng.warmup_batches(64, 256) == [64, 128, 256] and eng.warmup_batches(None, 256) == []
    assert eng.warmup_batches(3, 8) == [3, 4, 8]


def test_each_request_runs_on_the_engine_its_own_size_selects():
    # queued requests of 1, 20, 3, 16 and 40 rows, TorchScript from 16: the small ones together on ONNX Runtime
    # (23 rows: still ONNX Runtime), the large ones together on TorchScript
    assert eng.request_groups([1, 20, 3, 16, 40], 16) == [([0, 2], False), ([1, 3, 4], True)]
    assert eng.request_groups([1, 2], None) == [([0, 1], False)]  # no threshold: ONNX Runtime for all
    assert eng.request_groups([64], 16) == [([0], True)] and eng.request_groups([4, 9], 1) == [([0, 1], True)]


def test_record_is_trusted_only_for_the_same_export_machine_and_threads(tmp_path):
    record = {"threshold": 16, "ort_split_from": 4, "checkpoint_sha256": "abc", "machine": eng.machine(2)}
    assert eng.write_record(tmp_path / eng.ENGINES_FILE, record)
    back = eng.read_record(tmp_path / eng.ENGINES_FILE)
    assert back == record and eng.record_matches(back, "abc", 2)
    assert not eng.record_matches(back, "abc", 1)  # other thread count
    assert not eng.record_matches(back, "new-export", 2)
    assert not eng.record_matches(dict(back, machine=dict(back["machine"], cpu="other")), "abc", 2)
    assert not eng.record_matches({k: v for k, v in back.items() if k != "ort_split_from"}, "abc", 2)  # older
    # a record without the bf16 column is measured again once a model_bf16.pt sits beside model.pt
    assert not eng.record_matches(back, "abc", 2, bf16_file=True)
    assert eng.record_matches(dict(back, bf16={"native": False}), "abc", 2, bf16_file=True)
    assert eng.read_record(tmp_path / "missing.json") is None
    assert not eng.write_record(tmp_path / "no-such-dir" / eng.ENGINES_FILE, record)
