"""Data-parallel training under ``torchrun``: DDP or FSDP2 (``fully_shard``), NCCL on GPUs, gloo on CPUs.

``structmat train`` is distributed when ``WORLD_SIZE > 1`` in the environment (as ``torchrun`` sets it). Semantics:
``batch_size`` is per process, so the global batch is ``batch_size * world_size * grad_accum`` sequences; every
process walks the same deterministic order of packed sequences and takes its own slice of each global batch, so
N processes with batch b see exactly the batches one process with batch N*b sees (tested: 2 gloo processes vs 1).
Rank 0 prepares the tokenizer and token cache first, writes checkpoints and results; every rank evaluates.
FSDP2 shards each decoder layer and the root; checkpoints always hold full (unsharded) tensors, gathered with
``torch.distributed.checkpoint.state_dict`` and written by rank 0, so a run can resume with a different world size
only if the batch settings keep the data position valid (checked on resume).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"          # none | ddp | fsdp
    owns_group: bool = False    # we initialized the process group (and destroy it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(parallel: str, device: str | None) -> tuple[DistInfo, torch.device]:
    """Read the torchrun environment; start the process group if needed; return (info, this process's device)."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world <= 1:
        return DistInfo(), want
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want.type == "cuda":
        want = torch.device("cuda", local_rank)
        torch.cuda.set_device(want)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo")
        owns = True
    if dist.get_world_size() != world:
        raise ValueError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} processes")
    return DistInfo(rank, world, local_rank, parallel, owns), want


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """The module to call for forward/backward: ``model`` itself, a DDP wrapper, or ``model`` sharded in place."""
    if not info.active:
        return model
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (info.world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def mean(value: float, info: DistInfo, device: torch.device) -> float:
    """The mean of a float over all processes (the value itself when not distributed)."""
    if not info.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
