"""FID over training: score a GAN's checkpoints along its run and plot the curve.

    python -m training.experiments.fid_history CHECKPOINT... [--out reports/gan/fid_history.json] [--from-json]

Each checkpoint is scored like `python -m training.evaluate --model CHECKPOINT` and merged into the JSON by
iterations (one already there, same sha256 and settings, is not scored again); the table (.md) and the plot (.png,
with the goal line from the floor of --goals) are rendered from the JSON. quality_goals quotes the last stretch.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mnistgen import catalog
from mnistgen.checkpoint import CHECKPOINT_DIR, read_config
from mnistgen.files import repo_path, sha256
from mnistgen.registry import CLASSIFIER_CHECKPOINT, resolve
from ..evaluate import EvalConfig, evaluate
from ..plots import figure
from . import sweep

KEEP = ("fid", "fid_sd", "coverage", "kl_uniform", "num_samples")
GOALS_JSON = "reports/quality/goals.json"
POSITIONAL = ("checkpoints",)


@dataclass
class Config:
    checkpoints: list[str] = field(default_factory=list)  # GAN checkpoints (names or .safetensors paths) to score
    out: str = "reports/gan/fid_history.json"  # merged into; .md and .png beside it
    num_samples: int = 10000
    seed: int = 0
    threads: int = 2
    goal_x: float = 9.0  # the FID goal as a multiple of the floor (issue 13: dcgan-baseline <= 9x)
    goals: str = GOALS_JSON  # quality_goals' JSON, whose floor row sets the goal line
    from_json: bool = False  # only re-render the .md and .png from the JSON

    def __post_init__(self):
        if not self.checkpoints and not self.from_json:
            raise ValueError("name at least one checkpoint to score, or --from-json to re-render")


def paths(cfg: Config) -> tuple[Path, Path]:
    return repo_path(cfg.out), repo_path(cfg.out).with_suffix(".md")


def load_points(path: Path) -> list[dict]:
    return sweep.load(path, {"points": []})["points"]


def describe_training(config: dict) -> dict:
    """The training facts of a GAN checkpoint's config that a point shows."""
    s, t = config.get("summary", {}), config.get("train", {})
    if "iterations" not in s:
        raise ValueError("the checkpoint's config has no summary.iterations: not a GAN trainer's checkpoint")
    return {"iterations": int(s["iterations"]), "train_min": round(s.get("train_time_s", 0.0) / 60, 1),
            "name": config.get("name", ""), "lr_g": t.get("lr_g"), "lr_decay_from": t.get("lr_decay_from"),
            "max_iters": t.get("max_iters"), "real_label": t.get("real_label"), "g_ema": t.get("g_ema")}


def measure(cfg: Config) -> dict:
    """Merge the scores of cfg.checkpoints into the JSON's points (sorted by iterations)."""
    classifier_sha = sha256(CHECKPOINT_DIR / CLASSIFIER_CHECKPOINT)
    points = {json.dumps(p["key"], sort_keys=True): p for p in load_points(repo_path(cfg.out))}
    def point(path: Path, config: dict, key: dict) -> dict:
        m = evaluate(EvalConfig(model=str(path), num_samples=cfg.num_samples, seed=cfg.seed, threads=cfg.threads))
        return {**describe_training(config), **{k: m[k] for k in KEEP}, "key": key}

    todo = []
    for name in cfg.checkpoints:
        path = resolve(name)
        config = read_config(path)
        if config.get("kind") != catalog.GAN:
            raise ValueError(f"{path} is a {config.get('kind')!r} checkpoint; fid_history scores GAN generators")
        key = {"sha256": sha256(path), "num_samples": cfg.num_samples, "seed": cfg.seed,
               "classifier_sha256": classifier_sha}  # what a point's figures depend on
        if json.dumps(key, sort_keys=True) in points:
            print(f"[{path.name}] already scored", flush=True)
            continue
        todo.append((json.dumps(key, sort_keys=True), lambda p=path, c=config, k=key: point(p, c, k)))
    points.update(sweep.cells(todo, desc="fid history"))
    return {"about": __doc__.split("\n\n")[0],
            "points": sorted(points.values(), key=lambda p: (p["iterations"], p["key"]["sha256"]))}


def last_stretch(points: list[dict]) -> dict | None:
    """How FID moved between the last two points (by iterations), or None with fewer than two."""
    if len(points) < 2:
        return None
    a, b = sorted(points, key=lambda p: p["iterations"])[-2:]
    sds = [p.get("fid_sd") for p in (a, b)]
    return {"from_iterations": a["iterations"], "to_iterations": b["iterations"], "from_fid": a["fid"],
            "to_fid": b["fid"], "change": b["fid"] / a["fid"] - 1.0,
            "minutes": round(b["train_min"] - a["train_min"], 1),
            # two independent draws' FIDs differ by less than this ~95 % of the time (2 sd of the difference)
            "noise": 2 * (sds[0] ** 2 + sds[1] ** 2) ** 0.5 if None not in sds else None}


def within_noise(stretch: dict) -> bool:
    return stretch.get("noise") is not None and abs(stretch["from_fid"] - stretch["to_fid"]) < stretch["noise"]


def _goal(cfg: Config) -> tuple[float | None, float | None]:
    """(the floor FID of --goals, the goal line: goal_x times it), None where --goals has no floor."""
    floor = sweep.load(repo_path(cfg.goals), {}).get("rows", {}).get("floor", {}).get("fid")
    return floor, None if floor is None else cfg.goal_x * floor


def markdown(data: dict, cfg: Config) -> str:
    """The table from the JSON alone (and the floor of --goals)."""
    points, (floor, goal) = data["points"], _goal(cfg)
    if not points:
        raise ValueError(f"{cfg.out} holds no points: score some checkpoints first")
    stretch = last_stretch(points)
    return sweep.page(
        "fid_history", json=Path(cfg.out).name, n=points[-1]["num_samples"],
        goal=f"; goal {cfg.goal_x:g}x the floor {floor:.3f} = **{goal:.2f}**" if goal is not None else "",
        table=sweep.table("iterations | training min | FID | ± sd | x goal | coverage | KL | stage",
                          "---:|---:|---:|---:|---:|---:|---:|---",
                          [[p["iterations"], f"{p['train_min']:g}", f"{p['fid']:.2f}", f"{p['fid_sd']:.2f}",
                            f"{p['fid'] / goal:.2f}" if goal else "-", p["coverage"], f"{p['kl_uniform']:.4f}",
                            f"{p['name']}, lr {p['lr_g']:g}" + (f", decay from {p['lr_decay_from']}"
                                                                if p.get("lr_decay_from") is not None else "")
                            + (f", to {p['max_iters']}" if p.get("max_iters") else "")] for p in points]),
        stretch="" if not stretch else
        f"\n\nLast stretch: {stretch['from_iterations']} -> {stretch['to_iterations']} iterations "
        f"({stretch['minutes']:g} min of training): FID {stretch['from_fid']:.2f} -> {stretch['to_fid']:.2f} "
        f"({100 * stretch['change']:+.0f} %)" + (
            f", within the noise of the draw (2 sd of the difference, counting the two draws as independent: "
            f"{stretch['noise']:.2f})." if within_noise(stretch) else "."))


def figures(data: dict, cfg: Config) -> None:
    """The .png beside the JSON: FID (± sd, log scale) against iterations, and the goal line."""
    points, (_, goal) = data["points"], _goal(cfg)
    with figure(repo_path(cfg.out).with_suffix(".png"), figsize=(7, 3.8)) as (fig, ax):
        ax.errorbar([p["iterations"] for p in points], [p["fid"] for p in points], yerr=[p["fid_sd"] for p in points],
                    marker="o", capsize=3, label="FID (± bootstrap sd)")
        for p in points:
            ax.annotate(f"{p['fid']:.1f}", (p["iterations"], p["fid"]), textcoords="offset points", xytext=(4, 6),
                        fontsize=7)
        if goal is not None:
            ax.axhline(goal, color="C2", linestyle="--", label=f"goal: {cfg.goal_x:g}x floor = {goal:.2f}")
        ax.set(yscale="log", xlabel="training iterations", ylabel="FID (log scale)", title="FID over training")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper right", fontsize=8)


if __name__ == "__main__":
    sys.exit(sweep.main(sys.modules[__name__]))
