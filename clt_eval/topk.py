"""The k largest entries of every row of a wide matrix, listed in ascending column order.

``topk_rows(z, k)`` returns, per row, the k largest values and their columns, ranked by value
(NaN above every number, as ``torch.topk`` ranks it) with ties going to the lower column. The
entries come back sorted by column, so what sums over them (a sparse decode) adds in a fixed
order that does not depend on how the selection was found.

On the CPU, for float32 rows of at least 256 columns and k ≤ 1,024, a compiled kernel
(``clt_eval._sparse_kernels``) does it in a few passes over each row while the row is in cache
(the first adds a bias, when one is given):

1. The row's columns are dealt into G = 4k groups (column j to group j mod G, so the pass
   is a vectorised elementwise maximum) and the k-th largest group maximum t is found. At
   least k groups hold an entry ≥ t, so the row's k-th largest entry is ≥ t too: every
   entry below t can be skipped. On random rows only ~1.2·k entries reach t.
2. A vectorised compare flags the entries ≥ t, and those are listed (the rest are skipped
   8 at a time); a quickselect keeps the best k. Should the list fill up (rows sorted in
   ascending order, say), it is cut to its best k and the bar rises to the k-th of those.

Rows are split over ``torch.get_num_threads()`` threads. Measured at 4,096 rows × 8,192
columns, k = 32, 2 threads: 30–45 ms against 75–112 ms for ``torch.topk`` (unsorted).
Elsewhere (CUDA, other dtypes, narrow rows, larger k) ``torch.topk`` picks the entries and
they are sorted by column the same way; its choice among tied values may differ.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from clt_eval.device import subnormals_flushed

COMPILED_DTYPES = (torch.float32,)
MIN_WIDTH = 256  # narrower rows: torch.topk, the kernel's bound saves little there
MAX_K = 1024  # larger k (BatchTopK's k·B over one flat row): torch.topk, which sorts faster
MIN_ROWS_PER_THREAD = 64  # fewer rows than this per thread: one thread


@functools.cache
def _kernel():
    from clt_eval import _sparse_kernels  # lazy: numba takes ~0.5 s to import

    return _sparse_kernels.rows_topk


@functools.cache
def _pool(n: int, pid: int) -> ThreadPoolExecutor:
    """``n`` threads for process ``pid``: threads do not survive a fork, so a forked child
    (the sweep's workers) that reused its parent's pool would wait on them forever."""
    return ThreadPoolExecutor(n, thread_name_prefix="clt-eval-topk")


def compiled(z: torch.Tensor, k: int) -> bool:
    """Does ``topk_rows`` use the compiled kernel for these rows?"""
    M = z.shape[-1]
    return (z.device.type == "cpu" and z.dtype in COMPILED_DTYPES and M >= MIN_WIDTH
            and 1 <= k <= MAX_K and 8 * k <= M)


def topk_rows(z: torch.Tensor, k: int, bias: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) [..., k] of the k largest entries of each row of ``z`` [..., M]
    (k ≤ M), sorted by column; see the module docstring for the ranking. No gradient.

    With ``bias`` [P, M], z (contiguous) is first raised in place by it, row r of z seen as
    [N, M] by ``bias[r % P]``: a product's bias added in the pass that selects, while each
    row is in cache, instead of in a pass of its own over memory."""
    M = z.shape[-1]
    z2 = z.detach().reshape(-1, M)
    if bias is not None:
        if not z.is_contiguous() or z2.shape[0] % bias.shape[0]:
            raise ValueError(f"topk_rows: bias {tuple(bias.shape)} needs contiguous rows in "
                             f"a multiple of {bias.shape[0]}, got z {tuple(z.shape)}")
        bias = bias.detach().to(z.dtype).contiguous()
    if not compiled(z, k):
        if bias is not None:
            z2.view(-1, *bias.shape).add_(bias)
        v, i = z2.topk(k, dim=-1, sorted=False)
        i, order = i.sort(dim=-1)
        return v.gather(-1, order).view(*z.shape[:-1], k), i.view(*z.shape[:-1], k)
    z2 = z2.contiguous()
    N = z2.shape[0]
    vals = torch.empty(N, k, dtype=z.dtype)
    cols = torch.empty(N, k, dtype=torch.long)
    no_bias = torch.empty(0, M, dtype=z.dtype)
    args = (z2.numpy(), k)
    tail = (vals.numpy(), cols.numpy(), (no_bias if bias is None else bias).numpy())
    kernel = _kernel()
    threads = max(1, min(torch.get_num_threads(), N // MIN_ROWS_PER_THREAD))
    if threads == 1:
        kernel(*args, 0, N, *tail)
    else:  # the kernel releases the GIL: rows split evenly over threads
        cuts = [N * t // threads for t in range(threads + 1)]
        flush = subnormals_flushed()
        jobs = [_pool(threads, os.getpid()).submit(_flushing_as, flush, kernel, *args, lo, hi,
                                                   *tail)
                for lo, hi in zip(cuts, cuts[1:], strict=False)]
        for job in jobs:
            job.result()
    return vals.view(*z.shape[:-1], k), cols.view(*z.shape[:-1], k)


def _flushing_as(flush: bool, fn, *args):
    """``fn(*args)`` in a pool thread set to flush subnormals as the caller's threads do
    (``clt_eval.device.flushed_subnormals``): the bias it adds rounds the same in any thread."""
    torch.set_flush_denormal(flush)
    return fn(*args)
