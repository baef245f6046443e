"""Distributed runs (torchrun): process-group set-up and the cross-rank consistency check."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from torch import nn

from .errors import TrainingError, UserError
from .layers import masked_modules

__all__ = ["DistInfo", "init_distributed", "pick_device", "check_ranks_consistent", "has_bn_stats", "bn_stats",
           "load_bn_stats"]


class DistInfo(SimpleNamespace):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device_arg: str | None) -> str:
    """``--device``, default ``cuda`` when a GPU is visible; asking for CUDA without one is a :class:`UserError`."""
    want = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(want)
    except RuntimeError:
        raise UserError(f"--device {want}: not a device torch knows; use cpu, cuda or cuda:N") from None
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {want}: CUDA is not available on this machine; use --device cpu")
    return want


def init_distributed(device_arg: str | None) -> DistInfo:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE: NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(pick_device(device_arg))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if attempt != "0" and "MASTER_ADDR" in os.environ:
            # After a torchrun restart the standalone agent's store still holds the dead workers' addresses; a
            # key prefix per attempt keeps the new workers from dialling them.
            from datetime import timedelta

            from torch.distributed.rendezvous import _create_c10d_store

            store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world,
                                       timedelta(minutes=30))
            store = torch.distributed.PrefixStore(f"sparsity/attempt_{attempt}", store)
            torch.distributed.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
        else:
            torch.distributed.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """Position-weighted sum: cheap, and differs when entries move (a plain sum would not notice a swap)."""
    flat = t.detach().flatten().double()
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).remainder(9973) + 1
    return (flat * weights).sum()


def _is_bn_stat(name: str) -> bool:
    return "running_mean" in name or "running_var" in name  # the buffers timm's distribute_bn synchronises


def has_bn_stats(model: nn.Module) -> bool:
    return any(_is_bn_stat(n) for n, _ in model.named_buffers())


def bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's batch-norm running statistics by name, copied to the CPU (empty for a model without BN)."""
    return {n: b.detach().cpu().clone() for n, b in model.named_buffers() if _is_bn_stat(n)}


@torch.no_grad()
def load_bn_stats(model: nn.Module, stats: dict[str, torch.Tensor]) -> None:
    buffers = dict(model.named_buffers())
    for name, t in stats.items():
        buffers[name].copy_(t)


@torch.no_grad()
def check_ranks_consistent(model: nn.Module, dist: DistInfo, weights: bool = False, bn: bool = False) -> int:
    """Compare checksums of every mask (and with ``weights``, every parameter; with ``bn``, every batch-norm
    running statistic) across ranks.

    Divergence is an error naming the first differing tensor. Returns the number of tensors compared.
    """
    named = [(f"{fqn}.weight_mask", layer.weight_mask) for fqn, layer in masked_modules(model)]
    if weights:
        named += list(model.named_parameters())
    if bn:
        named += [(n, b) for n, b in model.named_buffers() if _is_bn_stat(n)]
    if not named:
        return 0
    local = torch.stack([_checksum(t) for _, t in named]).cpu()
    lo, hi = local.clone(), local.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    bad = (hi - lo).abs() > 1e-9 * hi.abs().clamp_min(1.0)
    if bool(bad.any()):
        name = named[int(bad.nonzero()[0])][0]
        raise TrainingError(f"ranks diverged at {name}; every rank must hold identical masks and weights "
                            "(same seed, same recipe, no per-rank edits)")
    return len(named)
