"""Training loss pieces (docs/concepts.md §3) on hand-computed values."""

import math

import pytest
import torch

from clt_eval.config import LossConfig, TranscoderConfig
from clt_eval.losses import (
    auxk_loss,
    feature_norms,
    penalty_terms,
    sparsity_penalty,
    training_loss,
)
from clt_eval.transcoder import Transcoder, TranscoderOutput

D, L, F = 5, 3, 4


def _tc(**kw):
    cfg = TranscoderConfig(**({"d_model": D, "n_layers": L, "n_features": F} | kw))
    tc = Transcoder([cfg])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (tc.W_enc, tc.b_enc, *tc.decoder_params(), tc.b_dec):
            p.copy_(torch.randn(p.shape, generator=g))
    return tc


def _l1(norm):
    return LossConfig(penalty="l1", decoder_norm=norm)


# ---- decoder norms ------------------------------------------------------------------------
def test_feature_norms_on_hand_made_blocks():
    blocks = torch.tensor([3.0, 4.0]).view(1, 1, 2, 1)  # R=1, S=1, T=2, F=1
    concat = feature_norms(blocks, "concatenated")
    summed = feature_norms(blocks, "summed")
    per_block = feature_norms(blocks, "per_block")
    assert concat.shape == (1, 1, 1) and summed.shape == (1, 1, 1)
    torch.testing.assert_close(concat, torch.full((1, 1, 1), 5.0))
    torch.testing.assert_close(summed, torch.full((1, 1, 1), 7.0))
    assert torch.equal(per_block, blocks)
    with pytest.raises(ValueError, match="none"):
        feature_norms(blocks, "none")


def test_feature_norms_agree_with_decoder_vectors():
    tc = _tc(arch="clt")
    W = tc.dense_W_dec().detach()  # [R, S, T, F, D]
    concat = feature_norms(tc.decoder_block_norms(), "concatenated")
    for s in range(L):
        for f in range(F):
            vec = torch.cat([W[0, s, t, f] for t in range(s, L)])
            torch.testing.assert_close(concat[0, s, f], vec.norm())


# ---- penalties ----------------------------------------------------------------------------
def test_l1_and_tanh_penalty_terms_by_hand():
    acts = torch.tensor([[0.5, 2.0], [1.0, 0.0]]).view(1, 2, 1, 2)  # R=1, B=2, S=1, F=2
    norms = torch.tensor([3.0, 0.5]).view(1, 1, 2)
    l1 = penalty_terms(acts, norms, "l1", tanh_scale=2.0)
    torch.testing.assert_close(l1, torch.tensor([[0.5 * 3 + 2 * 0.5, 1.0 * 3]]))
    tanh = penalty_terms(acts, norms, "tanh", tanh_scale=2.0)
    want = [math.tanh(2 * 1.5) + math.tanh(2 * 1.0), math.tanh(2 * 3.0)]
    torch.testing.assert_close(tanh, torch.tensor([want]))
    with pytest.raises(ValueError):
        penalty_terms(acts, norms, "l0", tanh_scale=1.0)


def test_per_block_l1_equals_summed_l1():
    tc = _tc(arch="clt")
    out = tc(torch.randn(6, L, D))
    per_block = sparsity_penalty(tc, out, _l1("per_block"))
    summed = sparsity_penalty(tc, out, _l1("summed"))
    concat = sparsity_penalty(tc, out, _l1("concatenated"))
    torch.testing.assert_close(per_block, summed)
    # For a CLT the concatenated norm is strictly cheaper (triangle inequality).
    assert (concat < summed).all()


@pytest.mark.parametrize("penalty", ["l1", "tanh"])
def test_plt_penalty_does_not_depend_on_norm_choice(penalty):
    tc = _tc(arch="plt")
    out = tc(torch.randn(6, L, D))
    values = [sparsity_penalty(tc, out, LossConfig(penalty=penalty, decoder_norm=n))
              for n in ("concatenated", "summed", "per_block")]
    assert values[0].item() > 0
    for v in values[1:]:
        torch.testing.assert_close(v, values[0])


def test_l0_penalty_counts_active_features_and_trains_threshold():
    eps, theta = 0.05, 0.1
    tc = Transcoder([TranscoderConfig(d_model=2, n_layers=1, n_features=2, activation="jumprelu",
                                      jumprelu_bandwidth=eps, jumprelu_threshold_init=theta)])
    # Two samples: sample 0 has 2 active features, sample 1 has 1 (0.09 < θ).
    pre = torch.tensor([[0.5, 0.11], [0.09, 3.0]]).view(1, 2, 1, 2)
    out = TranscoderOutput(pre, tc.activate(pre), torch.zeros(1, 2, 1, 2))
    cfg = LossConfig(penalty="l0", decoder_norm="none")
    pen = sparsity_penalty(tc, out, cfg)
    torch.testing.assert_close(pen, torch.tensor([1.5]))
    pen.sum().backward()
    grad = tc.log_threshold.grad
    assert grad is not None
    # Feature 1 sees 0.11 (in the ε/2 window), feature 0 sees 0.09: each gets
    # -(1/ε)·θ / B (mean over B = 2 samples, chain rule through θ = exp(log θ)).
    torch.testing.assert_close(grad.flatten(), torch.full((2,), -(1 / eps) * theta / 2))


@pytest.mark.parametrize("penalty,activation,k", [("topk", "topk", 2),
                                                  ("batchtopk", "batchtopk", 2)])
def test_fixed_budget_penalties_are_zero(penalty, activation, k):
    tc = _tc(activation=activation, k=k)
    out = tc(torch.randn(4, L, D))
    pen = sparsity_penalty(tc, out, LossConfig(penalty=penalty, decoder_norm="none"))
    assert pen.shape == (1,)
    assert torch.equal(pen, torch.zeros(1))


# ---- full loss ----------------------------------------------------------------------------
def test_training_loss_parts():
    tc = _tc(arch="clt")
    x, y = torch.randn(6, L, D), torch.randn(6, L, D)
    out = tc(x)
    cfg = LossConfig(penalty="l1", decoder_norm="concatenated", sparsity_coef=0.1)
    parts = training_loss(tc, out, y, cfg, torch.tensor([0.3]))
    mse = (out.recon_RBLD[0] - y).pow(2).sum() / 6
    torch.testing.assert_close(parts.mse_R, mse.view(1))
    torch.testing.assert_close(parts.sparsity_R, sparsity_penalty(tc, out, cfg).detach())
    torch.testing.assert_close(parts.total_R, parts.mse_R + 0.3 * parts.sparsity_R)


def test_preact_loss_adds_relu_of_negative_preactivations():
    tc = _tc(arch="clt")
    x, y = torch.randn(6, L, D), torch.randn(6, L, D)
    out = tc(x)
    coef = torch.tensor([0.2])
    base = training_loss(tc, out, y, LossConfig(penalty="l1", preact_coef=0.0), coef)
    extra = training_loss(tc, out, y, LossConfig(penalty="l1", preact_coef=0.5), coef)
    preact = (-out.pre_RBLF).relu().sum() / 6
    assert preact > 0
    torch.testing.assert_close(extra.total_R - base.total_R, 0.5 * preact.view(1))


def test_auxk_loss_zero_without_dead_and_positive_with_dead():
    tc = _tc(activation="topk", k=1, topk_mode="joint")
    x, y = torch.randn(8, L, D), torch.randn(8, L, D)
    out = tc(x)
    none_dead = torch.zeros(1, L, F, dtype=torch.bool)
    assert torch.equal(auxk_loss(tc, out, y, none_dead), torch.zeros(1))

    dead = none_dead.clone()
    dead[0, 1, 2] = dead[0, 0, 3] = True
    loss = auxk_loss(tc, out, y, dead)
    assert loss.shape == (1,) and loss.item() > 0
    loss.sum().backward()
    # Only the dead features learn from AuxK.
    enc_grad = tc.W_enc.grad.abs().sum(2)  # [R, L, F]
    assert (enc_grad[dead] > 0).all()
    assert (enc_grad[~dead] == 0).all()

    # With the dead features' decoders zeroed, AuxK explains nothing: normalised loss is 1.
    with torch.no_grad():
        tc.W_dec_1[0, 2] = 0  # [R, F, T_s, D]: every target of the feature
        tc.W_dec_0[0, 3] = 0
    out = tc(x)
    torch.testing.assert_close(auxk_loss(tc, out, y, dead), torch.ones(1))


def test_training_loss_adds_auxk_for_topk_only_with_dead_features():
    tc = _tc(activation="topk", k=1)
    x, y = torch.randn(8, L, D), torch.randn(8, L, D)
    out = tc(x)
    cfg = LossConfig(penalty="topk", decoder_norm="none", auxk_coef=0.25)
    dead = torch.zeros(1, L, F, dtype=torch.bool)
    dead[0, 2, 1] = True
    zero = torch.zeros(1)
    base = training_loss(tc, out, y, cfg, zero, None).total_R
    with_dead = training_loss(tc, out, y, cfg, zero, dead).total_R
    torch.testing.assert_close(with_dead - base, 0.25 * auxk_loss(tc, out, y, dead))
    assert (with_dead > base).all()


def test_per_run_loss_configs_price_each_run_on_its_own():
    cfg = TranscoderConfig(d_model=D, n_layers=L, n_features=F)
    tc = Transcoder([cfg] * 3, seeds=[0, 1, 2])
    x = torch.randn(6, L, D)
    out = tc(x)
    cfgs = [LossConfig(penalty="l1", decoder_norm="concatenated"),
            LossConfig(penalty="tanh", decoder_norm="summed", tanh_scale=2.0),
            LossConfig(penalty="l1", decoder_norm="per_block")]
    mixed = sparsity_penalty(tc, out, cfgs)
    for r, c in enumerate(cfgs):
        one = tc.select([r])
        torch.testing.assert_close(mixed[r:r + 1], sparsity_penalty(one, one(x), c))
    assert len(set(mixed.tolist())) == 3
