"""The compiled penalty and block norms (clt_eval.fused_penalty) against independent PyTorch
computations in float64, finite differences, and each run alone."""

import dataclasses

import pytest
import torch

from clt_eval import fused_penalty as fp
from clt_eval.config import LossConfig, TranscoderConfig
from clt_eval.losses import training_loss
from clt_eval.transcoder import Transcoder

R, B, S, F = 11, 5, 3, 4
KIND_NAMES = {v: k for k, v in fp.KINDS.items()} | {fp.CROSS_LAYER: "cross_layer"}


def _inputs(dtype, seed=0):
    """Activations with exact zeros; block norms ≥ 0 with some features' blocks all zero
    (a concatenated norm then sits at its clamp); every kind, l1 and tanh, several c."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(R, B, S, F, generator=g, dtype=torch.float64) * 2
    acts[torch.rand(acts.shape, generator=g) < 0.4] = 0.0
    bn = torch.rand(R, S, S, F, generator=g, dtype=torch.float64) + 0.1
    bn[:, 1, :, 2] = 0.0
    kind = torch.tensor([0, 1, 2, 3, 1, 2, 3, 1, 3, 4, 4])
    tanh = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    scale = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 0.5, 2.0, 1.0, 0.7, 1.0, 1.5],
                         dtype=torch.float64)
    return acts.to(dtype), bn.to(dtype), kind, tanh, scale


def _reference(acts, bn, kind, tanh, scale):
    """[R]: each run's penalty written out directly, one run at a time."""
    values = []
    for r in range(acts.shape[0]):
        name = KIND_NAMES.get(int(kind[r]))
        if name is None:
            values.append(acts.new_zeros(()))
            continue
        blocks = bn[r]  # [S,T,F]
        if name == "concatenated":
            w = acts[r] * blocks.pow(2).sum(1).clamp_min(fp.CLAMP).sqrt()
        elif name == "summed":
            w = acts[r] * blocks.sum(1)
        elif name == "cross_layer":  # the blocks to later layers only
            w = acts[r] * (blocks * torch.ones(S, S).triu(1)[:, :, None]).sum(1)
        else:
            w = acts[r][:, :, None, :] * blocks
        terms = torch.tanh(float(scale[r]) * w) if tanh[r] else w
        values.append(terms.sum() / acts.shape[1])
    return torch.stack(values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_match_a_direct_float64_computation(dtype):
    acts, bn, kind, tanh, scale = _inputs(dtype)
    a, b = acts.clone().requires_grad_(), bn.clone().requires_grad_()
    got = fp.normed_penalty(a, b, kind, tanh, scale)
    a64, b64 = acts.double().requires_grad_(), bn.double().requires_grad_()
    want = _reference(a64, b64, kind, tanh, scale)
    weights = torch.linspace(-1.0, 2.0, R, dtype=torch.float64)
    (got * weights.to(dtype)).sum().backward()
    (want * weights).sum().backward()
    tol = {"rtol": 2e-6, "atol": 1e-6} if dtype == torch.float32 else \
        {"rtol": 1e-12, "atol": 1e-12}
    assert got.dtype == dtype and got[0] == 0
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    torch.testing.assert_close(a.grad.double(), a64.grad, **tol)
    torch.testing.assert_close(b.grad.double(), b64.grad, **tol)
    assert (b.grad[:, 1, :, 2][kind == 1] == 0).all()  # clamped norm: no gradient
    earlier = torch.ones(S, S, dtype=torch.bool).tril()  # blocks s→t with t ≤ s
    assert (b.grad[kind == 4][:, earlier] == 0).all()  # are not in the cross-layer mass


def test_gradients_agree_with_finite_differences():
    acts, bn, kind, tanh, scale = _inputs(torch.float64, seed=1)
    bn[:, 1, :, 2] = 0.3  # keep away from the clamp, where the norm has no derivative
    torch.autograd.gradcheck(lambda a, b: fp.normed_penalty(a, b, kind, tanh, scale),
                             (acts.requires_grad_(), bn.requires_grad_()))


def test_a_run_gets_the_same_bits_alone_as_in_any_ensemble():
    acts, bn, kind, tanh, scale = _inputs(torch.float32, seed=2)
    whole = fp.normed_penalty(acts, bn, kind, tanh, scale)
    flipped = fp.normed_penalty(acts.flip(0), bn.flip(0), kind.flip(0), tanh.flip(0),
                                scale.flip(0)).flip(0)
    assert torch.equal(whole, flipped)
    for r in range(R):
        a, b = acts[r:r + 1].clone().requires_grad_(), bn[r:r + 1].clone().requires_grad_()
        alone = fp.normed_penalty(a, b, kind[r:r + 1], tanh[r:r + 1], scale[r:r + 1])
        assert torch.equal(alone[0], whole[r]), r
        alone.sum().backward()
        A, Bn = acts.clone().requires_grad_(), bn.clone().requires_grad_()
        fp.normed_penalty(A, Bn, kind, tanh, scale)[r].backward()
        assert torch.equal(a.grad[0], A.grad[r]) and torch.equal(b.grad[0], Bn.grad[r]), r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_norms_match_the_decoders_norms_masks_included(dtype):
    g = torch.Generator().manual_seed(3)
    W = [torch.randn(4, F, S - s, 6, generator=g, dtype=dtype) for s in range(S)]
    W[0][1, 2, 1] = 0.0  # a zero block: norm 0, gradient 0
    masks = [torch.rand(4, S - s, generator=g) < 0.7 for s in range(S)]
    Ws = [w.clone().requires_grad_() for w in W]
    got = fp.block_norms(Ws, masks)
    W64 = [w.double().requires_grad_() for w in W]
    want = torch.zeros(4, S, S, F, dtype=torch.float64)
    for s in range(S):
        for t in range(S - s):
            want[:, s, s + t] = W64[s][:, :, t].norm(dim=-1) * masks[s][:, t, None]
    g_out = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (got * g_out.to(dtype)).sum().backward()
    (want * g_out).sum().backward()
    tol = {"rtol": 2e-6, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    for w, w64 in zip(Ws, W64, strict=True):
        torch.testing.assert_close(w.grad.double(), w64.grad, **tol)
    assert (Ws[0].grad[1, 2, 1] == 0).all()
    unmasked = fp.block_norms(W, None)
    for s in range(S):
        assert (unmasked[:, s, :s] == 0).all()  # no block reads back to an earlier layer
        for t in range(S - s):
            torch.testing.assert_close(unmasked[:, s, s + t], W[s][:, :, t].norm(dim=-1), **tol)


def test_the_choice_follows_one_runs_shape_device_and_dtype_never_the_run_count():
    small, bn = torch.zeros(1, 16, 2, 16), torch.zeros(1, 2, 2, 16)
    assert fp.fits(small, bn) and fp.fits(small.expand(5000, -1, -1, -1), bn)
    assert not fp.fits(torch.zeros(1, 4096, 2, 16), bn)
    assert not fp.fits(small.bfloat16(), bn.bfloat16())
    assert fp.norms_fit([torch.zeros(3, 16, 2, 10)])
    assert not fp.norms_fit([torch.zeros(1, 4096, 8, 512)])


def test_training_loss_is_the_same_on_both_paths(monkeypatch):
    """An ensemble of l1, tanh (every norm) and JumpReLU L0 runs: the loss and its gradients
    from the compiled pass and from PyTorch's ops agree."""
    D, L, Fw = 5, 3, 4
    base = {"d_model": D, "n_layers": L, "n_features": Fw}
    losses = [LossConfig(penalty="l1", decoder_norm="concatenated"),
              LossConfig(penalty="tanh", decoder_norm="summed", tanh_scale=2.0),
              LossConfig(penalty="l1", decoder_norm="per_block"),
              LossConfig(penalty="l0", decoder_norm="none"),
              LossConfig(penalty="tanh", decoder_norm="concatenated", tanh_scale=0.5)]
    losses = [dataclasses.replace(c, cross_layer_coef=0.2 * (i % 2)) for i, c in
              enumerate(losses)]  # κ > 0 for some runs: the cross-layer mass as well
    cfgs = [TranscoderConfig(**base, activation="jumprelu" if c.penalty == "l0" else "relu")
            for c in losses]
    tc = Transcoder(cfgs, seeds=list(range(len(cfgs))))
    x, y = torch.randn(7, L, D), torch.randn(7, L, D)
    coef = torch.full((len(cfgs),), 0.3)

    def loss_and_grads():
        tc.zero_grad()
        loss = training_loss(tc, tc(x), y, losses, coef)
        loss.total_R.sum().backward()
        return loss.sparsity_R, [p.grad.clone() for p in tc.parameters() if p.grad is not None]

    calls = []
    compiled = fp.normed_penalty
    monkeypatch.setattr(fp, "normed_penalty", lambda *a: calls.append(1) or compiled(*a))
    fused, fused_grads = loss_and_grads()
    assert calls == [1, 1]  # the penalty and the cross-layer mass
    monkeypatch.setattr(fp, "MAX_TERMS", 0)
    plain, plain_grads = loss_and_grads()
    assert calls == [1, 1]
    torch.testing.assert_close(fused, plain)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.equal(fused[3], plain[3])  # the L0 run's penalty takes the same ops


def test_a_large_ensemble_on_two_threads_gives_each_run_its_alone_bits():
    """More tanh arguments than PyTorch's grain size, on 2 threads, and runs whose terms are
    not a multiple of the vector width: each run's value is still its alone value."""
    g = torch.Generator().manual_seed(4)
    n = 150
    acts = torch.rand(n, 16, 2, 13, generator=g) * 3  # 416 terms a run: not a multiple of 64
    bn = torch.rand(n, 2, 2, 13, generator=g)
    kind = torch.randint(1, 5, (n,), generator=g)
    tanh = torch.ones(n, dtype=torch.bool)
    scale = torch.rand(n, generator=g, dtype=torch.float64) * 4
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        whole = fp.normed_penalty(acts, bn, kind, tanh, scale)
        alone = [fp.normed_penalty(acts[r:r + 1], bn[r:r + 1], kind[r:r + 1], tanh[r:r + 1],
                                   scale[r:r + 1]) for r in range(n)]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, torch.cat(alone))
