"""Small torch.distributed helpers; every one is a no-op (or the identity) in a single process.

They keep cross-rank communication out of the model code: the codebooks call them
unconditionally and stay correct with or without a process group.
"""
from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator

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


def init_process_group(backend: str, device: torch.device, timeout_s: float) -> None:
    """Join torchrun's process group: NCCL on CUDA, gloo on CPU when `backend` is 'auto'.

    A collective that waits more than `timeout_s` seconds for another rank fails, so that a
    rank that stopped without a word (or got stuck) cannot hold the others for ever.
    """
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def any_true(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (one tiny all-reduce)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(*counts: int) -> list[int]:
    """Each of `counts` summed over all ranks, on every rank (one tiny all-reduce)."""
    if not is_distributed():
        return list(counts)
    t = torch.tensor(counts, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(c) for c in t.tolist()]


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


# ---------------------------------------------------------------------------- a rank stops
# Ranks leave word for each other in the process group's key-value store: where each one
# logs, and why one stopped. Under torchrun the launcher holds the store, so it outlives
# every rank; where it does not answer, the messages say less but the ranks still stop.

STORE_PREFIX = "encodec"
PEER_WORD_S = 2.0  # how long a rank whose collective broke waits for word from the others
# What a collective that broke because another rank went away says (gloo, NCCL); a
# torch.distributed.DistError is one too.
BROKEN_COLLECTIVE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                     "Timed out waiting", "/gloo/transport/", "NCCL communicator",
                     "remote process exited")


class PeerStopped(RuntimeError):
    """Another rank stopped, so this one cannot go on; the message names it and its log."""


def _store() -> dist.Store | None:
    """The process group's key-value store (torch has no public accessor), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no process group, or it is gone
        return None


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:1000]


def tell_log_file(path: str | Path) -> None:
    """Leave word of where this rank logs, for the message the others print if it stops."""
    store = _store() if is_distributed() else None
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(f"{STORE_PREFIX}/log/{rank()}", str(Path(path).resolve()))


def leave(error: BaseException) -> None:
    """Tell the other ranks why this one stops, then leave the process group at once: their
    collectives with this rank fail now, instead of after the timeout."""
    store = _store()
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(f"{STORE_PREFIX}/stopped/{rank()}", _one_line(error))
            store.add(f"{STORE_PREFIX}/stopped", 1)  # a round trip: the word is stored before we go
    destroy_process_group()


def is_broken_collective(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank went away or did
    not answer in time."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in BROKEN_COLLECTIVE)


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _peer_word(store: dist.Store) -> tuple[dict[int, str], list[int], dict[int, str]]:
    """(why each rank that left word stopped, the ranks never heard from, where ranks log).

    This rank says it is alive; the others whose collectives broke too say so within
    `PEER_WORD_S`. A rank that stopped with word wrote it before leaving, so it is there
    already; when one did, nobody else needs to be waited for.
    """
    me = rank()
    others = [r for r in range(world_size()) if r != me]
    store.set_timeout(timedelta(seconds=PEER_WORD_S))
    store.set(f"{STORE_PREFIX}/alive/{me}", "1")

    def word(kind: str, r: int) -> str | None:
        key = f"{STORE_PREFIX}/{kind}/{r}"
        return store.get(key).decode() if store.check([key]) else None

    reasons: dict[int, str] = {}
    alive: set[int] = set()
    deadline = time.monotonic() + PEER_WORD_S
    while True:
        for r in others:
            if r not in reasons and (reason := word("stopped", r)) is not None:
                reasons[r] = reason
            if word("alive", r) is not None:
                alive.add(r)
        silent = [r for r in others if r not in reasons and r not in alive]
        if reasons or not silent or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    logs = {r: path for r in others if (path := word("log", r)) is not None}
    return reasons, ([] if reasons else silent), logs


def explain_broken_collective(error: BaseException, timeout_s: float) -> str:
    """Which rank stopped, why (where it left word) and where its log is, as one line."""
    timed_out = "timed out" in str(error).lower()
    store = _store()
    try:
        reasons, silent, logs = _peer_word(store) if store else ({}, [], {})
    except Exception:  # the store went with the rank that held it
        reasons, silent, logs = {}, [], {}

    def where(ranks: list[int]) -> str:
        known = [logs[r] for r in ranks if r in logs]
        return f"; {'its log' if len(known) == 1 else 'their logs'}: {', '.join(known)}" \
            if known else ""

    if reasons:
        first = min(reasons)
        return f"{_ranks(sorted(reasons))} stopped ({reasons[first]}){where([first])}"
    if silent and timed_out:
        return (f"{_ranks(silent)} did not answer for {timeout_s:g} s (distributed.timeout_s): "
                f"stuck, or its node is unreachable{where(silent)}")
    if silent:
        return (f"{_ranks(silent)} stopped without a word (killed, e.g. out of memory, or its "
                f"node failed){where(silent)}")
    return f"a peer rank stopped (which one is unknown: {_one_line(error)})"


@contextlib.contextmanager
def leave_together(timeout_s: float, advice: str = "") -> Iterator[None]:
    """Around work that all ranks do together, a failure ends every rank promptly and says
    why.

    When this rank fails, it tells the others why and leaves the process group (`leave`),
    then the error goes on. When a collective breaks because another rank stopped, this
    rank raises `PeerStopped`: which rank stopped, why and where it logs, as far as known,
    then `advice`. Does nothing in a single process.
    """
    try:
        yield
    except Exception as error:
        if not is_distributed():
            raise
        if is_broken_collective(error):
            raise PeerStopped(f"{explain_broken_collective(error, timeout_s)}; rank {rank()} "
                              f"stops too{advice}") from error
        leave(error)
        raise
