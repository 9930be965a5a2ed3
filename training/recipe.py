"""Run a committed training recipe (training/recipes/<name>.json: the stages of resumed runs behind a checkpoint) as one
resumable command: each pending stage runs its trainer with `--resume --run-dir RUN_DIR --stop-at UNTIL --checkpoint
OUT`; a stage is done once state.pt has reached its `until`. The checkpoint's config records the recipe at the end."""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mnistgen.checkpoint import REPO_ROOT, load_checkpoint, read_config, save_checkpoint, split_modules

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
# trainer -> (module, the count its state.pt keeps: the trainer class's `counter`)
TRAINERS = {"gan": ("training.train_gan", "iteration"), "ddpm": ("training.train_ddpm", "step")}
# set by the runner for every stage; a recipe that sets them itself would fight it
RUNNER_OPTIONS = ("--resume", "--run-dir", "--stop-at", "--checkpoint")


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Stage:
    until: int  # the run's iteration (GAN) / step (DDPM) count when the stage is done
    args: tuple[str, ...]
    why: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    trainer: str
    args: tuple[str, ...]
    stages: tuple[Stage, ...]
    description: str = ""

    def argv(self, stage: Stage, run_dir: Path, checkpoint: Path, extra: list[str]) -> list[str]:
        """The trainer's arguments for `stage` (after `python -m training.train_<trainer>`)."""
        return [*self.args, *stage.args, *extra, "--resume", "--run-dir", str(run_dir),
                "--stop-at", str(stage.until), "--checkpoint", str(checkpoint)]

    def to_dict(self) -> dict:
        return {"name": self.name, "trainer": self.trainer, "args": list(self.args),
                "stages": [{"until": s.until, "args": list(s.args), **({"why": s.why} if s.why else {})}
                           for s in self.stages]}


def _strings(value, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise RecipeError(f"{where} must be a list of strings, got {value!r}")
    clash = [a for a in value if a.split("=")[0] in RUNNER_OPTIONS]
    if clash:
        raise RecipeError(f"{where}: {clash} are set by the recipe runner for every stage; remove them")
    return tuple(value)


def parse_recipe(data: dict, name: str) -> Recipe:
    """A Recipe from its JSON object; RecipeError names what is wrong."""
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {name!r}: expected a JSON object, got {type(data).__name__}")
    unknown = set(data) - {"description", "trainer", "args", "stages"}
    if unknown:
        raise RecipeError(f"recipe {name!r}: unknown keys {sorted(unknown)}")
    trainer = data.get("trainer")
    if trainer not in TRAINERS:
        raise RecipeError(f"recipe {name!r}: trainer must be one of {sorted(TRAINERS)}, got {trainer!r}")
    raw = data.get("stages")
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"recipe {name!r}: stages must be a non-empty list")
    stages, last = [], 0
    for i, s in enumerate(raw, 1):
        if not isinstance(s, dict) or set(s) - {"until", "args", "why"}:
            raise RecipeError(f"recipe {name!r} stage {i}: expected an object with until, args and why, got {s!r}")
        until = s.get("until")
        if not isinstance(until, int) or isinstance(until, bool) or until <= last:
            raise RecipeError(f"recipe {name!r} stage {i}: until must be an integer above the last stage's "
                              f"({last}), got {until!r}")
        stages.append(Stage(until, _strings(s.get("args", []), f"recipe {name!r} stage {i} args"),
                            str(s.get("why", ""))))
        last = until
    return Recipe(name, trainer, _strings(data.get("args", []), f"recipe {name!r} args"), tuple(stages),
                  str(data.get("description", "")))


def available() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def load_recipe(name_or_path: str) -> Recipe:
    """A committed recipe by name (training/recipes/NAME.json) or a recipe file's path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = RECIPE_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise RecipeError(f"unknown recipe {name_or_path!r}: expected one of {available()} or a .json path")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise RecipeError(f"recipe {path}: not valid JSON ({e})") from None
    return parse_recipe(data, path.stem)


def progress(recipe: Recipe, run_dir: Path) -> int:
    """Iterations (GAN) / steps (DDPM) the run in run_dir has done: 0 without a state.pt."""
    path = run_dir / "state.pt"
    if not path.exists():
        return 0
    import torch

    return int(torch.load(path, weights_only=False, map_location="cpu")[TRAINERS[recipe.trainer][1]])


def plan_lines(recipe: Recipe, done: int) -> list[str]:
    unit = TRAINERS[recipe.trainer][1] + "s"
    lines = [f"recipe {recipe.name} ({recipe.trainer}): {len(recipe.stages)} stages, {done} of "
             f"{recipe.stages[-1].until} {unit} done"]
    start = 0
    for i, s in enumerate(recipe.stages, 1):
        state = "done" if s.until <= done else ("running next" if start <= done else "pending")
        lines.append(f"  {i}. {start:>6} -> {s.until:<6} {state:<12} {shlex.join(s.args)}"
                     + (f"  # {s.why}" if s.why else ""))
        start = s.until
    return lines


def stage_command(recipe: Recipe, stage: Stage, run_dir: Path, checkpoint: Path, extra: list[str],
                  nproc: int) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    return [*launcher, "-m", TRAINERS[recipe.trainer][0], *recipe.argv(stage, run_dir, checkpoint, extra)]


def run(recipe: Recipe, run_dir: Path, checkpoint: Path, extra: list[str] | None = None, nproc: int = 1,
        runner=subprocess.run) -> int:
    """Run the pending stages in order; returns the count reached. A stage that fails raises RecipeError."""
    extra = list(extra or [])
    done = progress(recipe, run_dir)
    todo = [s for s in recipe.stages if s.until > done]
    if not todo:
        print(f"recipe {recipe.name}: all {len(recipe.stages)} stages done ({done}); nothing to run", flush=True)
    for stage in todo:
        i = recipe.stages.index(stage) + 1
        cmd = stage_command(recipe, stage, run_dir, checkpoint, extra, nproc)
        print(f"== recipe {recipe.name} stage {i}/{len(recipe.stages)}: {done} -> {stage.until}"
              + (f" ({stage.why})" if stage.why else "") + f"\n   {shlex.join(cmd)}", flush=True)
        rc = runner(cmd, cwd=REPO_ROOT).returncode
        if rc != 0:
            raise RecipeError(f"recipe {recipe.name} stage {i} failed (exit {rc}); fix it and run the same "
                              f"command again to continue from {run_dir / 'state.pt'}")
        reached = progress(recipe, run_dir)
        if reached < stage.until:  # e.g. the trainer's epochs or time budget ran out first
            raise RecipeError(f"recipe {recipe.name} stage {i} stopped at {reached} of {stage.until}: the "
                              f"trainer's own limit (--epochs, --time-budget-min) ended it first; raise it")
        done = reached
    entry = {**recipe.to_dict(), "reached": done}  # into the checkpoint's config, the tensors kept
    if checkpoint.exists():
        if read_config(checkpoint).get("recipe") != entry:  # (a finished recipe run again: the file stays as it is)
            tensors, config = load_checkpoint(checkpoint)
            save_checkpoint(checkpoint, split_modules(tensors), {**config, "recipe": entry})
        print(f"recipe {recipe.name}: {done} reached; checkpoint {checkpoint}", flush=True)
    return done


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(options, extra trainer arguments); nproc_per_node stays a string until checked (a k8s Job passes it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help=f"a committed recipe ({', '.join(available())}) or a .json path")
    p.add_argument("--run-dir", help="where state.pt, logs and grids go (default runs/recipes/<recipe>)")
    p.add_argument("--checkpoint", help="the checkpoint to write (default <run-dir>/<recipe>.safetensors; the "
                   "committed one under checkpoints/ is left alone unless you name it)")
    p.add_argument("--nproc-per-node", default="1", help="> 1: run each stage under torchrun with this many processes")
    p.add_argument("--plan", action="store_true", help="print the stages and which are done; run nothing")
    p.add_argument("--list", action="store_true", help="list the committed recipes")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    a, extra = parse_args(argv)
    if a.list or not a.recipe:
        for name in available():
            print(f"{name}: {load_recipe(name).description}")
        return 0
    try:
        recipe = load_recipe(a.recipe)
        _strings(extra, "extra trainer arguments")
        if not a.nproc_per_node.isdigit() or int(a.nproc_per_node) < 1:
            raise RecipeError(f"--nproc-per-node must be an integer >= 1, got {a.nproc_per_node!r}")
        # absolute: the stages run from the repository root
        run_dir = Path(a.run_dir).resolve() if a.run_dir else REPO_ROOT / "runs" / "recipes" / recipe.name
        checkpoint = Path(a.checkpoint).resolve() if a.checkpoint else run_dir / f"{recipe.name}.safetensors"
        if a.plan:
            print("\n".join(plan_lines(recipe, progress(recipe, run_dir))))
            return 0
        run(recipe, run_dir, checkpoint, extra, int(a.nproc_per_node))
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
