"""Sparse-aware arithmetic: at real widths a TopK, BatchTopK or JumpReLU transcoder decodes from
its active features only and computes its encoder gradients from the nonzero entries of the
pre-activations' gradient only (``clt_eval.sparse``), forward and backward, and must agree with
the dense path; a run in an ensemble must still equal the same run alone, bit for bit."""

from __future__ import annotations

import pytest
import torch

from clt_eval import sparse as S
from clt_eval import transcoder as T
from clt_eval.config import LossConfig, TranscoderConfig
from clt_eval.losses import training_loss
from clt_eval.training.config import RunSpec, TrainConfig
from clt_eval.training.trainer import full_batches, train
from clt_eval.transcoder import Transcoder

B, L, D, F = 12, 3, 6, T.SPARSE_MIN_FEATURES

CASES = {
    "topk": dict(activation="topk", k=8),
    "batchtopk": dict(activation="batchtopk", k=8),
    # bandwidth wide enough that some features sit just below the threshold, where the
    # straight-through estimator reads the activation gradient of an inactive feature
    "jumprelu": dict(activation="jumprelu", jumprelu_threshold_init=3.5,
                     jumprelu_bandwidth=1.0),
    # k counted per layer rather than across layers
    "topk_layer": dict(activation="topk", k=3, topk_mode="per_layer"),
    "batchtopk_layer": dict(activation="batchtopk", k=3, topk_mode="per_layer"),
    # an l1 penalty reads every activation (and the decoder norms) densely
    "jumprelu_l1": dict(activation="jumprelu", jumprelu_threshold_init=3.5,
                        jumprelu_bandwidth=1.0),
}
LOSSES = {"topk": LossConfig(penalty="topk", decoder_norm="none"),
          "batchtopk": LossConfig(penalty="batchtopk", decoder_norm="none"),
          "jumprelu": LossConfig(penalty="l0", decoder_norm="none")}
LOSSES |= {"topk_layer": LOSSES["topk"], "batchtopk_layer": LOSSES["batchtopk"],
           "jumprelu_l1": LossConfig(penalty="l1", decoder_norm="concatenated")}


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


# ---- the sparse encoder backward and the listed decode, against the dense path -----------
def _counting(monkeypatch):
    """Counts of the encoder backward's listed and dense layer computations."""
    calls = {"listed": 0, "dense": 0, "scan": 0}
    for name, key in (("_listed_layer", "listed"), ("_dense_layer", "dense"),
                      ("_entries_of", "scan")):
        real = getattr(S, name)
        monkeypatch.setattr(S, name, lambda *a, _r=real, _k=key: calls.update(
            {_k: calls[_k] + 1}) or _r(*a))
    return calls


def _full_step(tc, kind, x, y, sparse, monkeypatch, dead=None, preact=0.0):
    """(pre, acts, recon, loss, grads) of one training step, sparse or dense."""
    monkeypatch.setattr(Transcoder, "sparse_decode", sparse)
    tc.zero_grad()
    out = tc(x)
    cfg = LossConfig(**{**vars(LOSSES[kind]), "preact_coef": preact})
    loss = training_loss(tc, out, y, cfg, torch.full((tc.n_runs,), 0.1), dead).total_R
    loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in tc.named_parameters()}
    return out, loss.detach(), grads


def _assert_sparse_equals_dense(tc, kind, x, y, monkeypatch, **kw):
    state = {k: v.clone() for k, v in tc.state_dict().items()}
    out_s, loss_s, g_s = _full_step(tc, kind, x, y, True, monkeypatch, **kw)
    tc.load_state_dict(state)
    out_d, loss_d, g_d = _full_step(tc, kind, x, y, False, monkeypatch, **kw)
    # the same z up to rounding, hence the same selection and the same activations
    torch.testing.assert_close(out_s.pre_RBLF, out_d.pre_RBLF, rtol=1e-6, atol=1e-6)
    assert torch.equal(out_s.acts_RBLF != 0, out_d.acts_RBLF != 0)
    torch.testing.assert_close(out_s.acts_RBLF, out_d.acts_RBLF, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_s.recon_RBLD, out_d.recon_RBLD, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-6, atol=1e-5)
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-5, atol=1e-5, msg=name)
        assert g_d[name].abs().sum() > 0 or name == "b_dec" or "W_dec" in name, name
    return g_s


@pytest.mark.parametrize("per_run_x", [False, True], ids=["shared_x", "per_run_x"])
@pytest.mark.parametrize("archs", [["clt"], ["plt", "clt", "plt"]], ids="-".join)
@pytest.mark.parametrize("kind", CASES)
def test_sparse_encoder_backward_matches_dense(kind, archs, per_run_x, monkeypatch):
    tc = _tc(archs, **CASES[kind])
    tc.k_R[0] = 5  # runs of one ensemble may keep different numbers of features
    x, y = _data(2)
    if per_run_x:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(len(archs), B, L, D, generator=g) * 3
    calls = _counting(monkeypatch)
    g_s = _assert_sparse_equals_dense(tc, kind, x, y, monkeypatch)
    assert calls["listed"] == L * len(archs) and calls["dense"] == 0
    # TopK and BatchTopK list their kept entries as they keep them: nothing is scanned for;
    # JumpReLU's gradient arrives dense and its nonzero entries are found per run.
    assert calls["scan"] == (len(archs) if kind.startswith("jumprelu") else 0)
    if kind.startswith("jumprelu"):
        assert g_s["log_threshold"].abs().sum() > 0


@pytest.mark.parametrize("kind", ["topk", "batchtopk_layer"])
def test_auxk_and_dense_terms_reach_the_encoder(kind, monkeypatch):
    """AuxK (dead features) and the pre-activation penalty send dense gradients to z, which
    the encoder's backward adds to the listed ones before reading its nonzero entries."""
    tc = _tc(["clt", "plt"], **CASES[kind])
    x, y = _data(3)
    dead = torch.zeros(2, L, F, dtype=torch.bool)
    dead[0, :, ::3] = True  # run 0 has dead features (AuxK on), run 1 none
    calls = _counting(monkeypatch)
    _assert_sparse_equals_dense(tc, kind, x, y, monkeypatch, dead=dead)
    assert calls["scan"] == 2 and calls["listed"] == 2 * L
    # the penalty on negative z reaches (almost) every entry: dense products for both runs
    calls.update(listed=0, dense=0, scan=0)
    _assert_sparse_equals_dense(tc, kind, x, y, monkeypatch, preact=1e-2)
    assert calls["dense"] == 2 * L and calls["listed"] == 0
    # a run keeping half its features decodes densely: its activations' gradient arrives
    # dense, and its encoder gradient takes the dense products; the other run stays listed
    tc.k_R[1] = F // 2
    calls.update(listed=0, dense=0, scan=0)
    _assert_sparse_equals_dense(tc, kind, x, y, monkeypatch)
    assert calls["dense"] == L and calls["listed"] == L


@pytest.mark.parametrize("kind", ["topk", "batchtopk_layer"])
def test_a_term_on_the_activations_gets_them_built_from_the_list(kind, monkeypatch):
    """TopK and BatchTopK training builds no dense activations; a term that reads them gets
    them built from the listed entries, with the dense path's gradients."""
    tc = _tc(["clt", "plt"], **CASES[kind])
    x, y = _data(8)
    state = {k: v.clone() for k, v in tc.state_dict().items()}
    grads = []
    for sparse in (True, False):
        monkeypatch.setattr(Transcoder, "sparse_decode", sparse)
        tc.load_state_dict(state)
        tc.zero_grad()
        out = tc(x)
        loss = training_loss(tc, out, y, LOSSES[kind], torch.zeros(2)).total_R.sum()
        (loss + 0.1 * out.acts_RBLF.pow(2).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in tc.named_parameters()})
    assert grads[0]["W_enc"].abs().sum() > 0
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-5,
                                   msg=name)


def test_activations_are_built_on_first_read_and_kept_only_with_their_graph():
    tc = _tc(["plt", "clt"], **CASES["topk"])
    out = tc(_data(9)[0])
    assert out.active is not None and out._acts is None  # nothing dense yet
    with torch.no_grad():
        without_graph = out.acts_RBLF
    assert out._acts is None  # a later read may need the graph: not kept
    acts = out.acts_RBLF
    assert acts.requires_grad and out.acts_RBLF is acts
    assert torch.equal(acts, without_graph) and torch.equal(acts, tc.activate(out.pre_RBLF))
    acts.sum().backward()
    assert tc.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("per_run_x", [False, True])
def test_sparse_encode_gradient_of_the_inputs(per_run_x):
    g = torch.Generator().manual_seed(4)
    R, F_ = 2, 64
    x = torch.randn(*((R,) if per_run_x else ()), 9, L, D, generator=g, requires_grad=True)
    W = torch.randn(R, L, D, F_, generator=g, requires_grad=True)
    b = torch.randn(R, L, F_, generator=g, requires_grad=True)
    w = torch.randn(R, 9, L, F_, generator=g) * (torch.rand(R, 9, L, F_, generator=g) < 0.05)
    (S.sparse_encode(x, W, b) * w).sum().backward()
    got = [t.grad.clone() for t in (x, W, b)]
    for t in (x, W, b):
        t.grad = None
    xs = x if per_run_x else x[None]
    ((torch.einsum("rbld,rldf->rblf", xs, W) + b[:, None]) * w).sum().backward()
    for mine, ref in zip(got, (x.grad, W.grad, b.grad), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def _specs(kind: str) -> list[RunSpec]:
    """Three runs of one ensemble: PLT and CLT, each with its own k (and seed)."""
    cfg = {n: v for n, v in CASES[kind].items() if n != "k"}
    loss = LOSSES[kind]
    priced = loss.penalty not in ("topk", "batchtopk")
    return [RunSpec(n_features=F, penalty=loss.penalty, decoder_norm=loss.decoder_norm,
                    seed=seed, arch=arch, sparsity_coef=0.05 if priced else 0.0,
                    k=None if priced else k, **cfg)
            for arch, k, seed in [("clt", 4, 0), ("plt", 6, 1), ("clt", 3, 2)]]


def _train(specs, x, y, batch_size):
    tc = Transcoder([s.transcoder_config(D, L) for s in specs], seeds=[s.seed for s in specs])
    cfg = TrainConfig(steps=8, lr=0.02, batch_size=batch_size, log_every=0, device="cpu",
                      dead_window=2)  # a short window: AuxK's dead-feature path runs too
    train(tc, [s.loss_config() for s in specs], torch.tensor([s.sparsity_coef for s in specs]),
          full_batches(x, y, batch_size, seed=[s.seed for s in specs]), cfg)
    return tc


@pytest.mark.parametrize("batch_size", [0, 5], ids=["shared_x", "per_run_x"])
@pytest.mark.parametrize("kind", CASES)
def test_trained_sparse_run_in_an_ensemble_of_three_equals_the_run_alone(kind, batch_size):
    """Several training steps (AuxK on: dead window 2) of a mixed PLT/CLT ensemble with
    different k; every run equals the same run trained alone, to the last bit. 13 samples:
    a run's slice of the ensemble's tensors then starts at an address of another alignment
    than the same run's tensor alone, which some BLAS reductions notice."""
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(13, L, D, generator=g) * 3, torch.randn(13, L, D, generator=g)
    specs = _specs(kind)
    ens = _train(specs, x, y, batch_size)
    for i, spec in enumerate(specs):
        alone = _train([spec], x, y, batch_size)
        mine, other = ens.select([i]).state_dict(), alone.state_dict()
        for name, t in mine.items():
            assert torch.equal(t[0], other[name][0]), f"run {i}: {name} differs"


@pytest.mark.parametrize("kind", ["topk", "batchtopk_layer"])
def test_listed_entries_tell_which_features_fired(kind):
    """``ActiveSet.fired``: the dead-feature clock's input without a pass over [R,B,L,F]."""
    tc = _tc(["clt", "plt"], **CASES[kind])
    x = _data(4)[0]
    pre, active = S.sparse_encode(x, tc.W_enc, tc.b_enc, tc._selection(x))
    acts = tc.activate(pre)  # the activations the listed entries stand for
    assert torch.equal(active.dense(), acts)
    assert torch.equal(active.fired(), (acts > 0).any(1))
    R, B_ = acts.shape[:2]
    assert torch.equal(active.l0(), (acts > 0).float().reshape(R, B_, -1).sum(-1))
    assert active.fired().any() and not active.fired().all()


@pytest.mark.parametrize("per_run_x", [False, True], ids=["shared_x", "per_run_x"])
@pytest.mark.parametrize("kind", ["topk", "batchtopk_layer", "jumprelu"])
def test_inputs_gradient_through_the_listed_path(kind, per_run_x, monkeypatch):
    tc = _tc(["clt", "plt"], **CASES[kind])
    x, y = _data(7)
    if per_run_x:
        x = torch.stack([x, x.flip(0)])
    grads = []
    for sparse in (True, False):
        monkeypatch.setattr(Transcoder, "sparse_decode", sparse)
        xr = x.clone().requires_grad_()
        training_loss(tc, tc(xr), y, LOSSES[kind], torch.full((2,), 0.1)).total_R.sum().backward()
        grads.append(xr.grad)
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_entries_grouped_by_feature_as_a_stable_sort_groups_them():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 50, (3000,), generator=g).sort().values
    cols = torch.randint(0, 200, (3000,), generator=g)
    cols[:40] = 7  # a crowded feature; some features get no entry at all
    got = S.Listed(rows, cols, 50, 200).by_col()
    sorted_cols, order = torch.sort(cols, stable=True)
    want = (order, rows[order], sorted_cols, torch.searchsorted(sorted_cols, torch.arange(200)))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    empty = S.Listed(rows[:0], cols[:0], 50, 200).by_col()
    assert empty[3].tolist() == [0] * 200
