"""Controlled-failure runs: tiny budgets write JSON entries, the markdown comes from the JSON only, verdict rules and
the D train-vs-held-out gap behave as documented, unknown runs are refused."""
import json
import math

import pytest
import torch
from torch import nn

from training.experiments import controlled_failures as cf
from training.experiments import sweep
from training.experiments.controlled_failures import Config as ControlledConfig
from training.experiments.controlled_failures import RUNS, discriminator_gap, markdown, parse_runs, verdict


def run(cfg):
    return sweep.run(cf, cfg)


def main(argv):
    return sweep.main(cf, argv)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tmp_path, **kw) -> ControlledConfig:
    base = dict(max_iters=2, num_samples=50, data_source="embedded", threads=1, runs_dir=str(tmp_path / "runs"),
                out_dir=str(tmp_path / "out"))
    return ControlledConfig(**{**base, **kw})


# ------------------------------------------------------------ tiny real runs

@pytest.fixture(scope="module")
def measured(tmp_path_factory, one_torch_thread):
    """Two tiny runs (one with the D gap), then one of them again with another budget."""
    tmp = tmp_path_factory.mktemp("controlled")
    first = run(_cfg(tmp, runs="d-overfit,mode-collapse"))
    first = json.loads(json.dumps(first))  # a snapshot: the JSON as it was after the first call
    second = run(_cfg(tmp, runs="mode-collapse", max_iters=3))
    return tmp, first, second


def test_tiny_runs_write_one_entry_each(measured):
    tmp, first, second = measured
    on_disk = json.loads((tmp / "out" / "controlled_failures.json").read_text())
    assert on_disk == second
    assert list(first["runs"]) == ["mode-collapse", "d-overfit"]  # RUNS order, whatever the --runs order
    for name, r in first["runs"].items():
        assert r["name"] == name and r["iterations"] == 2 and r["max_iters"] == 2
        assert r["data_source"] == "embedded" and r["metrics"]["num_samples"] == 50
        assert set(r["losses"]) == {"final_loss_d", "final_loss_g", "min_loss_d", "min_loss_g"}
        assert all(math.isfinite(v) for v in r["losses"].values())
        assert r["losses"]["min_loss_d"] <= r["losses"]["final_loss_d"]
        assert 0 <= r["metrics"]["coverage"] <= 10 and r["metrics"]["fid"] > 0
        assert r["train_wall_s"] > 0 and r["measured_at"] and r["machine"]["torch_threads"] == 1
        assert r["command"].startswith("python -m training.experiments.controlled_failures --runs " + name)
        assert r["run_dir"].endswith(name) and (tmp / "runs" / name / "generator.safetensors").exists()
        assert r["verdict"]["thresholds"] == cf.thresholds()
    gap = first["runs"]["d-overfit"]["d_gap"]
    assert gap["n_seen"] == gap["n_unseen"] == 1000 and gap["gap"] == pytest.approx(
        gap["seen_mean"] - gap["unseen_mean"])
    assert first["runs"]["d-overfit"]["data_limit"] == 1000
    assert first["runs"]["mode-collapse"]["d_gap"] is None
    assert first["runs"]["d-overfit"]["train_config"]["epochs"] == 1  # ceil(2 / 10 iterations per epoch)


def test_rerun_replaces_its_entry_only(measured):
    _, first, second = measured
    assert list(second["runs"]) == ["mode-collapse", "d-overfit"]
    assert second["runs"]["d-overfit"] == first["runs"]["d-overfit"]
    assert second["runs"]["mode-collapse"]["iterations"] == 3
    assert "--max-iters 3" in second["runs"]["mode-collapse"]["command"]


def test_markdown_renders_the_json_numbers(measured):
    tmp, _, second = measured
    md = (tmp / "out" / "controlled_failures.md").read_text()
    assert md == markdown(second)
    for name, r in second["runs"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert f"{r['metrics']['fid']:.1f} (50)" in row
        assert f"{r['losses']['final_loss_d']:.3g}" in row and r["verdict"]["text"] in row
        assert f"{r['metrics']['pairwise_distance']:.3f}" in row
    assert "biased upwards" in md and "controlled_failures.json" in md


def test_from_json_rerenders_edited_numbers(measured, tmp_path):
    _, _, second = measured
    edited = json.loads(json.dumps(second))
    r = edited["runs"]["d-overfit"]
    r["metrics"]["fid"], r["metrics"]["coverage"], r["losses"]["final_loss_d"] = 987.64, 7, 0.0000123
    r["d_gap"]["gap"], r["iterations"], r["verdict"]["text"] = 0.4321, 4242, "VERDICT-FROM-JSON"
    out = tmp_path / "out"
    out.mkdir()
    (out / "controlled_failures.json").write_text(json.dumps(edited))
    run(ControlledConfig(out_dir=str(out), from_json=True, runs="no-such-run"))  # --runs is ignored here
    row = next(line for line in (out / "controlled_failures.md").read_text().splitlines()
               if line.startswith("| d-overfit |"))
    for text in ("987.6 (50)", "| 7 |", "1.23e-05", "+0.432", "4,242", "VERDICT-FROM-JSON"):
        assert text in row, (text, row)


def test_from_json_without_json_is_an_error(tmp_path, capsys):
    assert main(["--from-json", "--out-dir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_empty_json_renders_a_placeholder():
    md = markdown(cf.empty_result())
    assert "No run measured yet" in md and "| run |" not in md


# ------------------------------------------------------------ run names

def test_unknown_run_is_refused_with_the_allowed_list(tmp_path, capsys):
    with pytest.raises(ValueError, match="allowed runs are vanishing-gradient, vanishing-gradient\\+all"):
        parse_runs("mode-collapse,baseline")
    assert main(["--runs", "mode-colapse", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'mode-colapse'" in err and all(n in err for n in RUNS)
    assert not (tmp_path / "controlled_failures.json").exists()


def test_run_names_and_descriptions():
    assert RUNS == ("vanishing-gradient", "vanishing-gradient+all", "mode-collapse", "mode-collapse+all",
                    "d-overfit", "d-overfit+all")
    assert parse_runs(" d-overfit, d-overfit ,mode-collapse+all") == ["d-overfit", "mode-collapse+all"]
    assert cf.describe("vanishing-gradient") == "lr_d=0.002 (x10), g_loss=saturating"
    assert cf.describe("mode-collapse+all") == "lr_g=0.002 (x10) + all mitigations"
    assert cf.describe("vanishing-gradient+all") == (
        "lr_d=0.002 (x10), g_loss=saturating + all mitigations (g_loss -> non-saturating)")
    assert cf.describe("d-overfit") == "data_limit=1000"


def test_train_config_applies_mitigations_and_never_checkpoints(tmp_path):
    tc = cf.train_config("vanishing-gradient+all", _cfg(tmp_path))
    mitigated = (tc.g_loss, tc.real_label, tc.d_steps, tc.instance_noise, tc.d_dropout)
    assert mitigated == ("non-saturating", 0.9, 2, 0.1, 0.4)
    assert tc.lr_d == 2e-3 and tc.max_iters == 2 and tc.checkpoint is None and tc.name == "vanishing-gradient+all"
    with pytest.raises(ValueError, match="checkpoints"):
        cf.train_config("mode-collapse", _cfg(tmp_path, runs_dir="checkpoints"))


# ------------------------------------------------------------ verdict rules (pure)

def test_collapse_rules():
    assert verdict("mode-collapse", 3, 0.35, 0.7)["collapsed"]  # coverage <= 3
    assert not verdict("mode-collapse", 4, 0.35, 0.7)["collapsed"]
    assert verdict("mode-collapse", 10, 0.199, 0.7)["collapsed"]  # pairwise < 0.2
    assert not verdict("mode-collapse", 10, 0.2, 0.7)["collapsed"]
    v = verdict("mode-collapse", 1, 0.12, 0.7)
    assert v["failure_present"] and v["text"].startswith("failure reproduced: collapsed")
    assert "coverage 1 <= 3" in v["text"] and "pairwise 0.120 < 0.2" in v["text"]
    v = verdict("mode-collapse", 10, 0.37, 0.72)
    assert not v["failure_present"]
    assert v["text"] == "failure not reproduced (no collapse: coverage 10 > 3, pairwise 0.370 >= 0.2); no other symptom"


def test_saturation_rules():
    v = verdict("vanishing-gradient", 1, 0.12, 8.7e-6)
    assert v["d_saturated"] and v["collapsed"] and v["expected_symptom"] == "d_saturated"
    assert v["text"].startswith("failure reproduced:") and "final D loss 8.7e-06 < 0.01" in v["text"]
    assert not verdict("vanishing-gradient", 9, 0.37, 0.01)["d_saturated"]  # 0.01 is not below 0.01
    assert verdict("vanishing-gradient+all", 9, 0.37, 0.4)["text"] == (
        "mitigated (no D saturation: final D loss 0.4 >= 0.01); no other symptom")
    assert verdict("vanishing-gradient+all", 9, 0.37, 0.001)["text"].startswith("not mitigated: D saturated")
    v = verdict("vanishing-gradient+all", 1, 0.1, 0.4)  # the symptom is gone, another one is not
    assert v["text"].startswith("mitigated (no D saturation") and "; but collapsed (coverage 1 <= 3" in v["text"]
    assert verdict("mode-collapse", 10, 0.37, 0.001)["text"] == (
        "failure not reproduced (no collapse: coverage 10 > 3, pairwise 0.370 >= 0.2); "
        "but D saturated (final D loss 0.001 < 0.01)")


def test_overfit_rules():
    assert verdict("d-overfit", 10, 0.36, 0.5, d_gap=0.1)["d_overfits"]  # at the threshold
    v = verdict("d-overfit", 10, 0.36, 0.5, d_gap=0.099)
    assert v["d_overfits"] is False
    assert v["text"].startswith("failure not reproduced (no D overfitting: gap +0.099 < 0.1)")
    v = verdict("d-overfit+all", 10, 0.36, 0.5, d_gap=0.45)
    assert v["text"] == "not mitigated: D overfits (train-vs-held-out gap +0.450 >= 0.1)"
    v = verdict("d-overfit", 10, 0.36, 0.5)
    assert v["d_overfits"] is None and v["text"] == "D overfitting not measured"
    assert verdict("d-overfit", 1, 0.36, 0.5)["text"] == "D overfitting not measured; collapsed (coverage 1 <= 3)"
    assert verdict("mode-collapse", 10, 0.36, 0.5)["d_overfits"] is None
    with pytest.raises(ValueError, match="allowed runs"):
        verdict("baseline", 10, 0.36, 0.5)


# ------------------------------------------------------------ the D gap

class MeanD(nn.Module):
    """logit = k * mean pixel: all-white images score sigmoid(k), all-black sigmoid(-k)."""

    def __init__(self, k: float):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))

    def forward(self, x):
        return self.k * x.flatten(1).mean(1)


def test_gap_of_a_known_d():
    white, black = torch.ones(30, 1, 28, 28), -torch.ones(20, 1, 28, 28)
    g = discriminator_gap(MeanD(3.0), white, black, batch_size=7)
    assert g["seen_mean"] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), abs=1e-6)
    assert g["gap"] == pytest.approx(math.tanh(1.5), abs=1e-6)  # sigmoid(3) - sigmoid(-3)
    assert (g["n_seen"], g["n_unseen"]) == (30, 20)
    assert discriminator_gap(MeanD(3.0), white, white)["gap"] == 0.0


def test_gap_uses_batch_stats_without_dropout_and_leaves_d_untouched():
    torch.manual_seed(0)
    d = nn.Sequential(nn.Conv2d(1, 4, 3, 2), nn.BatchNorm2d(4), nn.LeakyReLU(0.2), nn.Dropout(0.9),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1), nn.Flatten(0)).eval()
    before = {k: v.clone() for k, v in d.state_dict().items()}
    seen, unseen = torch.rand(40, 1, 28, 28) * 2 - 1, torch.rand(40, 1, 28, 28) * 2 - 1
    a, b = discriminator_gap(d, seen, unseen, batch_size=10), discriminator_gap(d, seen, unseen, batch_size=10)
    assert a == b  # dropout off: deterministic
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in before.items())  # running stats untouched
    assert not d.training  # the caller's mode too
    with pytest.raises(ValueError, match="at least one"):
        discriminator_gap(d, seen[:0], unseen)


def test_a_mitigated_run_whose_base_did_not_fail_says_it_proves_nothing(measured):
    _, _, second = measured
    edited = json.loads(json.dumps(second))
    runs = {"mode-collapse": edited["runs"]["d-overfit"], "mode-collapse+all": edited["runs"]["d-overfit"]}
    runs = json.loads(json.dumps(runs))
    runs["mode-collapse"]["verdict"]["failure_present"] = False
    md = markdown({**edited, "runs": runs})
    row = next(line for line in md.splitlines() if line.startswith("| mode-collapse+all |"))
    assert "mode-collapse without mitigations did not fail either" in row
    runs["mode-collapse"]["verdict"]["failure_present"] = True
    md = markdown({**edited, "runs": runs})
    assert "did not fail either" not in md
