"""The distributed context from torchrun's environment: one process per GPU (or CPU process under gloo).

torchrun --standalone --nproc_per_node 8 -m training ...            one node
torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 --nproc_per_node 8 -m training
rn50 train ...                                                       no torchrun: world_size 1, no process group
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class DeviceError(RuntimeError):
    """The device asked for is not there; one line saying what to check."""


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """auto: this process's GPU (LOCAL_RANK) if CUDA is there, else the CPU; cuda; cuda:N (one GPU, benchmarks); cpu."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {requested} was asked for but torch sees no CUDA device (check nvidia-smi and "
            "that torch is a CUDA build), or pass --device cpu"
        )
    if requested.startswith("cuda:"):
        return torch.device(requested)
    return torch.device("cuda", local_rank)


def init_distributed(requested_device: str = "auto") -> DistContext:
    """Read RANK/LOCAL_RANK/WORLD_SIZE (torchrun sets them), pin the GPU, join the group: nccl on CUDA, gloo on CPU."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            device_id=device if device.type == "cuda" else None,
            store=_attempt_store(rank, world_size),
            rank=rank,
            world_size=world_size,
        )
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def _attempt_store(rank: int, world_size: int) -> dist.Store:
    """torchrun's store, with keys of this restart attempt only.

    Under `torchrun --max-restarts`, restarted workers join the same agent-hosted store; the keys the previous
    attempt's process group wrote there (each rank's gloo address, NCCL's unique id) are still in it, and a new
    group that reads them connects to processes that are gone: refused, or waiting 30 minutes (seen with gloo on
    torch 2.14). A prefix per TORCHELASTIC_RESTART_COUNT gives each attempt fresh keys."""
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", rank, world_size))
    return dist.PrefixStore(f"rn50/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks, in place; a no-op on one process."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's value of `obj` on every rank (e.g. a run name made from the clock)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(
    ctx: DistContext,
    action: Callable[[], object],
    failure: Callable[[Exception], str | None],
    error: type[Exception],
) -> None:
    """Rank 0 runs `action` (the others do not); when it raises an exception that `failure` turns into a one-line
    message, every rank raises `error(message)` together. For what only rank 0 does but every rank must stop on
    (writing a checkpoint, taking the run's lock, opening the logs): the others would otherwise wait for rank 0 in
    their next collective. An exception `failure` does not describe (None) propagates on rank 0 as it is."""
    message = None
    if ctx.is_main:
        try:
            action()
        except Exception as e:
            message = failure(e)
            if message is None:
                raise
    message = broadcast_object(message, ctx)
    if message:
        raise error(message)


def all_gather_object(obj, ctx: DistContext, group=None) -> list:
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def cpu_group(ctx: DistContext):
    """A process group for small host-side agreements (stop flags, RNG states), or None without DDP.

    Under NCCL it is a separate gloo group: a CPU tensor can be all-reduced there without waiting for the GPU, so
    polling a flag every step costs a network round trip (tens of microseconds within a node) and no device sync.
    Under gloo (CPU training) the default group already is one. Every rank must call this, in the same order."""
    if not ctx.distributed:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def all_reduce_max_cpu(values: list[int], ctx: DistContext, group) -> list[int]:
    """Element-wise max of small integer flags over ranks, on the host (see cpu_group)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts them before each forward, so
    after the last training step each rank holds its own; evaluation and checkpoints should agree with rank 0."""
    if ctx.distributed:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def barrier(ctx: DistContext, group=None) -> None:
    if ctx.distributed:
        dist.barrier(group=group)
