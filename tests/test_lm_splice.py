"""The spliced replacement model on a tiny random language model, and its metrics."""

import copy

import pytest
import torch

from clt_eval.config import TranscoderConfig
from clt_eval.errors import CltEvalError
from clt_eval.lm import lm_metrics as M
from clt_eval.lm.splice import check_compatible, run_spliced, splice_metrics
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

WINDOWS = [(1, 2), (0, 1, 2, 3)]


def _tc(layers, arch="clt", runs=1, **kw) -> Transcoder:
    cfgs = [TranscoderConfig(d_model=32, n_layers=len(layers), n_features=24, arch=arch, **kw)
            for _ in range(runs)]
    tc = Transcoder(cfgs, seeds=list(range(runs)))
    with torch.no_grad():  # decoders big enough that splicing visibly changes the model
        for W in tc.decoder_params():
            W.mul_(5)
        tc.b_enc.fill_(-0.1)
        tc.b_dec.normal_(0, 0.1)
        if tc.W_skip is not None:
            tc.W_skip.normal_(0, 0.05)
        if tc.log_threshold is not None:
            tc.log_threshold.fill_(-3.0)
    return tc.eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layers", WINDOWS)
@pytest.mark.parametrize("arch", ["plt", "clt"])
def test_error_terms_reproduce_the_clean_model(tiny_lm, tokens, layers, arch):
    tc = _tc(layers, arch, runs=2, skip=True)
    out = run_spliced(tiny_lm, tc, LayerWindow(layers), tokens, error_terms=True)
    clean = tiny_lm(tokens)
    assert out.logits_RBPV.shape == (2, *clean.shape)
    torch.testing.assert_close(out.logits_RBPV, clean.expand(2, -1, -1, -1), atol=1e-5,
                               rtol=0)
    # ...while the pure replacement model does differ.
    pure = run_spliced(tiny_lm, tc, LayerWindow(layers), tokens).logits_RBPV
    assert (pure - clean).abs().max() > 1e-2


@pytest.mark.parametrize("kw", [dict(arch="plt"), dict(arch="clt", skip=True),
                                dict(arch="clt", activation="jumprelu"),
                                dict(arch="clt", activation="topk", k=3, topk_mode="per_layer"),
                                dict(arch="clt", activation="topk", k=6, topk_mode="joint")])
@pytest.mark.parametrize("layers", WINDOWS)
def test_single_pass_matches_the_iterated_replacement(tiny_lm, tokens, layers, kw):
    """One spliced pass equals L full passes that each re-encode every layer at once with
    Transcoder.forward (the route of clt_eval.replacement, written for sequences)."""
    tc = _tc(layers, runs=2, **kw)
    w = LayerWindow(layers)
    out = run_spliced(tiny_lm, tc, w, tokens)
    ref, acts, recon = _iterated(tiny_lm, tc, w, tokens)
    torch.testing.assert_close(out.logits_RBPV, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.acts_RNLF, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.recon_RNLD, recon, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def _iterated(model, tc, w, tokens):
    R, (B, P), L = tc.n_runs, tokens.shape, w.n_layers
    batch = tokens.repeat(R, 1)
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n in w.input_hooks())
    x = torch.stack([cache[h] for h in w.input_hooks()], 2).view(R, B * P, L, -1)
    for _ in range(L):
        out = tc(x)
        seen = {}
        hooks = [(h, lambda v, hook, i=i, s=seen: s.__setitem__(i, v))
                 for i, h in enumerate(w.input_hooks())]
        hooks += [(h, lambda v, hook, i=i, r=out.recon_RBLD: r[:, :, i].reshape(v.shape))
                  for i, h in enumerate(w.output_hooks())]
        logits = model.run_with_hooks(batch, fwd_hooks=hooks)
        x = torch.stack([seen[i] for i in range(L)], 2).view(R, B * P, L, -1)
    return logits.view(R, B, P, -1), out.acts_RBLF, out.recon_RBLD


def test_pure_replacement_by_hand(tiny_lm, tokens):
    """A CLT on model layers 1 and 2, written out: encode, decode, hand to the next block."""
    tc = _tc((1, 2))
    W_enc, b_enc, b_dec = tc.W_enc[0], tc.b_enc[0], tc.b_dec[0]
    W = tc.masked_W_dec()[0]
    seen = {}

    def mlp_in(ell):
        def hook(v, hook):
            seen[ell] = (v @ W_enc[ell] + b_enc[ell]).relu()
        return hook

    def mlp_out(ell):
        def hook(v, hook):
            return sum(seen[s] @ W[s, ell] for s in range(ell + 1)) + b_dec[ell]
        return hook

    with torch.no_grad():
        want = tiny_lm.run_with_hooks(tokens, fwd_hooks=[
            ("blocks.1.ln2.hook_normalized", mlp_in(0)), ("blocks.1.hook_mlp_out", mlp_out(0)),
            ("blocks.2.ln2.hook_normalized", mlp_in(1)), ("blocks.2.hook_mlp_out", mlp_out(1))])
    got = run_spliced(tiny_lm, tc, LayerWindow((1, 2)), tokens).logits_RBPV[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_skip_first_leaves_position_zero_to_the_model(tiny_lm, tokens):
    tc = _tc((0, 1, 2, 3))
    w = LayerWindow((0, 1, 2, 3))
    clean = tiny_lm(tokens)
    out = run_spliced(tiny_lm, tc, w, tokens, skip_first=True)
    torch.testing.assert_close(out.logits_RBPV[0, :, 0], clean[:, 0], atol=1e-6, rtol=0)
    assert (out.logits_RBPV[0, :, 1:] - clean[:, 1:]).abs().max() > 1e-2
    res = splice_metrics(tiny_lm, tc, w, tokens, skip_first=True)
    assert res["n_tokens"] == tokens.numel() - tokens.shape[0] and res["kl_mean"][0] > 0


def test_exact_transcoder_has_zero_kl(tiny_lm, tokens):
    """Where the MLPs output a constant, a transcoder with that b_dec is exact: KL 0."""
    model = copy.deepcopy(tiny_lm)
    tc = _tc((1, 2))
    with torch.no_grad():
        for W in tc.decoder_params():
            W.zero_()
        for ell, m in enumerate((1, 2)):
            model.blocks[m].mlp.W_out.zero_()
            tc.b_dec[0, ell] = model.blocks[m].mlp.b_out
    res = splice_metrics(model, tc, LayerWindow((1, 2)), tokens)
    assert res["kl_mean"][0] == pytest.approx(0, abs=1e-6)
    assert res["ce_spliced"][0] == pytest.approx(res["ce_clean"], abs=1e-5)
    assert res["error_norm_spliced"][0] == pytest.approx([0, 0], abs=1e-5)


def test_splice_metrics(tiny_lm, tokens):
    tc = _tc((0, 1, 2, 3), runs=2)
    res = splice_metrics(tiny_lm, tc, LayerWindow((0, 1, 2, 3)), tokens)
    assert len(res["kl_mean"]) == 2 and min(res["kl_mean"]) > 0
    assert len(res["error_norm_clean"][0]) == 4 and len(res["error_norm_spliced"][1]) == 4
    # The first window layer sees the clean residual stream either way.
    assert res["error_norm_clean"][0][0] == pytest.approx(res["error_norm_spliced"][0][0])
    ce = (res["ce_zero_ablated"] - res["ce_spliced"][0]) / (res["ce_zero_ablated"]
                                                            - res["ce_clean"])
    assert res["ce_recovered"][0] == pytest.approx(ce, rel=1e-5)


# ---- metrics on hand-computed cases ------------------------------------------------------
def test_kl_per_token():
    p = torch.tensor([[[0.0, 0.0]]])  # uniform over two tokens
    q = torch.log(torch.tensor([[[[0.75, 0.25]]]]))
    want = 0.5 * torch.log(torch.tensor(0.5 / 0.75)) + 0.5 * torch.log(torch.tensor(0.5 / 0.25))
    torch.testing.assert_close(M.kl_per_token(p, q), want.view(1, 1, 1))
    torch.testing.assert_close(M.kl_per_token(p, p[None]), torch.zeros(1, 1, 1))


def test_next_token_ce_and_recovered():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 7, generator=g)
    tokens = torch.randint(0, 7, (3, 5), generator=g)
    want = torch.stack([torch.nn.functional.cross_entropy(
        lg[:, :-1].reshape(-1, 7), tokens[:, 1:].reshape(-1)) for lg in logits])
    torch.testing.assert_close(M.next_token_ce(logits, tokens), want)
    rec = M.ce_loss_recovered(torch.tensor([2.0]), torch.tensor([2.5, 4.0]), torch.tensor([4.0]))
    torch.testing.assert_close(rec, torch.tensor([0.75, 0.0]))
    assert M.ce_loss_recovered(torch.tensor([2.0]), torch.tensor([3.0]),
                               torch.tensor([2.0])).isnan().all()


def test_relative_error_norm():
    y = torch.tensor([[[[3.0, 4.0], [1.0, 0.0]]]])  # [R=1, N=1, L=2, D=2]
    yhat = torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]]])
    torch.testing.assert_close(M.relative_error_norm(y, yhat), torch.tensor([[0.0, 1.0]]))


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("make, needle", [
    (lambda: (_tc_d(16), LayerWindow((1, 2))), "d_model=16"),
    (lambda: (_tc((1, 2)), LayerWindow((0, 1, 2))), "n_layers=2"),
    (lambda: (_tc((1, 2)), LayerWindow((3, 4))), "window layers [4]"),
    (lambda: (_tc((1, 2)), LayerWindow((1, 2), input_hook="blocks.{layer}.hook_nope")),
     "'blocks.1.hook_nope'"),
])
def test_incompatible_transcoder_is_one_line(tiny_lm, tokens, make, needle):
    tc, window = make()
    with pytest.raises(CltEvalError) as exc:
        check_compatible(tc, window, tiny_lm)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(CltEvalError):
        run_spliced(tiny_lm, tc, window, tokens)


def _tc_d(d_model: int) -> Transcoder:
    return Transcoder([TranscoderConfig(d_model=d_model, n_layers=2, n_features=4)])
