"""Data-parallel training on ``torch.distributed``: one process per device, one global batch.

A run is defined by its *global* batch: batch ``n`` is a pure function of the seed and the
step, and rank ``r`` of ``W`` trains on rows ``[r·B/W, (r+1)·B/W)`` of it (``shard``). Every
rank starts from the same seeded weights; after ``loss.backward()`` each rank's gradient is
the gradient of the mean over its slice, and ``sync_grads`` replaces it by the mean over
ranks, which is the gradient of the mean over the whole global batch. Adam then takes the
same step on every rank, so the replicas stay equal, and equal to a single process training
on the global batch up to float rounding (tests/test_distributed.py: max |Δ weight| ≤ 1e-5
after 50 steps). Since nothing depends on W but the split, a checkpoint saved with W ranks
resumes on any W' that divides the global batch.

Exact only for losses that are means over samples of per-sample terms (MSE, l1, tanh, l0,
pre-activation penalties; ReLU, JumpReLU and per-sample TopK activations). BatchTopK picks
its top ``k·B`` over the local batch, and AuxK divides by the local residual's energy, so
those differ from a single process on the global batch by more than rounding.

Without ``torchrun`` (no ``RANK``/``WORLD_SIZE`` in the environment) every function here is a
no-op for a single process: rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from clt_eval.errors import CltEvalError, require

T = TypeVar("T")
# Keys of the string metadata a checkpoint records about the run's data-parallel layout.
META_WORLD_SIZE = "dist.world_size"
META_GLOBAL_BATCH = "dist.global_batch"
META_CONFIG_SHA1 = "dist.config_sha1"
# Gradients are all-reduced in flat buckets of about this many bytes: one collective per
# bucket instead of one per tensor (a transcoder has ~6 tensors, but each call has a fixed
# latency of ~50 µs on gloo), and no more temporary memory than one bucket.
BUCKET_BYTES = 32 << 20


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK): its GPU number."""
    return int(os.environ.get("LOCAL_RANK", 0)) if initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs and prints progress."""
    return rank() == 0


def launched() -> bool:
    """Was this process started by torchrun (or anything that sets its variables)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): gloo for a CPU device, nccl for CUDA (``auto`` with a visible GPU too), each
    CUDA rank on GPU LOCAL_RANK, which plain ``cuda`` then means.
    Returns whether training is distributed; a no-op outside torchrun or when already done."""
    if initialized():
        return True
    if not launched():
        return False
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        value = os.environ.get(name, "0")
        require(value.isdigit(), f"environment {name}={value!r}: expected an integer >= 0")
    world = int(os.environ["WORLD_SIZE"])
    require(world >= 1, f"environment WORLD_SIZE={world}: expected at least 1")
    # "auto" takes a GPU when one is visible (clt_eval.device), and so does the backend.
    cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        require(torch.cuda.is_available(), f"device={device!r}: CUDA is not available")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def device_for_rank(device: str) -> str:
    """``cuda`` becomes this rank's own GPU (``cuda:LOCAL_RANK``); anything else is kept."""
    return f"cuda:{local_rank()}" if str(device) == "cuda" and initialized() else str(device)


def shutdown() -> None:
    if initialized():
        dist.destroy_process_group()


def local_world_size() -> int:
    """Ranks on this machine (torchrun's LOCAL_WORLD_SIZE): they share its CPU cores."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, int(value)) if launched() and value.isdigit() else 1


def barrier() -> None:
    """Wait for every rank (a no-op on one process): e.g. until rank 0 has written a file the
    others read."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj=None, src: int = 0):
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself on one process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, then on the other ranks: for work that fills a shared cache (e.g.
    activations collected from a model), which the others then read instead of writing it
    at the same time. A one-line error on rank 0 is raised on every rank."""
    if world_size() == 1:
        return fn()
    error = None
    if is_main():
        try:
            value = fn()
        except Exception as exc:  # told to the others first, then raised here as it is
            broadcast_object(str(exc) if isinstance(exc, CltEvalError) else f"rank 0: {exc!r}")
            raise
    error = broadcast_object(error)
    if error is not None:
        raise CltEvalError(error)
    return value if is_main() else fn()


@contextlib.contextmanager
def main_opens(opener: Callable[[], contextlib.AbstractContextManager]) -> Iterator:
    """Enter ``opener()`` (e.g. an output folder's job lock) on rank 0 only, and give every
    rank what it yields. The other ranks wait until rank 0 holds it; a one-line error rank 0
    hits on the way is raised on every rank, so none is left waiting for the others. After
    the body, rank 0 leaves the context first and then every rank meets again, so the files
    it wrote are whole when any rank reads them."""
    if world_size() == 1:
        with opener() as value:
            yield value
        return
    with contextlib.ExitStack() as stack:
        value, error, failure = None, None, None
        if is_main():
            try:
                value = stack.enter_context(opener())
            except Exception as exc:  # told to the others first, then raised here as it is
                failure = exc
                error = str(exc) if isinstance(exc, CltEvalError) else f"rank 0: {exc!r}"
        value, error = broadcast_object((value, error))
        if failure is not None:
            raise failure
        if error is not None:
            raise CltEvalError(error)
        yield value
    barrier()


# ---- splitting the global batch -----------------------------------------------------------
def check_divisible(global_batch: int, world: int | None = None,
                    field: str = "batch_size") -> None:
    """One line unless ``world`` ranks can split ``global_batch`` rows evenly (an uneven
    split would weigh the smaller shards' samples more in the averaged gradient)."""
    world = world_size() if world is None else world
    require(global_batch % world == 0,
            f"{field}={global_batch}: not divisible by the world size {world} (ranks); "
            f"expected a multiple of {world}")


def shard(n_items: int, rank_: int | None = None, world: int | None = None,
          field: str = "batch_size") -> slice:
    """This rank's rows of a global batch of ``n_items``: disjoint across ranks, covering."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    check_divisible(n_items, world, field)
    per = n_items // world
    return slice(rank_ * per, (rank_ + 1) * per)


def local_batches(batches: Iterable, rank_: int | None = None,
                  world: int | None = None) -> Iterator:
    """This rank's slice of each global batch (tuples of tensors with samples on axis 0, or
    axis 1 for per-run [R,B,L,D] batches). Every rank must iterate the same global stream."""
    if (world_size() if world is None else world) == 1:
        yield from batches  # the whole batch: no views to make
        return
    for batch in batches:
        yield tuple(_slice_samples(t, rank_, world) for t in batch)


def _slice_samples(t: torch.Tensor, rank_, world) -> torch.Tensor:
    axis = 1 if t.dim() == 4 else 0  # [R,B,L,D] per-run batches keep their run axis
    s = shard(t.shape[axis], rank_, world)
    return t[s] if axis == 0 else t[:, s]


# ---- collectives --------------------------------------------------------------------------
@torch.no_grad()
def sync_grads(module: torch.nn.Module | Iterable[torch.Tensor],
               bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace every gradient by its mean over ranks (a no-op on one process).

    A parameter with a gradient on some ranks and none on others gets zeros where it had
    none, so every rank reduces the same tensors in the same order (a mismatch would hang).
    A parameter with no gradient anywhere keeps none, as Adam skips it in a single process.
    """
    if world_size() == 1:
        return
    params = [p for p in (module.parameters() if isinstance(module, torch.nn.Module)
                          else module) if p.requires_grad]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8,
                       device=params[0].device if params else "cpu")
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    for p, h in zip(params, has.tolist(), strict=True):
        if h and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world_size())
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _buckets(grads: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, about ``limit`` bytes each."""
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        same = not bucket or (g.dtype, g.device) == (bucket[0].dtype, bucket[0].device)
        if bucket and (not same or size + g.numel() * g.element_size() > limit):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    if bucket:
        yield bucket


@torch.no_grad()
def broadcast_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank: a guard for initialisations
    that read local data (e.g. a decoder bias set from a batch) before training starts."""
    if world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over ranks (a copy; ``t`` itself on one process): for logged losses
    and divergence checks, which must agree on every rank or the replicas drift apart."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / world_size()


def any_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Elementwise OR over ranks of a bool tensor: e.g. which features fired this step on the
    global batch (the dead-feature clock must be the same on every rank)."""
    if world_size() == 1:
        return t
    out = t.to(torch.uint8)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.bool()


# ---- checkpoints ---------------------------------------------------------------------------
def config_digest(config: dict) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_metadata(global_batch: int, config: dict) -> dict[str, str]:
    """String metadata for a checkpoint: the layout it was saved under and the config it
    belongs to (safetensors metadata holds strings only)."""
    return {META_WORLD_SIZE: str(world_size()), META_GLOBAL_BATCH: str(global_batch),
            META_CONFIG_SHA1: config_digest(config)}


def check_checkpoint_metadata(meta: dict[str, str], path, global_batch: int,
                              config: dict, same_world: bool = False) -> None:
    """One line if the checkpoint at ``path`` belongs to another config or global batch, or
    if this world size cannot split its global batch. A different world size alone is fine:
    batches are global, so the run continues as it would have on the old number of ranks
    (``same_world`` refuses it anyway, for a caller that wants the layout pinned)."""
    if META_CONFIG_SHA1 not in meta:  # saved before data-parallel training existed
        return
    saved_world = meta.get(META_WORLD_SIZE)
    require(not same_world or saved_world == str(world_size()),
            f"{path}: checkpoint field {META_WORLD_SIZE}={saved_world}, this run has "
            f"{world_size()} ranks; expected the same number of ranks")
    require(meta[META_CONFIG_SHA1] == config_digest(config),
            f"{path}: checkpoint field {META_CONFIG_SHA1} does not match this run's config "
            "(saved by a run with other settings); use another output folder")
    saved = int(meta.get(META_GLOBAL_BATCH, global_batch))
    require(saved == global_batch,
            f"{path}: checkpoint field {META_GLOBAL_BATCH}={saved}, this run asks for a global "
            f"batch of {global_batch}; expected the same global batch to resume")
    try:
        check_divisible(global_batch)
    except CltEvalError as exc:
        raise CltEvalError(f"{path}: saved with {META_WORLD_SIZE}="
                           f"{meta.get(META_WORLD_SIZE)}; resuming on {world_size()} ranks: "
                           f"{exc}") from None
