"""Small torch.distributed helpers; every one is a no-op (or the identity) in a single process.

They keep cross-rank communication out of the model code: the codebooks call them
unconditionally and stay correct with or without a process group.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s value, in place; returns it."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> torch.nn.Module:
    """Overwrite `module`'s parameters and buffers on every rank with rank `src`'s, in place
    (for modules outside DDP, which would otherwise start from each rank's own init)."""
    if is_distributed():
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=src)
    return module


def _all_gather_padded(tensor: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Every rank's `tensor` (in rank order) and their first-dimension sizes.

    Ranks may hold different first-dimension sizes (e.g. a smaller last batch): sizes are
    gathered first and every tensor is padded to the largest, since collectives need equal
    shapes. All other dimensions must match.
    """
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.empty_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return [part[:count] for part, count in zip(gathered, counts)], counts


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0, in rank order (no gradient).

    Ranks may hold different first-dimension sizes; all other dimensions must match.
    """
    if not is_distributed():
        return tensor
    return torch.cat(_all_gather_padded(tensor)[0])


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: the gathered tensor (computed outside, passed in). Backward: the gradient of
    the whole gathered tensor is summed over ranks and each rank keeps the slice of its own
    part.

    The sum is what makes a loss on the global batch exact: rank r's loss also depends on
    the parts gathered from the other ranks, and only their owners can carry that gradient
    on into their encoders.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, gathered: torch.Tensor,  # type: ignore[override]
                start: int) -> torch.Tensor:
        ctx.start, ctx.count = start, local.shape[0]
        return gathered.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()  # all_reduce works in place on its own buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start:ctx.start + ctx.count], None, None


def all_gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Differentiable `all_gather_cat`: `(global tensor, offset of this rank's rows in it)`.

    For losses over the global batch (contrastive negatives from every rank). Every rank
    must call it, in the same order, and run the backward (which all-reduces the gradient).
    With each rank's loss the mean over its own rows against the global batch, DDP's
    gradient averaging then gives exactly the gradient of the global-batch loss (for equal
    per-rank batch sizes). Ranks may hold different first-dimension sizes. In a single
    process: `(tensor, 0)`, the identity.
    """
    if not is_distributed():
        return tensor, 0
    parts, counts = _all_gather_padded(tensor.detach())
    start = sum(counts[:rank()])
    return _AllGatherWithGrad.apply(tensor, torch.cat(parts), start), start


def barrier() -> None:
    """Wait for every rank."""
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------------------- process group
# Used by the training engine under torchrun (which sets WORLD_SIZE, RANK, LOCAL_RANK).

def export_submitit_env() -> None:
    """Inside a Slurm job started by submitit (config/hydra/launcher/slurm.yaml) with several
    tasks, set the env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) that torchrun
    would set. Does nothing under torchrun or outside such a job."""
    if (os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "WORLD_SIZE" not in os.environ
            and int(os.environ.get("SLURM_NTASKS", "1")) > 1):
        from submitit.helpers import TorchDistributedEnvironment
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def env_world_size() -> int:
    """World size announced by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    """This process's index on its node, as announced by torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_process_group(backend: str, device: torch.device) -> None:
    """Join torchrun's process group: NCCL on CUDA, gloo on CPU when `backend` is 'auto'."""
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, **kwargs)


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def any_true(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (one tiny all-reduce)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0],
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_true(flag: bool) -> bool:
    """True on every rank only if `flag` is true on every rank."""
    return not any_true(not flag)


def average_gradients_(params) -> None:
    """Average the gradients of parameters that no DDP wrapper reduces (in place)."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size()


def gather_to_main(obj):
    """Rank 0 gets the list of every rank's `obj` concatenated in rank order (`obj` is a
    list); other ranks get None. The identity in a single process."""
    if not is_distributed():
        return obj
    parts = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return [item for part in parts for item in part] if rank() == 0 else None


def assert_same_on_all_ranks(named_tensors) -> None:
    """Raise if any of `named_tensors` ((name, tensor) pairs) differs between ranks.

    Compares an exact float64 checksum per tensor (plain and position-weighted sums), so
    replicas that drifted apart - weights or codebooks - are named, not silently averaged.
    """
    if not is_distributed():
        return
    names, sums = [], []
    for name, tensor in named_tensors:
        flat = tensor.detach().double().flatten()
        position = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        names.append(name)
        sums.append(torch.stack([flat.sum(), (flat * position).sum()]))
    local = torch.stack(sums)
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    for other_rank, other in enumerate(gathered):
        differs = (other != local).any(dim=1).nonzero().flatten().tolist()
        if differs:
            raise RuntimeError(f"rank {rank()} and rank {other_rank} disagree on "
                               f"{[names[i] for i in differs[:5]]}: the replicas drifted apart.")
