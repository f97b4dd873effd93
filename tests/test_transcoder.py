"""One transcoder interface for PLTs and CLTs (docs/concepts.md §2): structure, activations,
ensembles."""

import dataclasses

import pytest
import torch

from clt_eval.config import LossConfig, TranscoderConfig
from clt_eval.errors import CltEvalError
from clt_eval.training.config import TrainConfig
from clt_eval.training.trainer import full_batches, init_b_dec, train
from clt_eval.transcoder import Transcoder, structure_mask

D, L, F = 6, 3, 4


def _cfg(**kw):
    return TranscoderConfig(**({"d_model": D, "n_layers": L, "n_features": F} | kw))


def _randomize(tc, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return tc


def _hand_decode(acts_RBLF, W_dec, b_dec, allowed):
    """ŷ_t = b_dec^t + Σ_{s : allowed(s, t)} a_s W_dec^{s→t}, one block at a time."""
    R, B, n_layers, _ = acts_RBLF.shape
    y = torch.zeros(R, B, n_layers, W_dec.shape[-1])
    for r in range(R):
        for t in range(n_layers):
            y[r, :, t] = b_dec[r, t]
            for s in range(n_layers):
                if allowed(s, t):
                    y[r, :, t] += acts_RBLF[r, :, s] @ W_dec[r, s, t]
    return y


# ---- structure --------------------------------------------------------------------------
def test_structure_masks():
    assert torch.equal(structure_mask("plt", 4), torch.eye(4, dtype=torch.bool))
    clt = structure_mask("clt", 4)
    expected = torch.tensor([[t >= s for t in range(4)] for s in range(4)])
    assert torch.equal(clt, expected)
    assert clt.dtype == torch.bool
    tc = Transcoder([_cfg(arch="plt"), _cfg(arch="clt")])
    assert torch.equal(tc.decoder_mask_RST[0], torch.eye(L, dtype=torch.bool))
    assert torch.equal(tc.decoder_mask_RST[1], structure_mask("clt", L))


def test_plt_stores_only_own_layer_blocks():
    tc = _randomize(Transcoder([_cfg(arch="plt")]))
    # A PLT-only ensemble stores one target slot per source: L·F·D decoder weights.
    assert [list(W.shape) for W in tc.decoder_params()] == [[1, F, 1, D]] * L
    acts = torch.rand(1, 5, L, F)
    got = tc.decode(acts)
    want = _hand_decode(acts, tc.dense_W_dec().detach(), tc.b_dec.detach(), lambda s, t: s == t)
    torch.testing.assert_close(got, want)
    contrib = tc.contributions(acts)
    off = ~torch.eye(L, dtype=torch.bool)
    assert (contrib[:, :, off] == 0).all()
    norms = tc.decoder_block_norms()
    assert (norms[:, off] == 0).all() and (norms[:, ~off] > 0).all()
    with pytest.raises(CltEvalError, match="decoder block 0->1: not stored"):
        tc.set_decoder_block(0, 1, torch.zeros(F, D))


def test_clt_decode_equals_hand_loop_over_earlier_layers():
    tc = _randomize(Transcoder([_cfg(arch="clt"), _cfg(arch="plt")]), seed=1)
    # A mixed ensemble stores L-s target slots per source; the PLT's cross-layer slots hold
    # random values here and must contribute nothing.
    assert [W.shape[2] for W in tc.decoder_params()] == [L - s for s in range(L)]
    assert (tc.decoder_block(0, 1, masked=False)[1].abs() > 0).all()
    acts = torch.rand(2, 7, L, F)
    got = tc.decode(acts)
    W = torch.zeros(2, L, L, F, D)  # every stored slot, masked or not
    for s in range(L):
        for t in tc.targets(s):
            W[:, s, t] = tc.decoder_block(s, t, masked=False).detach()
    b = tc.b_dec.detach()
    torch.testing.assert_close(got[:1], _hand_decode(acts[:1], W[:1], b[:1], lambda s, t: s <= t))
    torch.testing.assert_close(got[1:], _hand_decode(acts[1:], W[1:], b[1:], lambda s, t: s == t))
    # contributions summed over sources plus b_dec is the reconstruction.
    torch.testing.assert_close(tc.contributions(acts).sum(2) + b[:, None], got)
    # The PLT run's cross-layer slots get no gradient.
    tc.decode(acts).pow(2).sum().backward()
    assert (tc.W_dec_0.grad[1, :, 1:] == 0).all() and (tc.W_dec_0.grad[0, :, 1:] != 0).any()


def test_forward_encodes_with_each_runs_encoder():
    tc = _randomize(Transcoder([_cfg(), _cfg()]), seed=2)
    x = torch.randn(5, L, D)
    pre = tc.encode(x)
    for r in range(2):
        for layer in range(L):
            want = x[:, layer] @ tc.W_enc[r, layer] + tc.b_enc[r, layer]
            torch.testing.assert_close(pre[r, :, layer], want)
    # Per-run inputs give the same result as shared ones.
    torch.testing.assert_close(tc.encode(x.expand(2, *x.shape)), pre)


# ---- activations --------------------------------------------------------------------------
def test_relu_activation():
    tc = Transcoder([_cfg(activation="relu")])
    pre = torch.randn(1, 8, L, F)
    assert torch.equal(tc.activate(pre), pre.relu())
    assert (tc.activate(pre) == 0).sum() > 0


def test_jumprelu_zeroes_below_threshold_and_trains_threshold():
    eps, theta = 0.05, 0.1
    tc = Transcoder([TranscoderConfig(d_model=2, n_layers=1, n_features=1, activation="jumprelu",
                                      jumprelu_bandwidth=eps, jumprelu_threshold_init=theta)])
    torch.testing.assert_close(tc.threshold(), torch.full((1, 1, 1), theta))
    pre = torch.tensor([0.05, 0.09, 0.11, 0.5, -1.0]).view(1, 5, 1, 1).requires_grad_()
    acts = tc.activate(pre)
    torch.testing.assert_close(acts.flatten(), torch.tensor([0.0, 0.0, 0.11, 0.5, 0.0]))
    acts.sum().backward()
    # Rectangle-kernel STE (Rajamanoharan et al. 2024): d a/d θ = -(θ/ε)·K((z-θ)/ε), i.e. -θ/ε
    # for each sample within ε/2 of θ; two samples (0.09, 0.11) are in the window, and
    # d θ/d log θ = θ.
    expected = 2 * (-theta / eps) * theta
    torch.testing.assert_close(tc.log_threshold.grad.flatten(), torch.tensor([expected]))
    torch.testing.assert_close(pre.grad.flatten(), torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]))


@pytest.mark.parametrize("mode", ["per_layer", "joint"])
def test_topk_keeps_exactly_k_with_k_per_run(mode):
    ks = [1, 3]
    tc = Transcoder([_cfg(activation="topk", k=k, topk_mode=mode) for k in ks])
    pre = torch.rand(2, 9, L, F) + 0.1  # all positive, no ties
    acts = tc.activate(pre)
    active = acts > 0
    for r, k in enumerate(ks):
        if mode == "per_layer":
            assert (active[r].sum(-1) == k).all()
            kth = pre[r].topk(k, dim=-1).values[..., -1:]
            assert torch.equal(active[r], pre[r] >= kth)
        else:
            assert (active[r].flatten(1).sum(-1) == k).all()
            flat = pre[r].flatten(1)
            kth = flat.topk(k, dim=-1).values[:, -1:]
            assert torch.equal(active[r].flatten(1), flat >= kth)
        # Kept values are the pre-activations themselves.
        assert torch.equal(acts[r][active[r]], pre[r][active[r]])


def test_topk_never_keeps_negative_preactivations():
    tc = Transcoder([_cfg(activation="topk", k=3, topk_mode="per_layer")])
    pre = -torch.rand(1, 4, L, F)
    pre[0, :, :, 0] = 1.0  # only one positive per layer
    acts = tc.activate(pre)
    assert ((acts > 0).sum(-1) == 1).all()
    assert (acts >= 0).all()


@pytest.mark.parametrize("mode", ["per_layer", "joint"])
def test_batchtopk_train_and_eval(mode):
    ks, B = [1, 2], 8
    tc = Transcoder([_cfg(activation="batchtopk", k=k, topk_mode=mode) for k in ks])
    pre = torch.rand(2, B, L, F) + 0.1
    tc.train()
    acts = tc.activate(pre)
    active = acts > 0
    for r, k in enumerate(ks):
        if mode == "per_layer":
            counts = active[r].sum((0, 2))  # per layer, over the whole batch
            assert (counts == k * B).all()
            # Not k per sample: the budget is shared across the batch.
            kth = pre[r].permute(1, 0, 2).flatten(1).topk(k * B, -1).values[:, -1]
            assert torch.equal(active[r], pre[r] >= kth[None, :, None])
            cut = kth
        else:
            assert int(active[r].sum()) == k * B
            kth = pre[r].flatten().topk(k * B).values[-1]
            assert torch.equal(active[r], pre[r] >= kth)
            cut = kth.expand(L)
        # The inference threshold moves 1% of the way from 0 toward this batch's cut-off.
        torch.testing.assert_close(tc.batchtopk_threshold[r], 0.01 * cut)
    assert torch.equal(acts[active], pre[active])

    tc.eval()
    thr = torch.tensor([[0.3, 0.5, 0.7], [0.9, 0.2, 0.4]])
    tc.batchtopk_threshold.copy_(thr)
    before = tc.batchtopk_threshold.clone()
    out = tc.activate(pre)
    assert torch.equal(out, pre * (pre > thr[:, None, :, None]))
    assert torch.equal(tc.batchtopk_threshold, before)  # eval does not update it


# ---- ensembles ----------------------------------------------------------------------------
def test_ensemble_configs_may_differ_only_in_arch_activation_k_and_relu_width():
    Transcoder([_cfg(arch="plt"), _cfg(arch="clt")])
    assert Transcoder([_cfg(), _cfg(n_features=F + 1)]).ragged
    with pytest.raises(CltEvalError, match="run 1"):
        Transcoder([_cfg(), _cfg(d_model=D + 1)])
    with pytest.raises(CltEvalError, match=r"different widths \(\[4, 5\] features\).*"
                       r"\['topk'\]"):
        Transcoder([_cfg(), _cfg(n_features=F + 1, activation="topk", k=2)])


def test_select_stack_round_trip():
    cfgs = [_cfg(activation="topk", k=k, arch=a) for k, a in [(1, "plt"), (2, "clt"), (3, "clt")]]
    tc = _randomize(Transcoder(cfgs), seed=3)
    tc.batchtopk_threshold.copy_(torch.rand(3, L))
    picked = tc.select([2, 0])
    assert [c.k for c in picked.cfgs] == [3, 1]
    assert [c.arch for c in picked.cfgs] == ["clt", "plt"]
    for name, value in picked.state_dict().items():
        assert torch.equal(value, tc.state_dict()[name][[2, 0]]), name
    x = torch.randn(4, L, D)
    torch.testing.assert_close(picked(x).recon_RBLD, tc(x).recon_RBLD[[2, 0]])

    back = Transcoder.stack([tc.select([0]), tc.select([1, 2])])
    assert back.cfgs == tc.cfgs
    assert [W.shape[2] for W in tc.select([0]).decoder_params()] == [1] * L
    want = tc.state_dict()
    for s in range(L):  # the PLT's cross-layer slots: dropped alone, zeros once stacked again
        want[f"W_dec_{s}"] = tc.decoder_from(s).detach()
    for name, value in back.state_dict().items():
        assert torch.equal(value, want[name]), name
    # Copies, not views: changing the selection leaves the original alone.
    with torch.no_grad():
        picked.W_enc.zero_()
    assert tc.W_enc[2].abs().sum() > 0


ENSEMBLES = {
    # name: (run configs, loss config (or one per run), λ per run, dead_window)
    "relu_l1_clt_plt": (
        [dict(arch="clt"), dict(arch="plt")],
        LossConfig(penalty="l1", decoder_norm="concatenated", preact_coef=1e-3),
        [0.1, 0.3], 200),
    "topk_k_differs_auxk": (
        [dict(activation="topk", k=1), dict(activation="topk", k=3)],
        LossConfig(penalty="topk", decoder_norm="none"),
        [0.0, 0.0], 3),
    # One loss config per run: penalties and decoder norms may differ inside an ensemble.
    "l1_and_tanh_per_run_loss": (
        [dict(arch="clt"), dict(arch="clt")],
        [LossConfig(penalty="l1", decoder_norm="concatenated"),
         LossConfig(penalty="tanh", decoder_norm="summed", tanh_scale=2.0)],
        [0.2, 0.2], 200),
}


@pytest.mark.parametrize("name", list(ENSEMBLES))
def test_ensemble_runs_train_independently(name, x_BLD, y_BLD):
    runs, loss_cfg, coefs, dead_window = ENSEMBLES[name]
    d = x_BLD.shape[-1]
    cfgs = [TranscoderConfig(d_model=d, n_layers=2, n_features=8, **r) for r in runs]
    seeds = [11, 22]
    train_cfg = TrainConfig(steps=20, lr=1e-2, lr_warmup_steps=5, log_every=0,
                            dead_window=dead_window)

    def fit(cfg_list, seed_list, coef_list, loss):
        tc = Transcoder(cfg_list, seeds=seed_list)
        init_b_dec(tc, y_BLD)
        train(tc, loss, torch.tensor(coef_list), full_batches(x_BLD, y_BLD), train_cfg)
        return tc

    both = fit(cfgs, seeds, coefs, loss_cfg)
    for r in range(2):
        loss_r = loss_cfg[r] if isinstance(loss_cfg, list) else loss_cfg
        alone = fit([cfgs[r]], [seeds[r]], [coefs[r]], loss_r)
        start = Transcoder([cfgs[r]], seeds=[seeds[r]])
        moved = False
        mine = dict(both.select([r]).named_parameters())  # the run's own decoder slots
        for pname, p in alone.named_parameters():
            torch.testing.assert_close(mine[pname], p, atol=1e-5, rtol=0,
                                       msg=lambda m, pname=pname, r=r: f"{pname}[{r}]: {m}")
            moved |= not torch.allclose(p, getattr(start, pname), atol=1e-4)
        assert moved, "training changed nothing, so the comparison proves nothing"


def test_ensemble_config_fields_are_the_shared_ones():
    # Guard for the test above: an ensemble really may mix arch and k.
    a = _cfg(activation="topk", k=1, arch="plt")
    b = dataclasses.replace(a, k=5, arch="clt")
    tc = Transcoder([a, b])
    assert tc.k_R.tolist() == [1, 5]
