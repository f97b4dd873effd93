"""Batched products of small matrices, each element summed in one fixed order.

``small_matmul(a, b)`` computes every output element as ``a[m,0]·b[0,n]``, then adds
``a[m,k]·b[k,n]`` for k = 1, 2, … in turn: a separate multiply and add each time, never a
fused multiply-add, never a reordered sum. So an element's bits depend on its own row and
column alone, not on how many matrices share the call or where it lies among them, which
is what ``run_matmul`` needs (BLAS's batched kernels block and vectorise the sum over k
differently for different batch counts).

The loops are compiled by numba (LLVM without fast-math flags, so no contraction into FMA
and no reassociation; the loop over n, whose elements are independent, is vectorised). On
the toys' shapes this is 2.5–3 times as fast as forming the products as one tensor and
summing them with elementwise adds (measured: 0.28 vs 0.75 ms for 138 runs of
[16,16]@[16,20]). Compiled code is cached on disk, so only the first use on a machine
compiles.
"""

from __future__ import annotations

import functools
import math

import torch

COMPILED_DTYPES = (torch.float32, torch.float64)
ACC_MAX_N = 16  # widest output row built in a scratch row (see small_matmul)


@functools.cache
def _kernel():
    import numba  # lazy: ~0.5 s to import, and only toys' small products need it
    import numpy as np

    @numba.njit(cache=True, nogil=True, fastmath=False)
    def products(a, b, out):  # a [Q, M, K], b [Q, K, N], out [Q, M, N], all C-contiguous
        Q, M, K = a.shape
        N = b.shape[2]
        for q in range(Q):
            for m in range(M):
                first = a[q, m, 0]
                for n in range(N):
                    out[q, m, n] = first * b[q, 0, n]
                for k in range(1, K):
                    x = a[q, m, k]
                    for n in range(N):
                        out[q, m, n] = out[q, m, n] + x * b[q, k, n]

    @numba.njit(cache=True, nogil=True, fastmath=False)
    def products_acc(a, b, out):  # the same sums, each output row built in a scratch row
        Q, M, K = a.shape
        N = b.shape[2]
        acc = np.empty(N, a.dtype)
        for q in range(Q):
            for m in range(M):
                first = a[q, m, 0]
                for n in range(N):
                    acc[n] = first * b[q, 0, n]
                for k in range(1, K):
                    x = a[q, m, k]
                    for n in range(N):
                        acc[n] = acc[n] + x * b[q, k, n]
                for n in range(N):
                    out[q, m, n] = acc[n]

    return products, products_acc


def small_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [*Ba, M, K] @ b [*Bb, K, N] -> [*B, M, N] on the CPU (batch axes of size 1
    broadcast, K ≥ 1, one dtype), every element summed over k in order (see the module
    docstring)."""
    M, N = a.shape[-2], b.shape[-1]
    # not torch.broadcast_shapes: its symbolic-shape checks cost more than a toy's product
    batch = tuple(max(m, n) for m, n in zip(a.shape[:-2], b.shape[:-2], strict=True))
    a3 = _flat(a.detach(), batch)
    b3 = _flat(b.detach(), batch)
    out = torch.empty(a3.shape[0], M, N, dtype=a.dtype)
    # A scratch row, which LLVM keeps out of the aliasing question between ``out`` and
    # ``b``, pays for up to one vector's width of columns (measured, 1,080 products of
    # [16,10]@[10,16]: 0.58 vs 0.94 ms; [16,16]@[16,20]: 0.62 vs 0.51 ms). Same sums.
    plain, scratch = _kernel()
    (scratch if N <= ACC_MAX_N else plain)(a3.numpy(), b3.numpy(), out.numpy())
    return out.view(*batch, M, N)


def _flat(t: torch.Tensor, batch: tuple) -> torch.Tensor:
    """``t`` broadcast to ``batch`` and laid out as [Q, rows, cols], C-contiguous."""
    if t.shape[:-2] != batch:
        t = t.expand(*batch, *t.shape[-2:])
    return t.reshape(math.prod(batch), *t.shape[-2:]).contiguous()  # -1 fails on 0 rows
