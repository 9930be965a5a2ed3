"""Safetensors checkpoints that carry their own config, so export and serving rebuild models from the file alone."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .files import CHECKPOINT_DIR, REPO_ROOT  # noqa: F401  (re-exported)


def save_checkpoint(path: str | Path, modules: dict[str, dict[str, torch.Tensor]], config: dict) -> Path:
    """Several state dicts ({"generator": ..., "ema": ...}) in one safetensors file as `<module>.<param>`, with
    `config` (JSON-serialisable) as the metadata key "config"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{name}.{key}": t.detach().cpu().contiguous()
            for name, sd in modules.items() for key, t in sd.items() if isinstance(t, torch.Tensor)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(flat, str(tmp), metadata={"config": json.dumps(config, sort_keys=True)})
    tmp.replace(path)  # atomic: a crash mid-write never leaves a truncated checkpoint
    return path


def read_config(path: str | Path) -> dict:
    """Only the config (cheap: reads the header)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {e}") from None
    if "config" not in meta:
        raise ValueError(f"{path} has no 'config' metadata: not an mnistgen checkpoint")
    return json.loads(meta["config"])


def load_checkpoint(path: str | Path, module: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (tensors, config). With `module`, only that module's tensors with the prefix stripped."""
    config = read_config(path)
    tensors = load_file(str(path))
    if module is not None:
        prefix = module + "."
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not tensors:
            raise KeyError(f"{path} holds no module {module!r}")
    return tensors, config


def load_module(path: str | Path, module: str, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors of `module`, config) from a checkpoint whose config says it is a `kind` ("gan", "ddpm", ...)."""
    tensors, config = load_checkpoint(path, module)
    if config.get("kind") != kind:
        raise ValueError(f"{path} is a {config.get('kind')!r} checkpoint, not a {kind!r} one")
    return tensors, config


def split_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of the flattening in save_checkpoint."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        name, _, key = k.partition(".")
        out.setdefault(name, {})[key] = v
    return out
