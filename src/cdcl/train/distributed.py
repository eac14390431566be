"""torch.distributed helpers: init under torchrun (gloo on CPU, NCCL on GPU), rank queries, reductions.

Without torchrun (no ``WORLD_SIZE`` in the environment, or 1) everything degrades to a single
process and the reductions are no-ops, so the trainer has one code path.

Why timm is imported here, before any process group exists: timm imports
``torch.distributed.fsdp``, whose ``ShardedGradScaler.__init__`` takes ``dist.group.WORLD`` as a
default argument, evaluated once at import. Imported after ``init_process_group`` it pins the
default group for the life of the interpreter, so ``destroy_process_group`` cannot free it; gloo's
worker threads then outlive ``main`` and, when one of them drops its last finished collective
during interpreter shutdown, it needs the GIL that is being torn down and the process aborts
(``terminate called without an active exception``, SIGABRT). Imported first, the default is None.
"""

from __future__ import annotations

import os
from datetime import timedelta

import timm  # noqa: F401  (must precede init_process_group, see the module docstring)
import torch
import torch.distributed as dist

from cdcl.errors import CdclError


def is_dist() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0)."""
    return rank() == 0


def init(device_pref: str = "auto") -> torch.device:
    """Initialise the process group when launched by torchrun and return this process's device."""
    want_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise CdclError("train.device=cuda but no CUDA device is available; use train.device=auto")
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1 and not dist.is_initialized():
        backend = "nccl" if want_cuda else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    if want_cuda:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device_pref not in ("auto", "cpu"):
        return torch.device(device_pref)
    return torch.device("cpu")


def cleanup(barrier: bool = True) -> None:
    """Tear down the process group once every process has finished with it.

    The barrier keeps a fast process from destroying its end while a peer is still inside a
    collective; ``destroy_process_group`` then frees the group and joins gloo's worker threads
    (see the module docstring for what kept them alive before). On an error path pass
    ``barrier=False``: the peers may be waiting in another collective, and a failing process
    must exit so that torchrun stops the others rather than wait for them.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_dist():
        dist.barrier()


def all_reduce_mean_grads(params: list[torch.nn.Parameter]) -> None:
    """Average gradients across processes in one flat buffer (what DDP would do)."""
    if not is_dist():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    n = world_size()
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= n
        offset = 0
        for g in group:
            k = g.numel()
            g.copy_(flat[offset : offset + k].view_as(g))
            offset += k


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of floats over processes (identity in a single process)."""
    if not is_dist():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def all_reduce_mean_dict(logs: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over processes (keys sorted so every rank reduces the same order)."""
    if not is_dist() or not logs:
        return dict(logs)
    keys = sorted(logs)
    sums = all_reduce_sum([float(logs[k]) for k in keys], device)
    n = world_size()
    return {k: s / n for k, s in zip(keys, sums)}


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process."""
    if not is_dist():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def gather_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """Every process's copy of a same-shaped tensor (a list of one without torch.distributed)."""
    if not is_dist():
        return [t]
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return out
