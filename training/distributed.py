"""Training runs, one process or under torchrun (DDP, sharded batches, rank-0 writes, a replica check at the end):
the epoch loop, resume state and process group both trainers share. A plain `python -m` run is rank 0 of 1."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
DEVICES = ("auto", *BACKENDS)  # auto = cuda when available, else cpu


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device of this rank: cuda:<local_rank> for a CUDA run, else what `name` says."""
        if self.enabled and name == "cuda":
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def local_batch(self, global_batch: int) -> int:
        """Per-process share of a global batch; it must divide evenly so one step means the same in any layout."""
        if global_batch % self.world_size:
            raise ValueError(f"batch_size {global_batch} must be divisible by the number of processes "
                             f"({self.world_size}): each process takes batch_size / world_size")
        return global_batch // self.world_size

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel around `module` in a multi-process run; the module itself otherwise."""
        if not self.enabled:
            return module
        ids = [self.local_rank] if self.backend == "nccl" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def all_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each scalar averaged over all ranks (logged losses that stand for the whole global batch)."""
        if not self.enabled:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        if self.backend == "nccl":
            t = t.cuda(self.local_rank)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world_size).tolist()))

    def sampler(self, dataset, seed: int) -> DistributedSampler | None:
        """This rank's shard of a shuffled dataset (set_epoch(e) every epoch: a new shuffle); None in one process."""
        if not self.enabled:
            return None
        return DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed,
                                  drop_last=True)

    def no_sync(self, module: nn.Module):
        """DDP's no_sync (accumulate gradients locally, all-reduce at the next synced backward); a no-op otherwise."""
        if isinstance(module, nn.parallel.DistributedDataParallel):
            return module.no_sync()
        return contextlib.nullcontext()

    def close(self) -> None:
        """Wait for every rank (rank 0 may still be writing), then leave the process group."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def resolve_device(name: str) -> str:
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def setup(device: str = "cpu") -> DistContext:
    """Join torchrun's process group when WORLD_SIZE > 1 (backend by device: gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), BACKENDS[device])
    if ctx.backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(ctx.backend, rank=ctx.rank, world_size=world, timeout=timedelta(minutes=10))
    return ctx


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (its state_dict has no `module.` prefix)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers, in state_dict order (equal digests = identical weights)."""
    h = hashlib.sha256()
    for name, t in unwrap(module).state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def assert_replicas_identical(ctx: DistContext, **modules: nn.Module) -> list[dict[str, str]]:
    """Every rank's weight digests ({name: sha256}, one dict per rank); raises unless all ranks agree."""
    # DDP broadcasts buffers (BatchNorm statistics) before each forward, so after the last one each rank holds its
    # own batch's; rank 0's are what its checkpoint keeps: make them everyone's, then compare
    for b in (b for m in modules.values() for b in unwrap(m).buffers() if ctx.enabled):
        dist.broadcast(b.data, src=0)
    mine = {name: weights_digest(m) for name, m in modules.items()}
    if not ctx.enabled:
        return [mine]
    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            raise RuntimeError(f"replicas diverged: rank {ctx.rank} has {mine}, rank {rank} has {theirs}")
    return everyone


class Trainer:
    """What the GAN and DDPM trainers share (device and ranks, run_dir, epoch loop, loss CSV, state.pt, replica check);
    subclasses build models and `loader` (make_loader), and fill train_batch, end_epoch, state_objects and replicas."""

    counter = "step"  # the attribute counting training steps, state.pt's key for it (training.recipe reads it)
    budget = "max_steps"  # the config field that bounds it (the learning-rate plan's end), 0/None = no bound
    csv_name = "loss.csv"  # the history as CSV in run_dir

    def __init__(self, cfg, run_dir: str | Path):
        self.cfg = cfg  # threads, device, seed, epochs, batch_size, stop_at and `budget` are read from it
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        self.dist = setup(device)
        self.is_main = self.dist.is_main
        self.device = self.dist.device(device)
        self.run_dir = Path(run_dir)
        if self.is_main:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights
        self.shuffle = torch.Generator().manual_seed(cfg.seed)  # the epochs' order in a one-process run
        self.epoch, self.elapsed, self.history = 0, 0.0, {}  # history: {column: [value per logged row]}
        setattr(self, self.counter, 0)

    @property
    def count(self) -> int:
        return getattr(self, self.counter)

    def make_loader(self, dataset, drop_last: bool = True) -> DataLoader:
        """Batches of `dataset` (global batch_size): shuffled by self.shuffle, or this rank's shard under torchrun."""
        self.sampler = self.dist.sampler(dataset, self.cfg.seed)
        return DataLoader(dataset, batch_size=self.dist.local_batch(self.cfg.batch_size), sampler=self.sampler,
                          shuffle=self.sampler is None, drop_last=drop_last or self.sampler is not None,
                          generator=self.shuffle)

    def seed_ranks(self, offset: int = 0) -> None:
        """Under torchrun, from here on each rank draws its own noise."""
        if self.dist.enabled:
            torch.manual_seed(self.cfg.seed + self.dist.rank + offset)

    def reached_stop(self) -> bool:
        return any(n and self.count >= n for n in (getattr(self.cfg, self.budget), self.cfg.stop_at))

    def log(self, **row) -> dict:
        for k, v in row.items():
            self.history.setdefault(k, []).append(v)
        return row

    def train(self) -> dict:
        """Train the epochs left (a resumed run may be done), then finish; returns the summary."""
        while self.epoch < self.cfg.epochs and not self.reached_stop():
            t0 = time.perf_counter()
            if self.sampler is not None:
                self.sampler.set_epoch(self.epoch)  # a new shuffle per epoch, the same on every rank
            bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", leave=False, mininterval=10,
                       disable=not self.is_main)
            for batch in bar:
                bar.set_postfix(self.train_batch(batch), refresh=False)
                setattr(self, self.counter, self.count + 1)
                if self.reached_stop():
                    break
            self.epoch += 1
            self.elapsed += time.perf_counter() - t0
            line = self.end_epoch()  # on every rank (it may average over them); rank 0 alone writes
            if self.is_main:
                with open(self.run_dir / self.csv_name, "w", newline="") as f:
                    csv.writer(f).writerows([list(self.history), *zip(*self.history.values())])
                self.save_state()
                print(line, flush=True)
            if self.stop_early():
                break
        return self.finish()

    def stop_early(self) -> bool:
        return False

    def summary(self) -> dict:
        return {"train_time_s": round(self.elapsed, 1), "epochs": self.epoch, f"{self.counter}s": self.count,
                "world_size": self.dist.world_size, "images_seen": self.count * self.cfg.batch_size}

    def finish(self) -> dict:
        """Every rank: the replicas must agree (raises otherwise); rank 0 writes what the run ends with."""
        summary = {**self.summary(), "replica_digests": assert_replicas_identical(self.dist, **self.replicas())}
        if self.is_main:
            self.write_final(summary)
        self.dist.close()
        return summary

    def write_final(self, summary: dict) -> None:
        pass

    def save_state(self) -> None:
        torch.save({**{k: o.state_dict() for k, o in self.state_objects().items()},
                    "epoch": self.epoch, self.counter: self.count, "elapsed": self.elapsed, "history": self.history,
                    "rng": torch.get_rng_state(), "shuffle": self.shuffle.get_state()}, self.run_dir / "state.pt")

    def load_state(self) -> dict | None:
        """Continue from state.pt; returns what it held (None without one: nothing changes)."""
        path = self.run_dir / "state.pt"
        if not path.exists():
            return None
        s = torch.load(path, weights_only=False, map_location=self.device)
        for k, o in self.state_objects().items():
            if s.get(k) is not None:
                o.load_state_dict(s[k])
        self.epoch, self.elapsed, self.history = s["epoch"], s["elapsed"], s["history"]
        setattr(self, self.counter, s[self.counter])
        torch.set_rng_state(s["rng"].cpu())
        self.shuffle.set_state(s["shuffle"].cpu())
        self.seed_ranks(1_000_003 * self.count)  # rank 0 saved its own RNG; every rank goes on from a seed of its own
        return s
