"""Data-parallel training under ``torchrun`` (DDP semantics, done by hand for a tiny hypernet).

Every rank holds the whole hypernet and draws the *same* batch as a single process would (the batch
is a pure function of ``(seed, step)``); rank ``r`` of ``W`` runs only its contiguous slice of the
batch's concepts (:func:`concept_slice`), scales its loss by its share of the batch, and the ranks'
gradients are summed (:func:`all_reduce_grads`) before clipping and the optimizer step. The result
equals one process running the whole batch, up to float summation order; the optimizer states stay
identical on every rank, so any rank's checkpoint is the run's. Only rank 0 writes files.

Why not ``torch.nn.parallel.DistributedDataParallel``: the hypernet is called once per step on a
handful of embeddings, gradients are small (a few MB), and wrapping it would rename every key of the
checkpoint (``module.``) that the single-process files and ``--resume`` rely on. The all-reduce is
the same collective DDP issues.

    torchrun --nproc_per_node 8 trainer/train.py --backend comfy --model ... --concepts-per-step 16

gloo on CPU, nccl on GPU (each rank on ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from hypertransport_core.errors import HyperTransportError


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(backend: str | None = None) -> bool:
    """Join the process group torchrun describes (env ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Picks nccl when CUDA is available (and pins ``cuda:LOCAL_RANK``), gloo otherwise. Returns whether
    a group is active. A no-op for a single process.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return active()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def cleanup() -> None:
    if active():
        dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard() -> tuple[int, int] | None:
    """``(rank, world_size)`` in a multi-process group, else ``None``."""
    return (rank(), world_size()) if active() else None


def concept_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)`` of ``n`` batch concepts for ``rank``: contiguous, disjoint, sizes differ by at most one."""
    if world > n:
        raise HyperTransportError(f"{world} processes for {n} concepts per step: every process needs at least one concept. "
                         "Fix: raise --concepts-per-step to at least the number of processes.")
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def all_reduce_grads(module: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """Sum every parameter's gradient and the loss over the ranks (in one flat buffer). Returns the summed loss."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0])])
    if dist.get_backend() == "nccl" and flat.device.type != "cuda":  # the hypernet may live on the CPU
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.to(grads[0].device)
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i : i + n].view_as(p).clone()
        i += n
    return flat[-1].clone()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop at the same step)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. fills a cache); the others wait, then run it (reading the cache)."""
    if not active():
        yield
        return
    if not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_main():
            dist.barrier()
