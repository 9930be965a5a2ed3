"""loadtest/bench.py's result tables and goal arithmetic on synthetic rows (pure logic; the real run is `make bench`)."""
from __future__ import annotations

import pytest

from loadtest import bench


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
    assert g.measured == pytest.approx(0.6) and g.met
    g = by_start("dpm-solver++:20 speed-up")
    assert g.measured == pytest.approx(6.0) and g.met
    g = by_start("gateway-grpc p50 overhead")
    assert g.measured == pytest.approx(1.5) and g.unit == "ms" and g.met


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
