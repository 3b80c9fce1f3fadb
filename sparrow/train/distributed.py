"""Process groups and model wrapping for multi-GPU runs under ``torchrun`` (DDP, or FSDP2's ``fully_shard``).

A single process (no ``WORLD_SIZE`` in the environment, or 1) runs the same code with ``world_size == 1`` and
no process group, so the trainer has one path.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL on GPUs,
    gloo on CPUs. ``device``: "auto" (cuda:LOCAL_RANK if CUDA is available, else cpu) or an explicit device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device == "auto":
        target = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device(f"cuda:{local_rank}")
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device: {device!r} asked for, but CUDA is not available")
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                device_id=target if target.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, target)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
        # DDP keeps the gloo group alive past destroy_process_group, so its worker threads outlive this call,
        # and one may still be letting go of the last collectives' works, whose Python-owned tensors it must
        # take the GIL to free. If the interpreter is finalizing by then, CPython ends that thread with
        # pthread_exit inside torch's noexcept frames and the process aborts ("terminate called without an
        # active exception": rank 1 of finished 2-process CPU runs, ~3% of them). A short sleep hands the
        # GIL over while the interpreter is still whole, so those frees run first.
        time.sleep(0.05)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """DDP or FSDP2 around ``model`` (unchanged in a single process). Both average gradients over ranks."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per decoder layer, so only one layer's full parameters are gathered at a time; the
        # root unit holds the embeddings, final norm and (possibly tied) LM head.
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"train.distributed: must be 'ddp' or 'fsdp', got {strategy!r}")


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce for micro-batches before the last of an accumulation step."""
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The SparrowForCausalLM under DDP and torch.compile wrappers (FSDP2 shards in place: no wrapper)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
