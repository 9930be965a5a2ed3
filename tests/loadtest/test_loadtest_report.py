"""loadtest/report.py on synthetic CSVs: percentiles, per-sample latency, throughput and errors (pure logic)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from loadtest import report
from loadtest.report import CSV_COLUMNS  # never import the locustfile here: it gevent-patches the process


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        w.writerows(rows)
    return path


@pytest.fixture
def synthetic(tmp_path):
    """100 gRPC generate requests of 4 samples with latencies 1..100 ms sent 0.1 s apart, 10 HTTP denoise
    requests of 2 samples at 0.25 ms each, and 2 failed HTTP denoise requests."""
    rows = [(f"{1000.0 + 0.1 * i:.6f}", "grpc", "generate", "Generate dcgan-baseline n=4", f"{i + 1:.4f}", 4, 1, "")
            for i in range(100)]
    rows += [(f"{1000.0 + 0.5 * i:.6f}", "http", "denoise", "Denoise dpm-solver++-20 n=2", "0.2500", 2, 1, "")
             for i in range(10)]
    rows += [("1001.000000", "http", "denoise", "Denoise dpm-solver++-20 n=2", "3.0000", 2, 0, "HTTP 503: busy")] * 2
    return write_csv(tmp_path / "requests.csv", rows)


def test_percentiles_match_numpy_linear_interpolation():
    v = np.arange(1, 101, dtype=float)  # 1..100
    p = report.percentiles(v)
    assert p == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01}, abs=1e-9)
    assert all(np.isnan(x) for x in report.percentiles(np.array([])).values())


def test_summaries_per_request_and_per_sample(synthetic):
    r = report.read_requests(synthetic)
    assert len(r) == 112
    rows = {s.group: s for s in report.summaries(r)}
    g = rows["grpc generate"]
    assert (g.requests, g.errors, g.samples) == (100, 0, 400)
    assert g.request_ms == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01}, abs=1e-6)
    # per-sample latency is latency / 4 for every request
    assert g.sample_ms == pytest.approx({"p50": 50.5 / 4, "p90": 90.1 / 4, "p99": 99.01 / 4}, abs=1e-6)
    # first send at 1000.0, last answer at 1009.9 + 0.100 s
    assert g.duration_s == pytest.approx(10.0, abs=1e-6)
    assert g.samples_per_s == pytest.approx(40.0, rel=1e-6)
    assert g.requests_per_s == pytest.approx(10.0, rel=1e-6)

    d = rows["http denoise"]
    assert (d.requests, d.errors, d.samples) == (12, 2, 20)  # failed requests count no samples
    assert d.sample_ms["p50"] == pytest.approx(0.125, abs=1e-9)  # sub-millisecond values are kept unrounded
    assert d.request_ms["p99"] == pytest.approx(0.25, abs=1e-9)  # failures are not in the latency figures

    a = rows["all"]
    assert (a.requests, a.errors, a.samples) == (112, 2, 420)
    assert rows["grpc Generate dcgan-baseline n=4"].requests == 100
    assert report.error_counts(r) == {"HTTP 503: busy": 2}


def test_write_report_outputs(synthetic, tmp_path):
    out = tmp_path / "out"
    report.write_report(synthetic, out)
    md = (out / "summary.md").read_text()
    assert "| grpc generate | 100 | 0 |" in md and "2 x `HTTP 503: busy`" in md
    data = json.loads((out / "summary.json").read_text())
    assert data["groups"][0]["group"] == "all" and data["errors"] == {"HTTP 503: busy": 2}
    for png in ("latency_over_time.png", "latency_hist.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_columns_and_bad_group(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        report.read_requests(p)
    with pytest.raises(ValueError, match="must be one of"):
        report.group_keys(report.read_requests(write_csv(tmp_path / "e.csv", [])), "model")
