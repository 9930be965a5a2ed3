"""The mixed-load scenario (loadtest/mixed.py, Locust's mixed users) and the diffusion models' compute isolation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import mixed, report
from mnistgen import catalog

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGES = REPO_ROOT / "reports" / "bench"
TINY = dict(phase_s=1.0, flood_clients=(2,), flood_samples=2, flood_steps=2, timeout_s=30.0)


@pytest.mark.parametrize("stem, render", [("mixed", mixed.markdown), ("isolation", mixed.isolation_markdown)])
def test_committed_page_is_rendered_from_its_json(stem, render):
    result = json.loads((PAGES / f"{stem}.json").read_text())
    assert (PAGES / f"{stem}.md").read_text() == render(result), f"re-render: python -m loadtest.mixed --render" \
                                                                   f"{' --isolation' if stem == 'isolation' else ''}"


def phase(name: str, gan: dict | None = None, flood: dict | None = None, clients: int = 0) -> dict:
    cell = lambda codes, sps: {"clients": 1, "requests": sum(codes.values()), "p50_ms": 1.0,  # noqa: E731
                               "p99_ms": 2.0, "requests_per_s": sps, "samples_per_s": sps, "codes": codes}
    return {"phase": name, "flood_clients": clients, **({"gan": cell(*gan)} if gan else {}),
            **({"flood": cell(*flood)} if flood else {})}


def test_goals_read_the_figures():
    phases = [phase("gan alone", ({"200": 9}, 9.0)),
              phase("flood 2 alone", flood=({"200": 4}, 10.0), clients=2),
              phase("gan + flood 2", ({"200": 9}, 9.0), ({"200": 3, "429": 1}, 8.0), clients=2),
              phase("flood 8 alone", flood=({"200": 4}, 10.0), clients=8),
              phase("gan + flood 8", ({"200": 8, "504": 1}, 9.0), ({"200": 3, "504": 1}, 7.9), clients=8)]
    met = {g["goal"]: g["met"] for g in mixed.goals(phases)}
    assert met == {"GAN p99 beside 2 flood clients": True, "GAN answers beside 2 flood clients": True,
                   "flood samples/s beside the GAN, 2 clients": True, "flood codes, 2 clients": True,
                   "GAN p99 beside 8 flood clients": False, "GAN answers beside 8 flood clients": False,
                   "flood samples/s beside the GAN, 8 clients": False, "flood codes, 8 clients": False}


def test_http_codes_map_grpc_names_as_the_http_api():
    r = {"ok": 3, "error_codes": {"RESOURCE_EXHAUSTED": 2, "DEADLINE_EXCEEDED": 1, "TimeoutError": 1}}
    assert mixed.http_codes(r) == {"200": 3, "429": 2, "504": 1, "TimeoutError": 1}


def test_variant_repository_sets_only_the_diffusion_models_parameters(tmp_path):
    gan, ddpm = mixed.isolation_models(mixed.MixedConfig())
    repo = mixed.variant_repository(REPO_ROOT / "model_repository", tmp_path / "repo", (gan, ddpm), 7, 1)
    assert mixed.isolation_setting(repo) == {ddpm: {"nice": 7, "threads": 1}}
    assert (repo / gan / "config.pbtxt").read_text() == (REPO_ROOT / "model_repository" / gan / "config.pbtxt").read_text()
    for f in (REPO_ROOT / "model_repository" / ddpm / "1").iterdir():
        if f.is_file():  # engines records copied (a re-measure stays here), the rest linked
            assert (repo / ddpm / "1" / f.name).is_symlink() == (f.suffix != ".json"), f


def stub_niceness(triton) -> dict[str, set[int]]:
    """{Triton model: the nice values of every thread of its python-backend stub processes}."""
    out: dict[str, set[int]] = {}
    repo = str(triton.server.config.model_repository)
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            model = next((a.decode()[len(repo) + 1:].split("/")[0] for a in cmd if a.decode().startswith(repo + "/")
                          and a.endswith(b"/model.py")), None)
            if model is None or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != triton.server.proc.pid:
                continue
            for task in (proc / "task").iterdir():  # field 19 of stat: nice
                out.setdefault(model, set()).add(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
        except (OSError, ValueError):
            continue  # a process that ended meanwhile
    return out


def test_diffusion_instances_run_at_their_configured_niceness(triton):
    gan, ddpm = mixed.isolation_models(mixed.MixedConfig())
    triton.require(gan, ddpm)
    want = mixed.isolation_setting(REPO_ROOT / "model_repository")
    nice = stub_niceness(triton)
    assert nice.get(gan) == {0}, nice
    for m in set(want) & set(triton.models):
        assert nice.get(m) == {want[m]["nice"]}, (m, nice)


def test_tiny_mixed_run_records_every_phase_and_code(ready_gateway, triton, tmp_path):
    triton.require(catalog.GANS[catalog.DEFAULT_MODEL].triton, "ddpm_generate", catalog.DENOISER.triton)
    cfg = mixed.MixedConfig(**TINY)
    clients: list = []
    try:
        phases = mixed.run_phases(cfg, *mixed.gateway_calls(cfg, ready_gateway.http_target, clients), cfg.flood_clients)
    finally:
        for c in clients:
            c.close()
    assert [p["phase"] for p in phases] == ["gan alone", "flood 2 alone", "gan + flood 2"]
    assert [sorted(k for k in ("gan", "flood") if k in p) for p in phases] == [["gan"], ["flood"], ["flood", "gan"]]
    for p in phases:
        for k in ("gan", "flood"):
            if k in p:
                c = p[k]
                assert c["requests"] >= 1 and sum(c["codes"].values()) == c["requests"], (p["phase"], k, c)
                assert c["codes"].get("200", 0) >= 1, (p["phase"], k, c)
    assert phases[1]["flood"]["samples_per_s"] == pytest.approx(phases[1]["flood"]["requests_per_s"] * 2)
    result = {"config": mixed.relative_paths(mixed.asdict(cfg)), "isolation": mixed.isolation_setting(cfg.model_repository),
              "phases": phases, "goals": mixed.goals(phases)}
    assert len(result["goals"]) == 4
    page = mixed.markdown(json.loads(json.dumps(result)))
    assert all(f"| {p['phase']} |" in page for p in phases)
    mixed.plot(result, tmp_path / "mixed.png")
    assert (tmp_path / "mixed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_locust_mixed_users_record_both_classes(ready_gateway, triton, tmp_path):
    triton.require(catalog.GANS[catalog.DEFAULT_MODEL].triton, "ddpm_generate", catalog.DENOISER.triton)
    raw = tmp_path / "requests.csv"
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless",
           "-u", "3", "-r", "3", "-t", "5s", "--stop-timeout", "30", "--only-summary", "--http-host",
           ready_gateway.http_url, "--raw-csv", str(raw), "--flood-samples", "2", "--flood-steps", "2",
           "MixedGanUser", "DiffusionFloodUser"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = report.read_requests(raw)
    assert r.ok.all(), report.error_counts(r)
    names = set(r.name)
    assert f"Generate {catalog.DEFAULT_MODEL} n=1" in names, names
    assert {f"Generate {catalog.DENOISER.name} ddpm-2 n=2", "Denoise ddpm-2 n=2"} <= names, names


def test_locust_flood_option_out_of_range_names_the_limit(tmp_path):
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless",
           "-u", "1", "-t", "1s", "--raw-csv", str(tmp_path / "r.csv"), "--flood-samples", "65", "DiffusionFloodUser"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"--flood-samples: must be in 1..{catalog.DENOISER.max_samples}" in proc.stderr, proc.stderr[-2000:]


def test_flooding_clients_wait_out_retry_after():
    """closed_loop(backoff=True): after an error carrying retry_after a client waits (to the end of the run here)
    instead of resending at once; serving.client.ClientError reads Retry-After."""
    from loadtest.load import closed_loop
    from serving.client import ClientError

    def make_call():
        def call(i):
            raise ClientError("RESOURCE_EXHAUSTED", "busy", 429, None, "30")
        return call

    assert ClientError("X", "m", 429, None, "30").retry_after == 30.0
    assert ClientError("X", "m", 429, None, None).retry_after is None
    polite = closed_loop(make_call, 2, seconds=0.5, backoff=True)
    assert polite["requests"] == 2 and polite["error_codes"] == {"RESOURCE_EXHAUSTED": 2}
    assert closed_loop(make_call, 2, seconds=0.5)["requests"] > 2  # without backoff: resent at once
