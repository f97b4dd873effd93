"""Sparse activation functions σ of docs/concepts.md §2, vectorised over an ensemble of runs.

Shapes: ``pre_RBLF`` is the pre-activation for R runs, B samples, L layers, F features.
"""

from __future__ import annotations

import torch

from clt_eval.topk import compiled, topk_rows


class _JumpReLU(torch.autograd.Function):
    """a = z · 1[z > θ]; θ learns through a straight-through estimator.

    Rajamanoharan et al. (2024), "Jumping Ahead": the pseudo-derivative of the jump with
    respect to θ is -(θ/ε) K((z-θ)/ε) with the rectangle kernel K(u) = 1[|u| < 1/2].
    """

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_out * (pre > threshold)
        kernel = ((pre - threshold).abs() < eps / 2).to(pre.dtype) / eps
        grad_thr = (-threshold * kernel * grad_out).sum_to_size(threshold.shape)
        return grad_pre, grad_thr, None


class _Step(torch.autograd.Function):
    """H(z - θ), the L0 count; gradient only to θ: -(1/ε) K((z-θ)/ε) (same paper)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((pre - threshold).abs() < eps / 2).to(pre.dtype) / eps
        grad_thr = (-kernel * grad_out).sum_to_size(threshold.shape)
        return None, grad_thr, None


def jumprelu(pre_RBLF: torch.Tensor, threshold_R1LF: torch.Tensor, bandwidth: float):
    return _JumpReLU.apply(pre_RBLF, threshold_R1LF, bandwidth)


def step_l0(pre_RBLF: torch.Tensor, threshold_R1LF: torch.Tensor, bandwidth: float):
    return _Step.apply(pre_RBLF, threshold_R1LF, bandwidth)


def segments(keys: list) -> list[tuple]:
    """The maximal stretches of equal keys, in order: [(key, start, stop)].

    An ensemble whose runs are ordered by kind (as the sweep orders them) has one stretch
    per kind, and each kind is computed on a view of its rows
    (``apply_by_segment``) instead of a gathered copy scattered back."""
    out: list[tuple] = []
    for i, k in enumerate(keys):
        if out and out[-1][0] == k:
            out[-1] = (k, out[-1][1], i + 1)
        else:
            out.append((k, i, i + 1))
    return out


def contiguous(segs: list[tuple], n_kinds: int) -> bool:
    """Few enough stretches that slicing beats gathering (at most two per kind)."""
    return len(segs) <= 2 * n_kinds


def apply_by_segment(fn, t_RX: torch.Tensor, segs: list[tuple]) -> torch.Tensor:
    """cat over stretches of ``fn(key, rows, slice)``: one split and one cat, whose
    backward passes are a cat and views (a gather's backward scatters into zeros)."""
    parts = t_RX.split([stop - start for _, start, stop in segs])
    return torch.cat([fn(key, part, slice(start, stop))
                      for (key, start, stop), part in zip(segs, parts, strict=True)])


def by_k(k_R: torch.Tensor):
    """(k, run indices or None for all runs) for each distinct k, smallest first.

    Each run is selected with its own k rather than with the ensemble's largest k: which of
    several equal values ``topk`` keeps depends on k, so a shared k would make a run's
    features depend on its neighbours' budgets (tests/test_run_independence.py)."""
    ks = k_R.unique().tolist()
    if len(ks) == 1:
        return [(int(ks[0]), None)]
    return [(int(k), (k_R == k).nonzero().flatten()) for k in ks]


def _per_k(select, pre_RX: torch.Tensor, k_R: torch.Tensor) -> torch.Tensor:
    """Apply ``select(pre, k)`` to the runs of each k; all runs at once when k is shared."""
    ks = k_R.tolist()
    segs = segments(ks)
    if len(segs) > 1 and contiguous(segs, len(set(ks))):
        return apply_by_segment(lambda k, part, _: select(part, k), pre_RX, segs)
    groups = by_k(k_R)
    if groups[0][1] is None:
        return select(pre_RX, groups[0][0])
    out = torch.zeros_like(pre_RX)
    for k, idx in groups:
        out = out.index_put((idx,), select(pre_RX[idx], k))
    return out


def _topk_last(flat: torch.Tensor, k: int) -> torch.Tensor:
    # ReLU on the k kept values, not on every value: the same activations (a kept
    # non-positive value is 0 either way) for one pass less over the pre-activations.
    k = min(k, flat.shape[-1])
    if compiled(flat, k):  # wide rows: the kernel the sparse path selects with
        idx = topk_rows(flat, k)[1]
        vals = flat.gather(-1, idx)
    else:
        vals, idx = flat.topk(k, dim=-1)
    return torch.zeros_like(flat).scatter(-1, idx, vals.relu())


def topk(pre_RBLF: torch.Tensor, k_R: torch.Tensor, joint: bool) -> torch.Tensor:
    """Keep the k largest ReLU'd pre-activations per sample, per layer or across layers;
    k may differ between runs."""
    R, B, L, F = pre_RBLF.shape
    flat = pre_RBLF.reshape(R, B, L * F) if joint else pre_RBLF
    return _per_k(_topk_last, flat, k_R).reshape(R, B, L, F)


def batchtopk(pre_RBLF: torch.Tensor, k_R: torch.Tensor, joint: bool):
    """Keep the k·B largest activations over the whole batch (Bussmann et al. 2024).

    Returns the activations and, per run (and layer unless joint), the smallest kept value,
    from which the inference threshold is estimated.
    """
    R, B, L, F = pre_RBLF.shape
    relu = pre_RBLF.relu()
    # Put the batch next to the feature axis so one topk covers the batch.
    flat = relu.permute(0, 2, 1, 3).reshape(R, L, B * F) if not joint else relu.reshape(R, 1, -1)
    out = _per_k(lambda f, k: _topk_last(f, min(k * B, f.shape[-1])), flat, k_R)
    # The smallest positive kept value is the cut-off this batch used (0 if none is kept).
    big = torch.finfo(out.dtype).max
    cut = torch.where(out > 0, out, torch.full_like(out, big)).amin(-1)
    cut = torch.where(cut == big, torch.zeros_like(cut), cut)
    if joint:
        return out.reshape(R, B, L, F), cut.expand(R, L)
    return out.reshape(R, L, B, F).permute(0, 2, 1, 3), cut
