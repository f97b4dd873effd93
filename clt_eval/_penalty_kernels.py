"""Compiled loops behind ``clt_eval.fused_penalty``: the norm-weighted sparsity penalties,
the cross-layer mass and the decoder block norms of many small runs, run by run, forward
and backward.

Shapes: acts [R,B,S,F], block norms [R,S,T,F], per-run ``kind`` (0: no norm-weighted
penalty, 1: concatenated norms, 2: summed, 3: per block, 4: the norms of the blocks to
later layers, t > s, summed), ``tanh`` (0 or 1) and ``scale`` (tanh's c, in the acts'
dtype). ``consts`` holds, in the acts' dtype, [1, the clamp under a concatenated norm's
square, B].

Elementwise values and the feature norms (sums over a feature's few blocks) are computed in
the acts' dtype, as PyTorch computes them; the other sums (over a sample's terms, over the
batch, the gradient's sums over the batch, a block's squares) run in float64; every sum in
one fixed order per run. tanh itself is left to ``torch.tanh`` on the packed
arguments (vectorised; a libm call per element here cost more than everything else
together).
"""

from __future__ import annotations

import math

import numba
import numpy as np

# A run's tanh arguments start at a multiple of this many elements of the packed buffer and
# fill whole multiples of it, so a vectorised tanh treats every element of every run the
# same way (no run's element falls in a scalar tail), however many runs share the buffer:
# a guard for builds whose scalar and vectorised tanh round differently.
ALIGN = 64

_jit = numba.njit(nogil=True, cache=True, fastmath=False)


@_jit
def feature_norms(bn, kind, consts):
    """[R,S,F]: each run's feature norm, concatenated (√max(Σ_t n², clamp)), summed (Σ_t n)
    or cross-layer (Σ_{t>s} n); 0 where the run's penalty is per block or has no norm."""
    R, S, T, F = bn.shape
    n = np.zeros((R, S, F), bn.dtype)
    for r in range(R):
        if kind[r] == 0 or kind[r] == 3:
            continue
        for s in range(S):
            for f in range(F):
                if kind[r] == 4:
                    q = consts[0] - consts[0]
                    for t in range(s + 1, T):
                        q = q + bn[r, s, t, f]
                    n[r, s, f] = q
                    continue
                q = bn[r, s, 0, f] * bn[r, s, 0, f] if kind[r] == 1 else bn[r, s, 0, f]
                for t in range(1, T):
                    m = bn[r, s, t, f]
                    q = q + m * m if kind[r] == 1 else q + m
                n[r, s, f] = math.sqrt(max(q, consts[1])) if kind[r] == 1 else q
    return n


@_jit
def _run_size(kind, B, S, T, F):
    return B * S * F * (T if kind == 3 else 1)


@_jit
def tanh_args(acts, n, bn, kind, tanh, scale):
    """(packed c·(a·‖W‖) of the tanh runs, [R+1] offsets of each run's stretch)."""
    R, B, S, F = acts.shape
    T = bn.shape[2]
    offs = np.zeros(R + 1, np.int64)
    for r in range(R):
        size = _run_size(kind[r], B, S, T, F) if tanh[r] and kind[r] != 0 else 0
        offs[r + 1] = offs[r] + (size + ALIGN - 1) // ALIGN * ALIGN
    z = np.zeros(offs[R], acts.dtype)
    for r in range(R):
        if offs[r + 1] == offs[r]:
            continue
        c = scale[r]
        i = offs[r]
        for b in range(B):
            for s in range(S):
                if kind[r] == 3:
                    for t in range(T):
                        for f in range(F):
                            z[i + f] = c * (acts[r, b, s, f] * bn[r, s, t, f])
                        i += F
                else:
                    for f in range(F):
                        z[i + f] = c * (acts[r, b, s, f] * n[r, s, f])
                    i += F
    return z, offs


@_jit
def penalty_sums(acts, n, bn, kind, tanh, y, offs, out):
    """out[r] = mean over the batch of Σ of a sample's terms: tanh values from ``y``, or
    a·‖W‖ for l1."""
    R, B, S, F = acts.shape
    T = bn.shape[2]
    for r in range(R):
        total = 0.0
        if kind[r] != 0:
            i = offs[r]
            for b in range(B):
                sample = 0.0
                for s in range(S):
                    for t in range(T if kind[r] == 3 else 1):
                        for f in range(F):
                            if tanh[r]:
                                sample += y[i + f]
                            elif kind[r] == 3:
                                sample += acts[r, b, s, f] * bn[r, s, t, f]
                            else:
                                sample += acts[r, b, s, f] * n[r, s, f]
                        i += F
                total += sample
        out[r] = total / B


@_jit
def penalty_grads(acts, n, bn, kind, tanh, scale, y, offs, consts, g, ga, gbn):
    """Gradients of Σ_r g[r]·out[r] with respect to the activations (``ga``) and the block
    norms (``gbn``)."""
    R, B, S, F = acts.shape
    T = bn.shape[2]
    gn = np.zeros((S, T, F), np.float64)
    d = np.empty(F, acts.dtype)
    for r in range(R):
        if kind[r] == 0:
            ga[r] = 0
            gbn[r] = 0
            continue
        gn[:] = 0.0
        u = g[r] / consts[2]
        c = scale[r]
        i = offs[r]
        for b in range(B):
            for s in range(S):
                for t in range(T if kind[r] == 3 else 1):
                    # d = ∂(term)/∂(a·‖W‖) times the run's output gradient over B
                    if tanh[r]:
                        for f in range(F):
                            d[f] = u * (c * (consts[0] - y[i + f] * y[i + f]))
                        i += F
                    else:
                        d[:] = u
                    if kind[r] == 3:
                        _block_grads(acts, bn, r, b, s, t, d, ga, gn)
                    else:
                        for f in range(F):
                            ga[r, b, s, f] = d[f] * n[r, s, f]
                            gn[s, 0, f] += d[f] * acts[r, b, s, f]
        _norm_grads(bn, n, kind[r], r, gn, consts, gbn)


@_jit
def _block_grads(acts, bn, r, b, s, t, d, ga, gn):
    """The gradients from the terms of block s→t of sample b: a sum over t for ``ga``."""
    for f in range(acts.shape[3]):
        part = d[f] * bn[r, s, t, f]
        ga[r, b, s, f] = part if t == 0 else ga[r, b, s, f] + part
        gn[s, t, f] += d[f] * acts[r, b, s, f]


@_jit
def _norm_grads(bn, n, kind, r, gn, consts, gbn):
    """gbn[r] from the gradient ``gn`` of the feature norms (or, per block, of the blocks)."""
    S, T, F = gbn.shape[1], gbn.shape[2], gbn.shape[3]
    for s in range(S):
        for f in range(F):
            q = bn[r, s, 0, f] * bn[r, s, 0, f]  # concatenated: Σ_t n², as ``feature_norms``
            for t in range(1, T if kind == 1 else 1):
                q = q + bn[r, s, t, f] * bn[r, s, t, f]
            for t in range(T):
                if kind == 3:
                    gbn[r, s, t, f] = gn[s, t, f]
                elif kind == 2:
                    gbn[r, s, t, f] = gn[s, 0, f]
                elif kind == 4:
                    gbn[r, s, t, f] = gn[s, 0, f] if t > s else 0
                elif q >= consts[1]:  # d√q/dn_t = n_t/√q
                    gbn[r, s, t, f] = gn[s, 0, f] * bn[r, s, t, f] / n[r, s, f]
                else:  # q was clamped: the norm is a constant there
                    gbn[r, s, t, f] = 0


@_jit
def block_norms(W, s, mask, out):
    """out[r, s, s + t, f] = ‖W[r, f, t]‖₂ (a sum of squares in float64), times
    ``mask[r, t]`` when the mask has rows (a mixed ensemble's absent blocks read 0)."""
    R, F, T, D = W.shape
    for r in range(R):
        for f in range(F):
            for t in range(T):
                q = 0.0
                for d in range(D):
                    q += W[r, f, t, d] * W[r, f, t, d]
                keep = mask.shape[0] == 0 or mask[r, t] != 0
                out[r, s, s + t, f] = math.sqrt(q) if keep else 0.0


@_jit
def block_norm_grads(W, s, mask, norms, g, gW):
    """gW = ∂(Σ g·norms)/∂W for source layer s: g·W/‖W‖ per block (0 for a zero or absent
    block, as PyTorch's norm gives)."""
    R, F, T, D = W.shape
    for r in range(R):
        for f in range(F):
            for t in range(T):
                n = norms[r, s, s + t, f]
                if (mask.shape[0] != 0 and mask[r, t] == 0) or n == 0:
                    gW[r, f, t] = 0
                    continue
                scale = g[r, s, s + t, f] / n
                for d in range(D):
                    gW[r, f, t, d] = scale * W[r, f, t, d]
