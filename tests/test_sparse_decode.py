"""Sparse-aware decode: at real widths a TopK, BatchTopK or JumpReLU transcoder decodes from
its active features only, forward and backward, and must agree with the dense decode."""

from __future__ import annotations

import pytest
import torch

from clt_eval import transcoder as T
from clt_eval.config import LossConfig, TranscoderConfig
from clt_eval.losses import training_loss
from clt_eval.transcoder import Transcoder

B, L, D, F = 12, 3, 6, T.SPARSE_MIN_FEATURES

CASES = {
    "topk": dict(activation="topk", k=8),
    "batchtopk": dict(activation="batchtopk", k=8),
    # bandwidth wide enough that some features sit just below the threshold, where the
    # straight-through estimator reads the activation gradient of an inactive feature
    "jumprelu": dict(activation="jumprelu", jumprelu_threshold_init=3.5,
                     jumprelu_bandwidth=1.0),
}
LOSSES = {"topk": LossConfig(penalty="topk", decoder_norm="none"),
          "batchtopk": LossConfig(penalty="batchtopk", decoder_norm="none"),
          "jumprelu": LossConfig(penalty="l0", decoder_norm="none")}


def _tc(archs, **kw) -> Transcoder:
    cfgs = [TranscoderConfig(d_model=D, n_layers=L, n_features=F, arch=a, **kw) for a in archs]
    return Transcoder(cfgs, seeds=list(range(len(archs))))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=g) * 3, torch.randn(B, L, D, generator=g)


def _step(tc, kind, x, y, sparse: bool, monkeypatch):
    """(outputs, loss, grads) of one training step, decoding sparsely or densely."""
    monkeypatch.setattr(Transcoder, "sparse_decode", sparse)
    tc.zero_grad()
    out = tc(x)
    loss = training_loss(tc, out, y, LOSSES[kind], torch.full((tc.n_runs,), 0.1)).total_R
    loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in tc.named_parameters()}
    return out, loss.detach(), grads


@pytest.mark.parametrize("archs", [["clt"], ["plt"], ["clt", "plt"]], ids="-".join)
@pytest.mark.parametrize("kind", CASES)
def test_sparse_decode_matches_dense(kind, archs, monkeypatch):
    tc = _tc(archs, **CASES[kind])
    x, y = _data()
    calls = []
    real = T.sparse_source_decode
    monkeypatch.setattr(T, "sparse_source_decode", lambda *a: calls.append(1) or real(*a))
    state = {k: v.clone() for k, v in tc.state_dict().items()}
    out_s, loss_s, g_s = _step(tc, kind, x, y, True, monkeypatch)
    assert len(calls) == L * len(archs), "the sparse path was not taken"
    tc.load_state_dict(state)  # BatchTopK's running threshold moved: start again
    out_d, loss_d, g_d = _step(tc, kind, x, y, False, monkeypatch)
    assert len(calls) == L * len(archs)
    torch.testing.assert_close(out_s.recon_RBLD, out_d.recon_RBLD, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_s, loss_d, atol=1e-5, rtol=1e-5)
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], atol=1e-5, rtol=1e-5, msg=name)
    if kind == "jumprelu":  # the case where inactive features' gradients matter
        assert g_s["log_threshold"].abs().sum() > 0


def test_sparse_decode_op_against_dense_product():
    g = torch.Generator().manual_seed(3)
    acts = torch.randn(9, 40, generator=g) * (torch.rand(9, 40, generator=g) < 0.1)
    acts.requires_grad_()
    W = torch.randn(40, 15, generator=g, requires_grad=True)
    support = acts.detach() != 0
    support[0, 5] = True  # a listed but inactive feature still gets its gradient
    w = torch.randn(9, 15, generator=g)
    (T.sparse_source_decode(acts, support, W) * w).sum().backward()
    ga, gW = acts.grad.clone(), W.grad.clone()
    acts.grad = W.grad = None
    ((acts @ W) * w).sum().backward()
    torch.testing.assert_close(gW, W.grad)
    torch.testing.assert_close(ga[support], acts.grad[support])
    assert (ga[~support] == 0).all()  # nothing computed for unlisted features


def test_dense_when_many_features_fire_or_narrow():
    tc = _tc(["clt", "clt"], activation="topk", k=8)
    tc.k_R[1] = F // 2  # most positive features on: denser than the sparse path pays for
    x, _ = _data()
    out = tc(x)
    assert tc.sparse_runs(out.acts_RBLF != 0).tolist() == [True, False]
    narrow = Transcoder([TranscoderConfig(d_model=D, n_layers=L, n_features=64,
                                          activation="topk", k=1)])
    assert narrow.sparse_runs(narrow(x).acts_RBLF != 0) is None
    relu = Transcoder([TranscoderConfig(d_model=D, n_layers=L, n_features=F)])
    assert relu.sparse_runs(torch.zeros(1, B, L, F, dtype=torch.bool)) is None


def test_sparse_run_in_an_ensemble_equals_the_run_alone():
    """Run independence holds on the sparse path too, and with a dense neighbour: a TopK PLT
    run (sparse) next to a CLT run with a large k (dense)."""
    cfg = lambda a, k: TranscoderConfig(d_model=D, n_layers=L, n_features=F,  # noqa: E731
                                        activation="topk", k=k, arch=a)
    x, y = _data(1)
    ens = Transcoder([cfg("clt", F // 2), cfg("plt", 8)], seeds=[0, 1])
    alone = Transcoder([cfg("plt", 8)], seeds=[1])
    loss_cfg = LossConfig(penalty="topk", decoder_norm="none")
    results = []
    for tc in (ens, alone):
        out = tc(x)
        training_loss(tc, out, y, loss_cfg, torch.ones(tc.n_runs)).total_R.sum().backward()
        results.append((out, {n: p.grad for n, p in tc.select([tc.n_runs - 1]).named_parameters()
                              if p.grad is not None}))
    assert ens.sparse_runs(results[0][0].acts_RBLF != 0).tolist() == [False, True]
    assert torch.equal(results[0][0].recon_RBLD[1], results[1][0].recon_RBLD[0])
    for s in range(L):
        got = ens.decoder_params()[s].grad[1, :, :1]
        assert torch.equal(got, alone.decoder_params()[s].grad[0]), s
    assert torch.equal(ens.W_enc.grad[1], alone.W_enc.grad[0])
