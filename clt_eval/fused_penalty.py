"""The norm-weighted sparsity penalties (l1 and tanh of a·‖W_dec‖), the cross-layer mass
and the decoder block norms of small runs, each in one compiled pass forward and one
backward.

For a toy ensemble the penalty is a chain of a dozen elementwise PyTorch ops over a tensor of
a few hundred thousand numbers, each with its own allocation and dispatch, and twice as many
in the backward pass, plus the ``torch.where`` that gives each run its own norm and
penalty: ~40% of a training step on the Boolean toy's 540-run ensemble. Here each run's
value and gradients come from loops over that run's numbers alone (``_penalty_kernels``),
so a run's bits do not depend on the other runs in the call, as the training loss requires.

Used on the CPU, for float32 and float64, and when one run's terms are few (``MAX_TERMS``);
everything else (GPUs, bfloat16, large runs, where PyTorch's parallel kernels are faster)
takes the PyTorch path in ``clt_eval.losses`` and ``Transcoder.decoder_block_norms``. The
choice depends on one run's shape and never on the number of runs.
"""

from __future__ import annotations

import functools

import torch

from clt_eval.small_matmul import COMPILED_DTYPES

# Most terms (samples × layers × features × target blocks) of one run computed here: above
# it a run's tensors are large enough for PyTorch's vectorised, multi-threaded ops to win.
MAX_TERMS = 1 << 16
KINDS = {"concatenated": 1, "summed": 2, "per_block": 3}  # 0: no norm-weighted penalty
CROSS_LAYER = 4  # the weight Σ_{t>s} ‖W^{s→t}‖ of the cross-layer mass (``losses``)
CLAMP = 1e-24  # under a concatenated norm's square, as ``losses.feature_norms``


def fits(acts_RBLF: torch.Tensor, block_norms_RSTF: torch.Tensor) -> bool:
    """Is this penalty computed here (by one run's shape, device and dtype)?"""
    B, S, F = acts_RBLF.shape[1:]
    return (acts_RBLF.device.type == "cpu" and acts_RBLF.dtype in COMPILED_DTYPES
            and block_norms_RSTF.dtype == acts_RBLF.dtype
            and B * S * F * block_norms_RSTF.shape[2] <= MAX_TERMS)


def normed_penalty(acts_RBLF, block_norms_RSTF, kind_R, tanh_R, scale_R) -> torch.Tensor:
    """[R]: each run's mean over the batch of Σ_terms penalty(a·‖W‖), where ``kind_R``
    ([R] int, ``KINDS`` or ``CROSS_LAYER``) says which decoder norm weighs the run's
    activations (0: the run has no such penalty and gets 0), ``tanh_R`` ([R] bool) whether
    its penalty is tanh(c·a‖W‖) rather than a‖W‖, and ``scale_R`` ([R]) its c."""
    return _Penalty.apply(acts_RBLF, block_norms_RSTF, kind_R, tanh_R, scale_R)


@functools.cache
def _kernels():
    from clt_eval import _penalty_kernels  # lazy: numba costs ~0.5 s to import

    return _penalty_kernels


# Elements per ``tanh_`` call: under PyTorch's grain size (32,768), so that no call is split
# between threads (each thread's share would end in a scalar tail at a place that depends on
# the buffer's length), and a multiple of ``_penalty_kernels.ALIGN``. This matters on builds
# whose scalar and vectorised tanh round differently; on the MKL build measured here they
# agree on every input tried, so it is a guard, not a fix.
TANH_CHUNK = 1 << 14


def _tanh_(z: torch.Tensor) -> torch.Tensor:
    """tanh in place, chunk by chunk: every element on the vectorised path."""
    for start in range(0, z.numel(), TANH_CHUNK):
        z[start:start + TANH_CHUNK].tanh_()
    return z


class _Penalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts, bn, kind_R, tanh_R, scale_R):
        k = _kernels()
        acts, bn = acts.detach().contiguous(), bn.detach().contiguous()
        B = acts.shape[1]
        settings = (kind_R.to(torch.int64).numpy(), tanh_R.to(torch.uint8).numpy(),
                    scale_R.to(acts.dtype).numpy())
        consts = torch.tensor([1.0, CLAMP, B], dtype=acts.dtype).numpy()
        n = k.feature_norms(bn.numpy(), settings[0], consts)
        z, offs = k.tanh_args(acts.numpy(), n, bn.numpy(), *settings)
        y = _tanh_(torch.from_numpy(z))
        out = torch.empty(acts.shape[0], dtype=acts.dtype)
        k.penalty_sums(acts.numpy(), n, bn.numpy(), settings[0], settings[1], y.numpy(),
                       offs, out.numpy())
        ctx.save_for_backward(acts, bn)
        ctx.kept = (settings, consts, n, y, offs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_R):
        acts, bn = ctx.saved_tensors
        settings, consts, n, y, offs = ctx.kept
        ga, gbn = torch.empty_like(acts), torch.empty_like(bn)
        _kernels().penalty_grads(acts.numpy(), n, bn.numpy(), *settings, y.numpy(), offs,
                                 consts, g_R.contiguous().numpy(), ga.numpy(), gbn.numpy())
        return ga, gbn, None, None, None


def norms_fit(W_dec: list[torch.Tensor]) -> bool:
    """Are these per-source decoders' block norms computed here?"""
    return (W_dec[0].device.type == "cpu" and W_dec[0].dtype in COMPILED_DTYPES
            and sum(W[0].numel() for W in W_dec) <= MAX_TERMS)


def block_norms(W_dec: list[torch.Tensor], masks: list[torch.Tensor] | None) -> torch.Tensor:
    """[R,S,L,F]: ‖W_dec^{s→t}‖₂ of every feature's block from the per-source decoders
    ``W_dec[s]`` ([R,F,T_s,D], targets s..s+T_s-1), 0 for blocks not stored or masked out
    (``masks[s]``, [R,T_s] bool, in a mixed ensemble)."""
    return _BlockNorms.apply(masks, *W_dec)


class _BlockNorms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, masks, *W_dec):
        k = _kernels()
        W_dec = [W.detach().contiguous() for W in W_dec]
        R, F, _, _ = W_dec[0].shape
        L = len(W_dec)
        none = torch.zeros(0, 0, dtype=torch.uint8)  # an empty mask: every block is stored
        masks = [none] * L if masks is None else [m.to(torch.uint8).contiguous() for m in masks]
        out = torch.zeros(R, L, L, F, dtype=W_dec[0].dtype)
        for s, (W, m) in enumerate(zip(W_dec, masks, strict=True)):
            k.block_norms(W.numpy(), s, m.numpy(), out.numpy())
        ctx.save_for_backward(out, *W_dec)
        ctx.masks = masks
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_RSTF):
        norms, *W_dec = ctx.saved_tensors
        g = g_RSTF.contiguous().numpy()
        grads = []
        for s, (W, m) in enumerate(zip(W_dec, ctx.masks, strict=True)):
            gW = torch.empty_like(W)
            _kernels().block_norm_grads(W.numpy(), s, m.numpy(), norms.numpy(), g, gW.numpy())
            grads.append(gW)
        return None, *grads
