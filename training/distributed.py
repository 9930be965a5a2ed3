"""Training across processes: torchrun's environment -> a process group, DDP wrapping, sharded sampling, rank-0 I/O.

`setup()` returns a single-process context (rank 0 of 1) under plain `python -m training.train_gan`; under `torchrun
--nproc-per-node N` it joins the process group (gloo on CPU, nccl on CUDA) and the trainers wrap their models in
DistributedDataParallel, split each global batch over the ranks (DistributedSampler, seeded with the run's seed: the
same optimisation as one process), init identically and draw noise with seed + rank, write from rank 0 only, and
check at the end that all replicas hold identical weights (`assert_replicas_identical`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


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

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each scalar averaged over all ranks (logged losses that stand for the whole global batch)."""
        if not self.enabled:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        if self.backend == "nccl":
            t = t.cuda(self.local_rank)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world_size).tolist()))

    def sampler(self, dataset, seed: int) -> DistributedSampler:
        """This rank's shard of a shuffled dataset (call set_epoch(e) every epoch for a new shuffle)."""
        return DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed,
                                  drop_last=True)

    def no_sync(self, module: nn.Module):
        """DDP's no_sync (accumulate gradients locally, all-reduce at the next synced backward); a no-op otherwise."""
        if isinstance(module, nn.parallel.DistributedDataParallel):
            return module.no_sync()
        return contextlib.nullcontext()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "cpu") -> DistContext:
    """Join torchrun's process group when WORLD_SIZE > 1 (backend by device: gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if device not in BACKENDS:
        raise ValueError(f"device must be one of {sorted(BACKENDS)} for a multi-process run, got {device!r}")
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


def broadcast_buffers(ctx: DistContext, module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training forward each rank holds the
    statistics of its own last batch; rank 0's are the ones its checkpoint keeps.
    """
    if ctx.enabled:
        for b in unwrap(module).buffers():
            dist.broadcast(b.data, src=0)


def assert_replicas_identical(ctx: DistContext, **modules: nn.Module) -> list[dict[str, str]]:
    """Every rank's weight digests ({name: sha256}, one dict per rank); raises unless all ranks agree.

    Buffers are first made rank 0's (broadcast_buffers), so what is compared is what the checkpoint holds.
    """
    for m in modules.values():
        broadcast_buffers(ctx, m)
    mine = {name: weights_digest(m) for name, m in modules.items()}
    if not ctx.enabled:
        return [mine]
    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            raise RuntimeError(f"replicas diverged: rank {ctx.rank} has {mine}, rank {rank} has {theirs}")
    return everyone
