"""Several processes under torchrun (DistributedDataParallel): rank and world, agreement between ranks, and
every rank's random-number state. With one process (no torchrun) each function is a no-op or returns its input."""

from __future__ import annotations

import os

import torch

from capcli.console import err
from capcli.model import checkpoint


def setup_distributed(device: str) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), world


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def mean_over_ranks(value: float, world: int, device: str) -> float:
    """The same number on every rank, so early-stopping decisions can never diverge."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item() / world


def all_equal_checksums(model: torch.nn.Module, world: int) -> list[float]:
    """Sum of all parameters on every rank: DDP ranks must hold identical weights."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    if world == 1:
        return [total.item()]
    gathered = [torch.zeros_like(total) for _ in range(world)]
    torch.distributed.all_gather(gathered, total.to(next(model.parameters()).device))
    return [g.item() for g in gathered]


def gather_rng_states(world: int) -> list[dict]:
    """Every rank's random number generator states, in rank order (saved with each checkpoint)."""
    state = checkpoint.rng_state()
    if world == 1:
        return [state]
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def restore_rng_states(ckpt: dict, rank: int, world: int) -> None:
    states = ckpt.get("rng")
    if isinstance(states, list) and len(states) == world:
        checkpoint.restore_rng_state(states[rank])
    elif rank == 0:
        err.print("note: the checkpoint has no random-number state for this many processes, so the resumed "
                  "run will not exactly repeat an uninterrupted one")
