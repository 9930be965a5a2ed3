"""loadtest/bench.py: result tables and goal arithmetic on synthetic rows, the concurrency sweep (a tiny real one
against the session gateway), and --device cuda's refusal and argument plumbing (the real run is `make bench`)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loadtest import bench, bench_triton, load
from mnistgen.files import repo_relative

REPO_ROOT = Path(__file__).resolve().parents[2]


def row(workload, batch, path, runs_ms, **extra):
    med = sorted(runs_ms)[len(runs_ms) // 2]
    return {"workload": workload, "batch": batch, "backend": path, "median_ms": med, "per_sample_ms": med / batch,
            "runs_ms": runs_ms, **extra}


@pytest.fixture
def rows():
    g = "generator dcgan-baseline"
    out = [row(g, 1, "pytorch-eager", [2.0, 2.0, 2.0]), row(g, 1, "triton-grpc", [1.0, 1.0, 1.0]),
           row(g, 1, "gateway-grpc", [2.5, 2.5, 9.0]), row(g, 64, "pytorch-eager", [64.0] * 3),
           row(g, 64, "gateway-grpc", [32.0] * 3), row(g, 64, "gateway-http", [96.0] * 3)]
    for path, ddpm, fast in (("pytorch-eager", 1000.0, 250.0), ("gateway-grpc", 600.0, 100.0)):
        out += [row("denoise ddpm-100", 1, path, [ddpm] * 2, unet_evals=100),
                row("denoise dpm-solver++-20", 1, path, [fast] * 2, unet_evals=20)]
    return out


def test_results_keys_per_path_and_batch(rows):
    res = bench.results_table(rows)
    c = res["generator dcgan-baseline"]["gateway-grpc"]["64"]
    assert c["ms_per_sample"] == pytest.approx(0.5) and c["samples_per_s"] == pytest.approx(2000.0)
    c1 = res["generator dcgan-baseline"]["gateway-grpc"]["1"]
    assert c1["p50_ms"] == pytest.approx(2.5) and c1["p99_ms"] == pytest.approx(2.5 + 0.98 * 6.5)
    assert res["denoise ddpm-100"]["pytorch-eager"]["1"]["unet_evals"] == 100


def test_goals(rows):
    cfg = bench.GatewayBenchConfig(generator_batches=(1, 64), denoise_batches=(1,))
    goals = {g.name: g for g in bench.goals(bench.results_table(rows), cfg)}
    by_start = lambda s: next(g for n, g in goals.items() if n.startswith(s))  # noqa: E731
    g = by_start("generator through gateway-grpc at batch 64")
    assert g.measured == pytest.approx(0.5) and g.met
    g = by_start("generator through gateway-http at batch 64")
    assert g.measured == pytest.approx(1.5) and not g.met
    g = by_start("denoise DDPM-100 through gateway-grpc")
    assert g.measured == pytest.approx(0.6) and not g.met  # batch 1: goal 0.4x
    g = by_start("dpm-solver++:20 speed-up")
    assert g.measured == pytest.approx(6.0) and g.met
    g = by_start("gateway-grpc p50 overhead")
    assert g.measured == pytest.approx(1.5) and g.unit == "ms" and g.target == 1.0 and not g.met


def test_goals_cover_every_batch_of_the_issue(rows):
    """Generator b1 (2.5 ms vs eager 2.0) misses; DDPM b1 is judged against 0.4x (0.6x misses); the concurrency goal
    compares the gateway at 16 clients with eager's sequential (1-client) rate."""
    cfg = bench.GatewayBenchConfig(generator_batches=(1, 64), denoise_batches=(1,), concurrency=(1, 16))
    conc = {"generate dcgan-baseline batch 1": {"pytorch-eager": {"1": {"samples_per_s": 400.0},
                                                                  "16": {"samples_per_s": 900.0}},
                                                "gateway-grpc": {"16": {"samples_per_s": 500.0}}}}
    goals = {g.name: g for g in bench.goals(bench.results_table(rows), cfg, None, conc)}
    by_start = lambda s: next(g for n, g in goals.items() if n.startswith(s))  # noqa: E731
    g = by_start("generator through gateway-grpc at batch 1 ")
    assert g.measured == pytest.approx(1.25) and not g.met
    g = by_start("denoise DDPM-100 through gateway-grpc vs the eager diffusers loop, batch 1")
    assert g.target == 0.4 and g.measured == pytest.approx(0.6) and not g.met
    g = by_start("batch-1 Generate samples/s through gateway-grpc at 16 clients")
    assert g.measured == pytest.approx(1.25) and g.met
    assert not any(n.startswith("generator through gateway-grpc at batch 256") for n in goals)  # not benchmarked
    missing = [g for g in bench.goals(bench.results_table(rows), cfg) if "16 clients" in g.name]
    assert len(missing) == 1 and not missing[0].met  # no sweep ran: the goal is missed, not dropped


def test_missing_cells_miss_their_goal_and_bad_paths_are_named():
    cfg = bench.GatewayBenchConfig(generator_batches=(64,), denoise_batches=(1,))
    assert not any(g.met for g in bench.goals({}, cfg))
    with pytest.raises(ValueError, match="expected a subset of"):
        bench.GatewayBenchConfig(paths=("gateway-grpc", "tensorrt"))


def test_overhead_goal_prefers_the_interleaved_measurement(rows):
    cfg = bench.GatewayBenchConfig(generator_batches=(1, 64), denoise_batches=(1,))
    overhead = {"repeats": 200, "overhead_p50_ms": 2.4}
    g = [g for g in bench.goals(bench.results_table(rows), cfg, overhead) if "overhead" in g.name]
    assert len(g) == 1 and "200 interleaved pairs" in g[0].name
    assert g[0].measured == pytest.approx(2.4) and not g[0].met


# -- concurrency sweep (results["concurrency"]) ------------------------------------------------------------------


def conc_cell(clients, samples_per_s, p50, p99, ok=10, errors=0, **extra):
    return {"clients": clients, "requests": ok + errors, "ok": ok, "errors": errors, "first_error": "",
            "wall_s": ok / samples_per_s, "samples_per_s": samples_per_s, "p50_ms": p50, "p99_ms": p99,
            "load_avg_1m": 2.0, **extra}


def synthetic_result(rows: list[dict], cfg, concurrency: dict) -> dict:
    """What bench.run writes to results.json, around synthetic rows (goals judged without a concurrency sweep)."""
    return {"config": {"generator": "dcgan-baseline", "threads": 2, "generator_repeats": 3, "ddpm_repeats": 2, "fast_repeats": 2, "warmup": 1,
                       "fast_sampler": "dpm-solver++:20", "sigma": 0.5, "denoise_batches": [1]},
            "machine": {"cpu": "x", "cores": 2, "platform": "p", "python": "3", "torch": "t", "onnxruntime": "o",
                        "load_avg_1m": 1.0},
            "load_avg_end": 1.5, "wall_s": 10.0, "results": bench.results_table(rows), "overhead_batch1": None,
            "concurrency": concurrency, "locust": None,
            "goals": [{**bench.asdict(g), "met": g.met} for g in bench.goals(bench.results_table(rows), cfg)]}


def test_concurrency_section_in_the_markdown(rows):
    cfg = bench.GatewayBenchConfig(generator_batches=(1, 64), denoise_batches=(1,))
    conc = {"generate dcgan-baseline batch 1": {
        "pytorch-eager": {"1": conc_cell(1, 500.0, 2.0, 3.0, torch_threads=1), "4": conc_cell(4, 500.0, 8.0, 9.0,
                                                                                            torch_threads=1)},
        "gateway-grpc": {"1": conc_cell(1, 250.0, 4.0, 6.0), "4": conc_cell(4, 1000.0, 4.0, 7.0, errors=1)}}}
    md = bench.markdown(synthetic_result(rows, cfg, conc))
    assert "## Concurrency: batch-1 requests from N closed-loop clients" in md
    lines = [line for line in md.splitlines() if line.startswith("| generate dcgan-baseline batch 1 |")]
    assert len(lines) == 4
    assert "| generate dcgan-baseline batch 1 | 4 | gateway-grpc | 1000 | 4 | 7 | 10 | 1 | 2.00x | 2.0 |" in lines
    assert "| generate dcgan-baseline batch 1 | 1 | pytorch-eager (1 thr) | 500 | 2 | 3 | 10 | 0 | - | 2.0 |" in lines
    assert "## Locust" not in md


def test_headline_shows_a_dash_where_a_path_has_no_cell(rows):
    """A workload one path does not run (ddpm-cond has no in-process ONNX Runtime cell) reads "-", never "nanx"."""
    rows = rows + [row("generate ddpm-cond digit 7", 1, "pytorch-eager", [200.0]),
                   row("generate ddpm-cond digit 7", 1, "gateway-grpc", [100.0]),
                   row("generator dcgan-baseline", 1, "onnxruntime", [0.5])]
    cfg = bench.GatewayBenchConfig(generator_batches=(1, 64), denoise_batches=(1,))
    md = bench.markdown(synthetic_result(rows, cfg, {}))
    assert "nan" not in md
    assert "MISSED: batch-1 Generate samples/s through gateway-grpc at 16 clients" in md  # no sweep ran
    assert "not measured (goal >= 1x)" in md
    header = next(line for line in md.splitlines() if line.startswith("| workload | batch | onnxruntime"))
    assert header == "| workload | batch | onnxruntime | triton-grpc | gateway-grpc | gateway-http |"
    assert "| generate ddpm-cond digit 7 | 1 | - | - | 0.50x | - |" in md.splitlines()
    assert "| generator dcgan-baseline | 1 | 0.25x | 0.50x | 1.25x | - |" in md.splitlines()


def test_closed_loop_serial_vs_concurrent():
    active, peak, lock = [0], [0], threading.Lock()

    def sleeper(i: int) -> None:  # one 10 ms call; `peak` is the most calls ever inside at once
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1

    serial = load.closed_loop(lambda: sleeper, clients=4, requests=12, serial=True)
    assert serial["ok"] == 12 and serial["errors"] == 0 and peak[0] == 1  # one call at a time
    # a serial latency counts the wait behind the other clients' calls (each holds the lock >= 10 ms): a lower bound
    # a busy machine can only raise
    assert serial["p50_ms"] >= 20, serial

    together, peak[0] = threading.Barrier(4, timeout=60), 0

    def make_call():
        calls = []

        def call(i: int) -> None:
            calls.append(i)
            if len(calls) == 2:  # each client's first timed call (the first is the warm-up) waits for the other three
                together.wait()
            sleeper(i)
        return call

    parallel = load.closed_loop(make_call, clients=4, requests=12, warm=True)
    assert parallel["ok"] == 12 and parallel["errors"] == 0 and peak[0] == 4  # all four clients' calls at once

    def call(i: int) -> None:
        if i % 2:
            raise RuntimeError("busy")

    c = load.closed_loop(lambda: call, clients=2, requests=6)
    assert (c["ok"], c["errors"]) == (3, 3) and "RuntimeError: busy" in c["first_error"]
    assert c["error_codes"] == {"RuntimeError": 3}
    timed = load.closed_loop(lambda: sleeper, clients=2, seconds=0.2)  # a time budget instead of a request count
    # it sent requests until the budget was spent (never stopping early), however slowly this machine ran them
    assert timed["errors"] == 0 and timed["ok"] == timed["requests"] >= 1 and timed["wall_s"] >= 0.2


def test_concurrency_config_and_quick_mode(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "run", lambda cfg: seen.setdefault("cfg", cfg))
    bench.main(["--quick"])
    cfg = seen.pop("cfg")
    assert cfg.concurrency == (1, 4) and cfg.concurrency_requests == 40 and cfg.concurrency_denoise_requests == 4
    bench.main(["--quick", "--concurrency", "2", "--concurrency-requests", "7"])  # options given win over --quick
    cfg = seen.pop("cfg")
    assert cfg.concurrency == (2,) and cfg.concurrency_requests == 7
    assert bench.GatewayBenchConfig().concurrency == (1, 4, 16)
    assert bench.GatewayBenchConfig(concurrency=(0,)).concurrency == ()  # no sweep
    with pytest.raises(ValueError, match="concurrency"):
        bench.GatewayBenchConfig(concurrency=(-1,))


def test_concurrency_sweep_against_a_real_gateway(gateway, triton, tmp_path):
    """Tiny settings: 1 and 2 clients, a handful of batch-1 requests per path (the real sweep is `make bench`)."""
    triton.require("dcgan_generator", "ddpm_denoise")  # both workloads or a skip that says which model is missing
    cfg = bench.GatewayBenchConfig(concurrency=(1, 2), concurrency_requests=6, concurrency_denoise_requests=2,
                                   fast_sampler="dpm-solver++:2", threads=1, out_dir=tmp_path)
    conc = bench.bench_concurrency(cfg, gateway.grpc_target, True)
    expected = ["generate dcgan-baseline batch 1", "denoise dpm-solver++-2 batch 1"]
    assert list(conc) == expected
    for w in expected:
        for path in bench.CONCURRENCY_PATHS:
            for level in ("1", "2"):
                c = conc[w][path][level]
                assert c["errors"] == 0, c["first_error"]
                assert c["clients"] == int(level) and c["ok"] == c["requests"] > 0
                assert c["samples_per_s"] > 0 and 0 < c["p50_ms"] <= c["p99_ms"]
        assert "torch_threads" in conc[w]["pytorch-eager"]["1"]
    json.dumps(conc)  # results.json material


def test_conditional_row_against_a_real_gateway(gateway, triton, tmp_path, checkpoint_dir):
    """The ddpm-cond generate workload on every path (eager, Triton direct, gateway gRPC/HTTP) at tiny settings."""
    from serving.client import GatewayClient

    triton.require("ddpm_cond_generate")
    cfg = bench.GatewayBenchConfig(cond_batches=(2,), fast_sampler="dpm-solver++:2", fast_repeats=1, threads=1,
                                   checkpoint_dir=checkpoint_dir,
                                   out_dir=tmp_path)
    clients = {p: GatewayClient(transport=p.split("-")[1], timeout_s=60,
                                target=gateway.grpc_target if p == "gateway-grpc" else gateway.http_url[len("http://"):])
               for p in ("gateway-grpc", "gateway-http")}
    rows = bench.bench_conditional(cfg, clients, triton.server.client())  # the launch key: it reads statistics
    for c in clients.values():
        c.close()
    res = bench.results_table(rows)
    (workload,) = res
    assert workload.startswith("generate ddpm-cond digit 7 dpm-solver++-2")
    assert sorted(res[workload]) == sorted(["pytorch-eager", "triton-grpc", "gateway-grpc", "gateway-http"])
    assert all(res[workload][p]["2"]["ms_per_sample"] > 0 for p in res[workload])
    # the Triton-direct cell says where its time went inside Triton (the "Inside Triton" table), like the others
    phases = res[workload]["triton-grpc"]["2"]["triton_ms"]
    assert set(phases) == {"queue", "compute_input", "compute_infer", "compute_output"}
    assert phases["compute_infer"] > 0
    assert "ddpm-cond" in "\n".join(bench.triton_phases_markdown(res))


# -- --device cuda: refused at once without CUDA, argument plumbing ---------------------------------------------


def test_device_cuda_fails_at_once_without_cuda(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda"])  # refused before anything is exported or started
    msg = str(e.value)
    assert "--device cuda" in msg and "torch.cuda.is_available() is False" in msg and "pip install -e '.[gpu]'" in msg


def test_device_cuda_names_onnxruntime_gpu_when_only_its_ep_is_missing(monkeypatch):
    import onnxruntime
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(SystemExit) as e:
        bench_triton.check_device("cuda")
    assert "no CUDAExecutionProvider" in str(e.value) and "onnxruntime-gpu" in str(e.value)
    bench_triton.check_device("cpu")  # nothing to check
    bench_triton.check_device("cuda", onnxruntime=False)  # eager-only runs need torch's CUDA alone


def test_eager_only_paths_start_no_triton_and_need_no_onnx(tmp_path):
    """--paths pytorch-eager[-bf16]: in-process rows only; no export, Triton, gateway, tritonclient or onnx import (so a
    GPU machine without Triton or onnxruntime-gpu can run it). A real run, on the GAN checkpoint alone."""
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    shutil.copy(REPO_ROOT / "checkpoints" / "dcgan-baseline.safetensors", ckpt)
    code = ("import sys, json; from loadtest import bench; "
            f"bench.main(['--paths', 'pytorch-eager', '--quick', '--concurrency', '1', '--checkpoint-dir', {str(ckpt)!r}, "
            f"'--model-repository', {str(tmp_path / 'repo')!r}, '--out-dir', {str(tmp_path / 'out')!r}]); "
            "print('IMPORTED', [m for m in ('tritonclient', 'serving.triton_server', 'training.export', 'onnx', "
            "'onnxruntime') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no Triton or gateway started" in r.stdout
    assert "IMPORTED ['onnxruntime']" in r.stdout  # (machine_info reports its version; no session is made)
    assert not (tmp_path / "repo").exists()  # nothing exported
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["backend"] for r in result["rows"]} == {"pytorch-eager"}
    assert sorted(result["results"]["generator dcgan-baseline"]["pytorch-eager"], key=int) == ["1", "64", "256"]
    assert result["engines"] == {} and result["overhead_batch1"] is None
    assert set(result["concurrency"]["generate dcgan-baseline batch 1"]) == {"pytorch-eager"}


def test_device_argument_plumbing(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(bench, "run", lambda cfg: seen.setdefault("cfg", cfg))
    bench.main(["--device", "cuda", "--trt-cache-dir", str(tmp_path / "trt"), "--quick"])
    cfg = seen["cfg"]
    assert cfg.device == "cuda" and cfg.locust_time_s == bench.LOCUST_TIME_S_CUDA
    assert cfg.trt_cache_dir == tmp_path / "trt"
    assert bench.GatewayBenchConfig().locust_time_s == 0 and bench.GatewayBenchConfig(locust_time_s=5).locust_time_s == 5
    with pytest.raises(ValueError, match="device must be one of"):
        bench.GatewayBenchConfig(device="tpu")
    with pytest.raises(SystemExit):
        bench.main(["--device", "tpu"])  # argparse choices
    assert bench_triton.ort_providers("cpu") == ["CPUExecutionProvider"]
    assert bench_triton.ort_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = bench_triton.ort_providers("cuda", "onnxruntime-trt", tmp_path / "cache")
    assert trt[0][0] == "TensorrtExecutionProvider" and trt[0][1]["trt_fp16_enable"] is True
    assert trt[0][1]["trt_engine_cache_path"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()


def test_make_bench_passes_device():
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    r = subprocess.run([make, "-n", "-o", ".venv/.installed", "bench", "DEVICE=cuda", "BENCH_ARGS=--quick"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "-m loadtest.bench --device cuda --quick" in r.stdout
    r = subprocess.run([make, "-n", "-o", ".venv/.installed", "bench"], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=60)
    assert "-m loadtest.bench" in r.stdout and "--device" not in r.stdout


def test_engine_records_shown_in_the_markdown(tmp_path):
    """make bench shows each benchmarked model's engines.json: ms/sample per engine and batch, and which serves it."""
    from mnistgen import engine as eng

    d = tmp_path / "dcgan_generator" / "1"
    d.mkdir(parents=True)
    eng.write_record(d / eng.ENGINES_FILE, {
        "threshold": 64, "batches": [1, 64], "measured_by": "export", "measured_at": "2026-12-01T00:00:00+00:00",
        "ort_multithread_from": 4, "ms_per_sample": {"onnxruntime": {"1": 0.3, "64": 0.3},
                                                     "onnxruntime-1thread": {"1": 0.25, "64": 0.5},
                                                     "torchscript": {"1": 2.0, "64": 0.2}},
        "machine": {"threads": 2}})
    records = bench.engine_records(tmp_path, ("dcgan_generator", "ddpm_unet"))  # ddpm_unet: no record, left out
    assert list(records) == ["dcgan_generator"] and records["dcgan_generator"]["threads"] == 2
    assert records["dcgan_generator"]["ort_split_from"] is None  # a record from before the split column
    md = "\n".join(bench.engines_markdown(records))
    assert "| dcgan_generator | 1 | 0.3 | 0.25 | - | 2 | - | onnxruntime, 1 thread |" in md
    assert "| dcgan_generator | 64 | 0.3 | 0.5 | - | 0.2 | - | torchscript fp32 |" in md  # a record before bf16
    assert ("onnxruntime (1 thread below batch 4) for batch 1-63, torchscript from 64 (engines.json, 2 threads)"
            in md)
    assert bench.engines_markdown({}) == []
    record = eng.read_record(d / eng.ENGINES_FILE)
    record["ms_per_sample"]["torchscript-bf16"] = {"1": 1.5, "64": 0.1}
    record.update(threshold=16, torchscript_precision="bf16",
                  bf16={"native": True, "mean_abs_diff": 0.0011, "max_abs_diff": 0.12, "within_tolerance": True})
    eng.write_record(d / eng.ENGINES_FILE, record)
    md = "\n".join(bench.engines_markdown(bench.engine_records(tmp_path, ("dcgan_generator",))))
    assert "| dcgan_generator | 64 | 0.3 | 0.5 | - | 0.2 | 0.1 | torchscript bf16 |" in md
    assert "torchscript bf16 from 16 (engines.json, 2 threads)" in md and "mean |diff| 0.0011, max 0.12" in md


def test_split_engine_choice_shown_in_the_markdown(tmp_path):
    from mnistgen import engine as eng

    d = tmp_path / "ddpm_unet" / "1"
    d.mkdir(parents=True)
    eng.write_record(d / eng.ENGINES_FILE, {
        "threshold": None, "batches": [1, 4, 16], "measured_by": "export", "measured_at": "2026-12-02T00:00:00+00:00",
        "ort_multithread_from": 1, "ort_split_from": 4, "machine": {"threads": 2},
        "ms_per_sample": {"onnxruntime": {"1": 2.0, "4": 1.4, "16": 1.2}, "onnxruntime-1thread": {"1": 2.0, "4": 1.8},
                          "onnxruntime-split": {"1": 2.0, "4": 1.1, "16": 0.9}, "torchscript": {"16": 1.6}}})
    md = "\n".join(bench.engines_markdown(bench.engine_records(tmp_path, ("ddpm_unet",))))
    assert "| ddpm_unet | 1 | 2 | 2 | 2 | - | - | onnxruntime |" in md  # all threads from 1 row, split from 4
    assert "| ddpm_unet | 16 | 1.2 | - | 0.9 | 1.6 | - | onnxruntime, split |" in md
    assert ("onnxruntime (the batch split over 2 one-thread sessions from 4) at every batch size (engines.json, "
            "2 threads)" in md)


# -- Triton's own statistics: where a Triton-direct request's time goes ------------------------------------------


def test_triton_phases_arithmetic_and_markdown(rows):
    before = {"queue": 0, "compute_input": 0, "compute_infer": 0, "compute_output": 0, "count": 10}
    after = {"queue": 2_000_000, "compute_input": 1_000_000, "compute_infer": 30_000_000, "compute_output": 3_000_000,
             "count": 20}
    t = bench_triton.triton_phases(before, after)
    assert t == pytest.approx({"queue": 0.2, "compute_input": 0.1, "compute_infer": 3.0, "compute_output": 0.3})
    assert bench_triton.triton_phases(before, before) == {}  # nothing ran in between
    rows = rows + [row("generator dcgan-baseline", 64, "triton-grpc", [4.0, 4.0, 4.0], triton_ms=t)]
    res = bench.results_table(rows)
    assert res["generator dcgan-baseline"]["triton-grpc"]["64"]["triton_ms"] == t
    md = "\n".join(bench.triton_phases_markdown(res))
    assert "## Inside Triton" in md
    assert "| generator dcgan-baseline | 64 | 4 | 0.2 | 0.1 | 3 | 0.3 | 0.4 |" in md
    assert bench.triton_phases_markdown(bench.results_table(rows[:-1])) == []  # no statistics, no section


def test_bounds_section_arithmetic(rows):
    """Batch 1: what the served path spends outside the engine vs eager's call; the fast sampler's speed-up as the
    ratio of UNet evaluations x the ratio of per-evaluation costs."""
    g = "generator dcgan-baseline"
    t = {"queue": 0.1, "compute_input": 0.05, "compute_infer": 0.8, "compute_output": 0.05}
    rows = [r for r in rows if not (r["workload"] == g and r["batch"] == 1 and r["backend"] == "triton-grpc")]
    rows += [row(g, 1, "onnxruntime", [0.5] * 3), row(g, 1, "triton-grpc", [1.5] * 3, triton_ms=t)]
    cfg = bench.GatewayBenchConfig(generator_batches=(1, 64), denoise_batches=(1,))
    result = synthetic_result(rows, cfg, {})
    result["overhead_batch1"] = {"repeats": 10, "triton_p50_ms": 1.5, "gateway_p50_ms": 2.5, "overhead_p50_ms": 1.0,
                                 "triton_p99_ms": 2.0, "gateway_p99_ms": 3.0}
    md = "\n".join(bench.bounds_markdown(result))
    assert "the engine in-process (ONNX Runtime) takes 0.5 ms, the gateway path 2.5 ms" in md
    assert "the Triton gRPC hop 0.5, the gateway 1" in md  # 1.5 - (0.1 + 0.05 + 0.8 + 0.05)
    assert "outside the engine, 2 ms, is 1.00x eager PyTorch's whole call (2 ms)" in md
    # fixture: DDPM-100 600 ms for 100 evaluations, dpm-solver++ 20 steps 100 ms for 20
    assert "100 vs 20 UNet evaluations per request (5.00x), 6 vs 5 ms per evaluation" in md
    assert "speed-up 5.00 x 1.200 = 6.00x" in md
    assert "## What bounds" in bench.markdown(result)
    assert bench.bounds_markdown(synthetic_result([], cfg, {})) == []


def test_render_rewrites_the_markdown_from_the_json_alone(rows, tmp_path, capsys):
    cfg = bench.GatewayBenchConfig(generator_batches=(1, 64), denoise_batches=(1,))
    result = synthetic_result(rows, cfg, {})
    (tmp_path / "results.json").write_text(json.dumps(result))
    assert bench.main(["--render", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == bench.markdown(result)
    with pytest.raises(SystemExit):
        bench.main(["--render", "--out-dir", str(tmp_path / "none")])
    assert "does not exist; run the bench first" in capsys.readouterr().err


def test_results_record_paths_inside_the_repository_relative():
    assert repo_relative(REPO_ROOT / "bench") == "bench"
    assert repo_relative(Path("/tmp/elsewhere")) == "/tmp/elsewhere"


def test_timed_in_triton_reads_the_real_servers_statistics(triton):
    import numpy as np
    import tritonclient.grpc as grpcclient

    triton.require("dcgan_generator")
    client = triton.server.client()  # with the launch key: statistics are a restricted API
    dim = client.get_model_metadata("dcgan_generator").inputs[0].shape[-1]
    inp = grpcclient.InferInput("latent", [4, int(dim)], "FP32")
    inp.set_data_from_numpy(np.zeros((4, int(dim)), np.float32))
    times, phases = bench_triton.timed_in_triton(client, "dcgan_generator",
                                                 lambda: client.infer("dcgan_generator", [inp]), repeats=5, warmup=2)
    assert len(times) == 5 and set(phases) == set(bench_triton.TRITON_PHASES)
    assert all(v >= 0 for v in phases.values()) and phases["compute_infer"] > 0
    assert sum(phases.values()) <= max(times) * 1e3  # the server's share fits inside what the client waited
