"""Every config.pbtxt (CPU repository and generated GPU variant) parses as a Triton ModelConfig and keeps the contract;
the engine choice (mnistgen.engine: threads, threshold, overrides) and what export records of it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from mnistgen import engine as eng
from mnistgen.checkpoint import read_config
from training.export import (
    ENGINES_PARAM, GENERATORS, MODELS, SINGLE_SHOT, read_model_config, sync_engines_param, write_gpu_repository,
)
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
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["runtime"] in eng.RUNTIMES and params["intra_op_threads"] == "0"  # derived from the cores
    eng.parse_threshold(params["engine_threshold"])  # a valid override (auto by default)
    assert params.get("precision", "auto") in eng.PRECISIONS
    assert ("precision" in params) == (model in GENERATORS)  # the generators have a bf16 TorchScript to choose
    if ENGINES_PARAM in params:  # export's summary for clients: valid JSON naming the engines in use
        summary = json.loads(params[ENGINES_PARAM])
        assert set(summary["engines"]) <= set(eng.ENGINES) and "threshold" in summary


@pytest.mark.parametrize("model", LOOP_MODELS)
def test_loop_models_have_a_queue_policy(model):
    cfg = read_model_config(MODEL_REPOSITORY / model / "config.pbtxt")
    policy = cfg.dynamic_batching.default_queue_policy
    assert policy.timeout_action == mc.ModelQueuePolicy.REJECT and policy.allow_timeout_override
    assert policy.max_queue_size > 0 and policy.default_timeout_microseconds > 0


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


# -- engine choice (mnistgen.engine) -----------------------------------------------------------------


def test_threads_come_from_the_cores_this_process_may_use(tmp_path, monkeypatch):
    monkeypatch.setattr(eng.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(eng, "cgroup_cpu_quota", lambda root="": None)
    assert eng.available_cores() == 4 and eng.resolve_threads("0") == 4 and eng.resolve_threads(None) == 4
    assert eng.resolve_threads("3") == 3  # intra_op_threads given: as given
    monkeypatch.setattr(eng, "cgroup_cpu_quota", lambda root="": 1.5)  # cpu.max "150000 100000"
    assert eng.available_cores() == 2
    with pytest.raises(ValueError, match="intra_op_threads"):
        eng.resolve_threads("-1")


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


def _table(ort: list[float], ts: list[float], batches=(1, 4, 16, 64, 256)) -> dict:
    return {eng.ORT: dict(zip(map(str, batches), ort)), eng.TORCHSCRIPT: dict(zip(map(str, batches), ts))}


@pytest.mark.parametrize("ort, ts, want", [
    ([0.3, 0.3, 0.3, 0.3, 0.3], [1.0, 0.5, 0.2, 0.15, 0.2], 16),  # TorchScript from 16 on
    ([0.3, 0.3, 0.3, 0.3, 0.3], [1.0, 0.5, 0.4, 0.4, 0.4], None),  # never faster
    ([0.3, 0.3, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2], 1),  # faster everywhere
    ([0.3, 0.3, 0.3, 0.3, 0.3], [1.0, 0.5, 0.2, 0.15, 0.31], 16),  # one noisy cell above does not move it
    ([0.3, 0.3, 0.3, 0.3, 0.3], [1.0, 0.2, 0.5, 0.5, 0.2], 256),  # a lone win at 4 is noise, not a threshold
])
def test_threshold_is_where_torchscript_wins_and_stays_ahead(ort, ts, want):
    assert eng.choose_threshold(_table(ort, ts), [1, 4, 16, 64, 256]) == want


@pytest.mark.parametrize("multi, one, want", [
    ([0.5, 0.3, 0.2, 0.2, 0.2], [0.3, 0.35, 0.4, 0.4, 0.4], 4),  # one thread wins at batch 1 only
    ([0.5, 0.5, 0.5, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3, 0.3], None),  # one thread wins everywhere
    ([0.2, 0.2, 0.2, 0.2, 0.2], [0.3, 0.3, 0.3, 0.3, 0.3], 1),  # all threads win everywhere
])
def test_onnxruntime_runs_single_threaded_below_the_measured_batch(multi, one, want):
    table = {**_table(multi, [9.0] * 5), eng.ORT_1T: dict(zip(map(str, (1, 4, 16, 64, 256)), one))}
    assert eng.choose_ort_multithread_from(table, [1, 4, 16, 64, 256]) == want
    assert eng.choose_ort_multithread_from(_table(multi, [9.0] * 5), [1, 4, 16, 64, 256]) == 1  # no 1-thread column
    served = eng.ort_as_served(table, want)
    assert served["1"] == min(multi[0], one[0]) and served["256"] == min(multi[-1], one[-1])


def test_runner_choice_per_batch_and_its_description():
    assert [eng.engine_for(b, 64, 4) for b in (1, 3, 4, 63, 64)] == [eng.ORT_1T, eng.ORT_1T, eng.ORT, eng.ORT,
                                                                       eng.TORCHSCRIPT]
    assert [eng.engine_for(b, None, None) for b in (1, 1024)] == [eng.ORT_1T, eng.ORT_1T]
    assert [eng.engine_for(b, 16, 1) for b in (1, 16)] == [eng.ORT, eng.TORCHSCRIPT]
    assert eng.describe(64, threads=2, multithread_from=4) == (
        "onnxruntime (1 thread below batch 4) for batch 1-63, torchscript from 64 (2 threads)")
    assert eng.describe(None, source="engines.json", multithread_from=None) == (
        "onnxruntime (1 thread) at every batch size (engines.json)")
    assert eng.describe(8, multithread_from=16) == "onnxruntime (1 thread) for batch 1-7, torchscript from 8"
    assert eng.describe(1, multithread_from=None) == "torchscript at every batch size"
    s = eng.summary({"ort_multithread_from": 4, "machine": {"threads": 2}}, None, eng.ENGINES_FILE)
    assert s["ort_multithread_from"] == 4 and s["description"].startswith("onnxruntime (1 thread below batch 4)")


def test_a_record_without_the_one_thread_or_split_column_is_remeasured_for_several_threads():
    record = {"threshold": None, "checkpoint_sha256": "abc", "machine": eng.machine(2)}
    assert not eng.record_matches(record, "abc", 2)
    assert not eng.record_matches({**record, "ort_multithread_from": 1}, "abc", 2)  # measured before the split column
    assert eng.record_matches({**record, "ort_multithread_from": 1, "ort_split_from": None}, "abc", 2)
    assert eng.record_matches({**record, "machine": eng.machine(1)}, "abc", 1)


@pytest.mark.parametrize("intra, split, want", [
    ([2.0, 1.4, 1.2, 1.2], [2.0, 1.1, 0.9, 0.95], 4),  # split faster from 4 rows on
    ([2.0, 1.0, 0.8, 0.8], [2.1, 1.1, 0.9, 0.95], None),  # intra-op faster throughout
    ([2.0, 1.0, 0.8, 0.8], [2.1, 1.1, 0.7, 0.7], 16),  # split faster from 16 on
    ([2.0, 1.0, 0.8, 0.8], [2.1, 0.9, 0.9, 0.9], None),  # one lucky cell is no crossover
])
def test_split_from_is_where_the_split_sessions_win_and_stay_ahead(intra, split, want):
    batches = [1, 4, 16, 64]
    table = {eng.ORT: dict(zip(map(str, batches), intra)), eng.ORT_SPLIT: dict(zip(map(str, batches), split)),
             eng.ORT_1T: dict(zip(map(str, batches), [1.4, 1.9, 1.9, 1.9]))}
    assert eng.choose_split_from(table, batches) == want
    assert eng.choose_split_from({eng.ORT: table[eng.ORT]}, batches) is None  # no split column
    # one thread wins at batch 1 only; from 4 on all threads, split from `want` on
    assert eng.choose_ort_multithread_from(table, batches, want) == 4
    served = eng.ort_as_served(table, 4, want)
    assert served["1"] == 1.4 and served["16"] == (split[2] if want is not None and want <= 16 else intra[2])
    assert [eng.engine_for(b, None, 4, want) for b in batches] == [eng.ORT_1T] + [
        eng.ORT_SPLIT if want is not None and b >= want else eng.ORT for b in batches[1:]]


def test_ort_parallel_parameter_overrides_the_record_and_the_choice_reads_well():
    record = {"ort_split_from": 16}
    assert eng.effective_split_from(record, 2) == 16
    assert eng.effective_split_from(record, 2, "intra-op") is None
    assert eng.effective_split_from({}, 2, "split") == 2
    assert eng.effective_split_from(None, 2) is None  # no measurement: one session's threads, as before
    assert eng.effective_split_from(record, 1) is None  # one thread: nothing to split over
    with pytest.raises(ValueError, match="ort_parallel must be one of"):
        eng.effective_split_from(record, 2, "threads")
    # split from 1 row: the split runner serves batch 1 as one chunk on one session (what its column measured there),
    # not the intra-op session the crossover never compared at that size
    assert eng.engine_for(1, None, 1, 1) == eng.ORT_SPLIT
    s = eng.summary({"ort_multithread_from": 4, "ort_split_from": 1, "machine": {"threads": 2}}, None,
                    eng.ENGINES_FILE)
    assert s["ort_split_from"] == 1 and s["description"] == (
        "onnxruntime (1 thread below batch 4, the batch split over 2 one-thread sessions) at every batch size "
        "(engines.json, 2 threads)")
    assert eng.describe(None, threads=2, multithread_from=1, split_from=16) == (
        "onnxruntime (the batch split over 2 one-thread sessions from 16) at every batch size (2 threads)")
    assert eng.describe(64, threads=2, multithread_from=4, split_from=128) == (
        "onnxruntime (1 thread below batch 4) for batch 1-63, torchscript from 64 (2 threads)")  # TorchScript first
    assert eng.summary({"ort_split_from": 1, "machine": {"threads": 2}}, None, eng.ENGINES_FILE,
                       "intra-op")["ort_split_from"] is None


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
    whole = eng.OrtRunner(eng.ort_session(path, 1), ["image"])
    split = eng.split_runner(path, sessions, ["image"])
    assert len(split.sessions) == sessions
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
    assert eng.choose_threshold(table["ms_per_sample"], table["batches"]) == 8  # 2 ms < 0.5 ms * 8 rows


def test_overrides_beat_the_measurement():
    record = {"threshold": 64}
    assert eng.effective_threshold("auto", "auto", record) == (64, eng.ENGINES_FILE)
    assert eng.effective_threshold("auto", None, None) == (None, "no measurement")
    assert eng.effective_threshold("auto", "none", record) == (None, "engine_threshold parameter")
    assert eng.effective_threshold("auto", "8", record) == (8, "engine_threshold parameter")
    assert eng.effective_threshold("onnxruntime", "8", record) == (None, "runtime=onnxruntime")
    assert eng.effective_threshold("torchscript", "auto", record) == (1, "runtime=torchscript")
    for bad in ("0", "-3", "fast"):
        with pytest.raises(ValueError, match="engine_threshold"):
            eng.effective_threshold("auto", bad, record)
    with pytest.raises(ValueError, match="runtime"):
        eng.effective_threshold("tensorrt", "auto", record)
    assert eng.summary(record, 64, eng.ENGINES_FILE)["engines"] == [eng.ORT, eng.TORCHSCRIPT]
    assert eng.warmup_batches(64, 256) == [64, 128, 256] and eng.warmup_batches(None, 256) == []


BF16_MS = {eng.TORCHSCRIPT: {"1": 2.0, "16": 0.30, "64": 0.24, "256": 0.20},
           eng.TORCHSCRIPT_BF16: {"1": 1.8, "16": 0.20, "64": 0.12, "256": 0.08}}


@pytest.mark.parametrize("bf16, ms, want", [
    ({"within_tolerance": True}, BF16_MS, eng.BF16),
    ({"within_tolerance": False}, BF16_MS, eng.FP32),  # faster but off by more than bf16 rounding
    ({"within_tolerance": True}, {eng.TORCHSCRIPT: BF16_MS[eng.TORCHSCRIPT_BF16],  # slower (no native bf16 kernels)
                                  eng.TORCHSCRIPT_BF16: BF16_MS[eng.TORCHSCRIPT]}, eng.FP32),
    ({"within_tolerance": True}, {eng.TORCHSCRIPT: BF16_MS[eng.TORCHSCRIPT]}, eng.FP32),  # not measured
    (None, BF16_MS, eng.FP32),
])
def test_torchscript_runs_bf16_only_where_measured_faster_and_within_tolerance(bf16, ms, want):
    assert eng.choose_precision(ms, [1, 16, 64, 256], bf16) == want


def test_each_request_runs_on_the_engine_its_own_size_selects():
    # queued requests of 1, 20, 3, 16 and 40 rows, TorchScript from 16: the small ones together on ONNX Runtime
    # (23 rows: still ONNX Runtime), the large ones together on TorchScript
    assert eng.request_groups([1, 20, 3, 16, 40], 16) == [([0, 2], False), ([1, 3, 4], True)]
    assert eng.request_groups([1, 2], None) == [([0, 1], False)]  # no threshold: ONNX Runtime for all
    assert eng.request_groups([64], 16) == [([0], True)] and eng.request_groups([4, 9], 1) == [([0, 1], True)]


def test_precision_parameter_and_the_threshold_measured_for_it():
    record = {"threshold": 16, "torchscript_precision": eng.BF16, "threshold_fp32": 64, "threshold_bf16": 16}
    assert eng.effective_precision("auto", record, bf16_file=True) == eng.BF16
    assert eng.effective_precision(None, record, bf16_file=False) == eng.FP32  # no model_bf16.pt: fp32
    assert eng.effective_precision("fp32", record, bf16_file=True) == eng.FP32
    assert eng.effective_precision("auto", None, bf16_file=True) == eng.FP32  # not measured: fp32
    assert eng.effective_precision("bf16", {"torchscript_precision": eng.FP32}, bf16_file=True) == eng.BF16
    with pytest.raises(ValueError, match="precision bf16 needs model_bf16.pt"):
        eng.effective_precision("bf16", record, bf16_file=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        eng.effective_precision("fp16", record, bf16_file=True)
    assert eng.effective_threshold("auto", "auto", record, eng.FP32) == (64, eng.ENGINES_FILE)
    assert eng.effective_threshold("auto", "auto", record, eng.BF16) == (16, eng.ENGINES_FILE)
    assert eng.effective_threshold("auto", "auto", {"threshold": 8}, eng.FP32) == (8, eng.ENGINES_FILE)  # older
    s = eng.summary(dict(record, machine={"threads": 2}), 16, eng.ENGINES_FILE, precision=eng.BF16)
    assert s["torchscript_precision"] == eng.BF16
    assert s["description"] == "onnxruntime for batch 1-15, torchscript bf16 from 16 (engines.json, 2 threads)"
    assert eng.summary(record, None, eng.ENGINES_FILE, precision=eng.BF16)["torchscript_precision"] is None
    # a record without the bf16 column is measured again once a model_bf16.pt sits beside model.pt
    old = {"threshold": 16, "ort_multithread_from": 1, "ort_split_from": 4, "checkpoint_sha256": "abc",
           "machine": eng.machine(2)}
    assert eng.record_matches(old, "abc", 2) and not eng.record_matches(old, "abc", 2, bf16_file=True)
    assert eng.record_matches(dict(old, bf16={"native": False}), "abc", 2, bf16_file=True)


def test_record_is_trusted_only_for_the_same_export_machine_and_threads(tmp_path):
    record = {"threshold": 16, "ort_multithread_from": 1, "ort_split_from": 4, "checkpoint_sha256": "abc",
              "machine": eng.machine(2)}
    assert eng.write_record(tmp_path / eng.ENGINES_FILE, record)
    back = eng.read_record(tmp_path / eng.ENGINES_FILE)
    assert back == record and eng.record_matches(back, "abc", 2)
    assert not eng.record_matches(back, "abc", 1)  # other thread count
    assert not eng.record_matches(back, "new-export", 2)
    assert not eng.record_matches(dict(back, machine=dict(back["machine"], cpu="other")), "abc", 2)
    assert eng.read_record(tmp_path / "missing.json") is None


def test_engines_param_is_written_once_and_replaced(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text((MODEL_REPOSITORY / "dcgan_generator" / "config.pbtxt").read_text())
    first = {"engines": ["onnxruntime", "torchscript"], "threshold": 16, "source": "engines.json", "threads": 2,
             "cpu": "Some CPU", "measured_threshold": 16}
    sync_engines_param(path, first)
    assert not sync_engines_param(path, first)  # unchanged: not rewritten
    second = dict(first, threshold=None, engines=["onnxruntime"], measured_threshold=None)
    assert sync_engines_param(path, second)
    text = path.read_text()
    assert text.count('key: "engines"') == 1 and "# DCGAN generator" in text
    params = {k: v.string_value for k, v in read_model_config(path).parameters.items()}
    assert json.loads(params[ENGINES_PARAM]) == second and params["intra_op_threads"] == "0"


def test_the_measured_engines_block_stays_out_of_git(tmp_path):
    """export writes this machine's `engines` block into config.pbtxt at the placeholder's size, and the clean filter
    that `make setup` configures (.gitattributes) turns it back into the placeholder: after `make run` the checkout
    is clean and `git pull` updates the file; an edit elsewhere still shows."""
    import subprocess

    from google.protobuf import text_format

    from mnistgen import engines_param

    root = Path(__file__).resolve().parents[2]
    assert f"model_repository/*/config.pbtxt filter={engines_param.GIT_FILTER}" in (root / ".gitattributes").read_text()
    assert f"filter.{engines_param.GIT_FILTER}.clean 'python3 mnistgen/engines_param.py'" in (
        root / "Makefile").read_text()
    committed = engines_param.clean((MODEL_REPOSITORY / "dcgan_generator" / "config.pbtxt").read_text())
    assert committed.count(engines_param.PLACEHOLDER) == 1 and 'key: "runtime"' in committed
    params = {k: v.string_value for k, v in text_format.Parse(committed, mc.ModelConfig()).parameters.items()}
    assert json.loads(params[ENGINES_PARAM]) == engines_param.NOT_MEASURED  # the padding parses away

    def git(*args, cwd=tmp_path / "a"):
        return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout

    def clone(name):  # a checkout with the filter configured, as `make setup` does
        git("clone", "-q", str(tmp_path / "a"), str(tmp_path / name), cwd=tmp_path)
        git("config", f"filter.{engines_param.GIT_FILTER}.clean", f"python3 {root / 'mnistgen' / 'engines_param.py'}",
            cwd=tmp_path / name)
        return tmp_path / name

    (tmp_path / "a").mkdir()
    git("init", "-q")
    cfg = tmp_path / "a" / "model_repository" / "dcgan_generator" / "config.pbtxt"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(committed)
    (tmp_path / "a" / ".gitattributes").write_text((root / ".gitattributes").read_text())
    git("add", "-A")
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "init")
    user, dev = clone("user"), clone("dev")
    ucfg = user / cfg.relative_to(tmp_path / "a")
    summary = {"engines": ["onnxruntime"], "threshold": None, "description": "measured here"}
    assert sync_engines_param(ucfg, summary) and "measured here" in ucfg.read_text()
    assert ucfg.stat().st_size == len(committed.encode())
    assert git("status", "--porcelain", cwd=user) == ""  # the measured block is invisible to git
    dcfg = dev / cfg.relative_to(tmp_path / "a")
    dcfg.write_text(dcfg.read_text().replace('string_value: "auto"', 'string_value: "onnxruntime"', 1))
    assert git("status", "--porcelain", cwd=dev).strip() == "M model_repository/dcgan_generator/config.pbtxt"
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qam", "runtime onnxruntime", cwd=dev)
    git("pull", "-q", str(dev), "HEAD", cwd=user)  # does not refuse: nothing local to lose
    assert 'string_value: "onnxruntime"' in ucfg.read_text() and "measured here" not in ucfg.read_text()
