"""A run trained inside an ensemble equals the same run trained alone, bit for bit.

The shapes are deliberately awkward (7 inputs, 5 features, 13 samples): with the toy's round
shapes ([16,10]@[10,16]) BLAS happens to round a batched product as it rounds a single one,
and a test on them would pass even with the batched kernels; with these it does not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clt_eval.training.config import RunSpec, TrainConfig
from clt_eval.training.trainer import full_batches, init_b_dec, train
from clt_eval.transcoder import Transcoder, row_matmul, row_sum, run_matmul

B, L, D, F = 13, 3, 7, 5


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=g)
    y = torch.tanh(x @ torch.randn(D, D, generator=g)) + 0.1
    return x, y


def _spec(**kw) -> RunSpec:
    return RunSpec(n_features=F, **kw)


# Five runs per activation (one ensemble each): arch, penalty, decoder norm, λ, k and seed vary.
ENSEMBLES = {
    "relu": [_spec(arch="clt", penalty="l1", sparsity_coef=0.01, seed=0),
             _spec(arch="plt", penalty="tanh", decoder_norm="summed", sparsity_coef=0.3,
                   seed=1, preact_coef=1e-3),
             _spec(arch="clt", penalty="tanh", decoder_norm="per_block", sparsity_coef=0.1,
                   seed=2, cross_layer_coef=0.5),
             _spec(arch="clt", penalty="l1", decoder_norm="summed", sparsity_coef=1.0, seed=3),
             _spec(arch="plt", penalty="l1", decoder_norm="per_block", sparsity_coef=0.03,
                   seed=4)],
    "jumprelu": [_spec(arch="clt", penalty="l0", decoder_norm="none", sparsity_coef=0.01),
                 _spec(arch="plt", penalty="l0", decoder_norm="none", sparsity_coef=0.1,
                       seed=1),
                 _spec(arch="clt", penalty="l1", decoder_norm="summed", sparsity_coef=0.05,
                       seed=2, activation="jumprelu"),
                 _spec(arch="clt", penalty="tanh", sparsity_coef=0.1, seed=3,
                       activation="jumprelu"),
                 _spec(arch="plt", penalty="l0", decoder_norm="none", sparsity_coef=0.003,
                       seed=4)],
    "topk": [_spec(arch=a, penalty="topk", decoder_norm="none", k=k, seed=s)
             for a, k, s in [("clt", 1, 0), ("plt", 3, 1), ("clt", 2, 2), ("plt", 5, 3),
                             ("clt", 3, 4)]],
    "batchtopk": [_spec(arch=a, penalty="batchtopk", decoder_norm="none", k=k, seed=s)
                  for a, k, s in [("clt", 1, 0), ("plt", 3, 1), ("clt", 2, 2), ("plt", 2, 5),
                                  ("clt", 4, 6)]],
}
# One ensemble of every activation, as the toys' sweeps train them (mix_activations).
ENSEMBLES["mixed"] = [ENSEMBLES["relu"][0], ENSEMBLES["jumprelu"][1], ENSEMBLES["topk"][2],
                      ENSEMBLES["batchtopk"][1], ENSEMBLES["jumprelu"][3]]


def _fit(specs, data, steps, batch_size=0):
    x, y = data
    tc = Transcoder([s.transcoder_config(D, L) for s in specs], seeds=[s.seed for s in specs])
    init_b_dec(tc, y)
    cfg = TrainConfig(steps=steps, lr=0.02, batch_size=batch_size, log_every=0, device="cpu",
                      dead_window=5)  # a short window, so AuxK's dead-feature path runs too
    final = train(tc, [s.loss_config() for s in specs],
                  torch.tensor([s.sparsity_coef for s in specs]),
                  full_batches(x, y, batch_size, seed=[s.seed for s in specs]), cfg)
    return tc, final


def _assert_same_run(ens, i, alone, j=0):
    # select: a PLT run alone stores only its own decoder slots, not the ensemble's L - s
    mine, other = ens.select([i]).state_dict(), alone.select([j]).state_dict()
    for name, t in mine.items():
        assert torch.equal(t[0], other[name][0]), f"run {i}: {name} differs"


@pytest.mark.parametrize("activation, batch_size", [
    ("relu", 0), ("jumprelu", 0), ("topk", 0), ("batchtopk", 0),
    ("relu", 5), ("batchtopk", 5),  # minibatches: each run its own order
    ("mixed", 0), ("mixed", 5),
])
def test_a_run_in_an_ensemble_equals_the_run_alone(data, activation, batch_size):
    specs = ENSEMBLES[activation]
    steps = 200 if batch_size == 0 else 60
    ens, final = _fit(specs, data, steps, batch_size)
    alone, final_alone = _fit([specs[3]], data, steps, batch_size)
    _assert_same_run(ens, 3, alone)
    for key in ("loss", "mse", "sparsity", "l0"):
        assert torch.equal(final[key][3], final_alone[key][0]), key
    # Another composition, the runs at other places.
    order = [4, 2, 0]
    part, _ = _fit([specs[i] for i in order], data, steps, batch_size)
    for j, i in enumerate(order):
        _assert_same_run(ens, i, part, j)



def test_a_stretch_of_mixed_row_norm_penalties_gives_each_run_its_own_bits(data, monkeypatch):
    """l1 and tanh runs with concatenated or summed norms and different c make one stretch
    (``losses.family``: each computed with its own norm and penalty chosen per run); every
    run gets the bits it gets alone, loss and logged penalty included."""
    from clt_eval import losses

    monkeypatch.setattr(losses, "MIN_STRETCH_RUNS", 1)
    specs = [_spec(arch="clt", penalty="l1", sparsity_coef=0.05, seed=0),
             _spec(arch="clt", penalty="tanh", sparsity_coef=0.1, tanh_scale=3.0, seed=1),
             _spec(arch="clt", penalty="l1", decoder_norm="summed", sparsity_coef=0.02, seed=2),
             _spec(arch="clt", penalty="tanh", decoder_norm="summed", sparsity_coef=0.3,
                   tanh_scale=0.7, seed=3)]
    plan = losses.LossPlan.build([s.loss_config() for s in specs], len(specs))
    assert [seg[0] for seg in plan.segments] == ["rows"] and losses._by_segment(plan, 4)
    ens, final = _fit(specs, data, 80)
    for i, s in enumerate(specs):
        alone, final_alone = _fit([s], data, 80)
        _assert_same_run(ens, i, alone)
        for key in ("loss", "sparsity"):
            assert torch.equal(final[key][i], final_alone[key][0]), (i, key)

@pytest.mark.parametrize("stretch_runs", [1, 10_000])
def test_a_run_gets_the_same_bits_in_layout_order_and_in_any_order(data, monkeypatch,
                                                                    stretch_runs):
    """The sweep orders an ensemble's runs by kind (``layout_key``), so that each kind is
    computed on a view of its rows; any other order gathers them. Both give every run the
    same bits, with the penalties computed stretch by stretch (``stretch_runs`` 1: every
    laid-out ensemble qualifies) or every penalty for every run."""
    from clt_eval import activations as act
    from clt_eval import losses
    from clt_eval.training.experiment import layout_key

    monkeypatch.setattr(losses, "MIN_STRETCH_RUNS", stretch_runs)
    specs = [s for kind in ("relu", "jumprelu", "topk", "batchtopk") for s in ENSEMBLES[kind]]
    laid_out = sorted(specs, key=layout_key)
    scrambled = laid_out[1::2] + laid_out[::2]
    fits = {}
    for name, order in (("laid out", laid_out), ("scrambled", scrambled)):
        tc, _ = _fit(order, data, 80)
        segs_used = act.contiguous(tc.activation_segments, len(tc.activation_groups))
        assert segs_used == (name == "laid out"), name
        if name == "laid out":
            plan = losses.LossPlan.build([s.loss_config() for s in order], len(order))
            assert losses._by_segment(plan, len(order)) == (stretch_runs == 1)
        fits[name] = tc
    for i, s in enumerate(laid_out):
        _assert_same_run(fits["laid out"], i, fits["scrambled"], scrambled.index(s))
    for penalty in ("tanh", "l0"):  # and the same as alone
        i = next(i for i, s in enumerate(laid_out) if s.penalty == penalty)
        _assert_same_run(fits["laid out"], i, _fit([laid_out[i]], data, 80)[0])


def test_minibatch_order_follows_each_runs_own_seed(data):
    x, y = data
    both = full_batches(x, y, batch_size=4, seed=[3, 8])
    one = full_batches(x, y, batch_size=4, seed=[8])
    for _ in range(5):  # past the end of the first epoch
        xb, yb = next(both)
        assert xb.shape == (2, 4, L, D)
        assert torch.equal(xb[1], next(one)[0][0])
    assert not torch.equal(*next(full_batches(x, y, 4, seed=[3, 8]))[0])


@pytest.mark.parametrize("shape", [(13, 8, 5), (5, 13, 7), (4, 1, 3), (3, 0, 2), (2, 300, 200)])
@pytest.mark.parametrize("shared_a", [False, True])
def test_run_matmul_does_not_depend_on_the_other_runs(shape, shared_a):
    """One run's product (and its gradients) is the same inside any batch of runs, for odd,
    even, unit and empty inner sizes (the pairwise sum's every branch), with ``a`` per run or
    shared by all (an input batch); the last shape takes the one-BLAS-call-per-matrix path."""
    M, K, N = shape
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1 if shared_a else 6, 2, M, K, generator=g, requires_grad=True)
    b = torch.randn(6, 2, K, N, generator=g, requires_grad=True)
    w = torch.randn(6, 2, M, N, generator=g)
    (run_matmul(a, b) * w).sum().backward()
    for r in (0, 5):
        a1 = (a[:1] if shared_a else a[r:r + 1]).detach().clone().requires_grad_()
        b1 = b[r:r + 1].detach().clone().requires_grad_()
        out = run_matmul(a1, b1)
        (out * w[r:r + 1]).sum().backward()
        assert torch.equal(out[0], run_matmul(a, b)[r])
        assert torch.equal(b1.grad[0], b.grad[r])
        if not shared_a:  # a shared factor's gradient sums over the runs
            assert torch.equal(a1.grad[0], a.grad[r])
    torch.testing.assert_close(run_matmul(a, b), a @ b)


def test_row_sum_of_a_lone_long_row_equals_its_row_in_a_batch():
    """On several threads PyTorch sums a lone long row in per-thread pieces, unlike a row of
    a batch; row_sum must not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(3, 100_000, generator=torch.Generator().manual_seed(2))
        for r in range(3):
            assert torch.equal(row_sum(x[r:r + 1].clone())[0], row_sum(x)[r])
    finally:
        torch.set_num_threads(threads)


# ---- batch-invariant models --------------------------------------------------------------
@pytest.mark.parametrize("K,N", [(7, 5), (10, 16), (64, 48)])
def test_row_matmul_gives_a_row_the_same_bits_in_any_batch(K, N):
    g = torch.Generator().manual_seed(K)
    a, b = torch.randn(2000, K, generator=g), torch.randn(K, N, generator=g)
    ref = row_matmul(a[:1], b)
    for M in (1, 2, 3, 16, 100, 1344, 2000):
        out = row_matmul(a[:M], b)
        assert torch.equal(out[:1], ref), M
        torch.testing.assert_close(out, a[:M] @ b, rtol=1e-5, atol=1e-5)
    # a strided factor (the transpose a projector is often read through) changes nothing
    assert torch.equal(row_matmul(a[:1], b.T.contiguous().T), ref)


def test_the_toys_model_gives_a_sample_the_same_bits_in_any_batch():
    """Awkward shapes, where a BLAS product would round a row by the batch's size."""
    from clt_eval.case_studies._mlp_stack import LinearEmbed, mlp_stack

    g = torch.Generator().manual_seed(3)
    D, H = 11, 13
    mlps = [(torch.randn(D, H, generator=g), torch.randn(H, generator=g),
             torch.randn(H, D, generator=g)) for _ in range(3)]
    model = mlp_stack(mlps, LinearEmbed(torch.randn(6, D, generator=g)))
    inputs = torch.randn(3000, 6, generator=g)
    ref = model(inputs[:1])
    assert model.batch_invariant
    for M in (2, 17, 256, 1000, 3000):
        assert torch.equal(model(inputs[:M])[:1], ref), M


def test_a_batch_invariant_model_evaluates_runs_together_as_it_does_one_at_a_time():
    """The toy's model declares itself batch-invariant, so evaluate pushes every run's samples
    through it at once; that must give exactly what the per-run pass gives."""
    from clt_eval.case_study import load_case_study
    from clt_eval.evaluate import _behaviour, _behaviour_per_run

    case = load_case_study("boolean_two_step")
    model = case.model()
    assert model.batch_invariant
    specs = [RunSpec(arch=a, n_features=9, seed=s, sparsity_coef=0.1)
             for s, a in enumerate(("clt", "plt", "clt", "plt", "clt", "clt", "plt"))]
    tc = Transcoder([s.transcoder_config(case.d_model, case.n_layers) for s in specs],
                    seeds=[s.seed for s in specs]).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in tc.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        inputs = case.inputs()
        true_final = model(inputs)
        together = _behaviour(case, model, tc, inputs, true_final)
        apart = _behaviour_per_run(case, model, tc, inputs, true_final)
    assert together.keys() == apart.keys()
    for key in together:
        a, b = together[key], apart[key]
        if isinstance(a, dict):
            assert all(torch.equal(a[k], b[k]) for k in a), key
        else:
            assert torch.equal(a, b), key


@pytest.mark.parametrize("batch", [13, 4_000])
def test_a_plt_run_decodes_in_a_mixed_ensemble_as_alone(batch):
    """Small products: PLT rows decode with the CLT rows, their absent slots read as zeros;
    from LOOP_MIN_MACS multiply-adds (BLAS, whose sums depend on the product's width) they
    decode apart. Either way a PLT run's output and gradients are its alone bits."""
    from clt_eval.transcoder import LOOP_MIN_MACS

    specs = [_spec(arch="clt", seed=0), _spec(arch="plt", seed=1), _spec(arch="clt", seed=2)]
    tc = Transcoder([s.transcoder_config(D, L) for s in specs], seeds=[0, 1, 2])
    g = torch.Generator().manual_seed(3)
    acts = torch.rand(3, batch, L, F, generator=g).requires_grad_()
    assert tc._plt_apart(acts) == (batch * F * L * D >= LOOP_MIN_MACS)
    one = tc.select([1])
    mine = acts.detach()[1:2].clone().requires_grad_()
    y_all, y_one = tc.write(acts), one.write(mine)
    assert torch.equal(y_all[1:2], y_one)
    grad = torch.randn(y_all.shape, generator=g)
    y_all.backward(grad)
    y_one.backward(grad[1:2])
    assert torch.equal(acts.grad[1:2], mine.grad)
    for s in range(L):
        own = getattr(tc, f"W_dec_{s}").grad[1, :, :1]
        assert torch.equal(own, getattr(one, f"W_dec_{s}").grad[0])
        assert not getattr(tc, f"W_dec_{s}").grad[1, :, 1:].any()  # absent slots: no grad


@pytest.mark.parametrize("archs", [("clt", "plt", "plt", "clt"), ("plt", "clt", "plt", "clt")])
def test_absent_slots_stay_zero_in_training_and_written_ones_are_masked(archs):
    """A mixed ensemble's decode reads PLT runs' absent slots unmasked while they hold zeros:
    training keeps them zero (their gradients are zeroed as they accumulate), and values a
    caller writes there are masked out all the same. PLT runs side by side or apart."""
    specs = [_spec(arch=a, seed=i) for i, a in enumerate(archs)]
    tc = Transcoder([s.transcoder_config(D, L) for s in specs], seeds=[0, 1, 2, 3])
    plt = [i for i, a in enumerate(archs) if a == "plt"]
    g = torch.Generator().manual_seed(5)
    opt = torch.optim.Adam(tc.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        tc.write(torch.rand(4, 13, L, F, generator=g)).pow(2).sum().backward()
        assert not tc.W_dec_0.grad[plt, :, 1:].any()
        assert tc.W_dec_0.grad[[i for i in range(4) if i not in plt], :, 1:].abs().sum() > 0
        opt.step()
    assert tc._absent_zero(0) and not tc.W_dec_0.detach()[plt, :, 1:].any()
    acts = torch.rand(4, 13, L, F, generator=g)
    clean = tc.write(acts)
    with torch.no_grad():
        tc.W_dec_0[plt[-1], :, 1:] = 7.0
    assert not tc._absent_zero(0)
    assert torch.equal(tc.write(acts), clean)


@pytest.mark.parametrize(("batch_size", "preact"), [(0, True), (5, True), (0, False)])
def test_relu_runs_of_several_widths_padded_into_one_ensemble_keep_their_alone_bits(
        data, monkeypatch, batch_size, preact):
    """``Transcoder.ragged``: each run stores the widest run's features; its extra ones stay
    exact zeros, and every run's weights, loss, penalty and L0 are its alone ones. With a
    pre-activation term the penalties are computed width by width; without one, on the whole
    padded tensors (``losses._padding_adds_nothing``)."""
    from clt_eval import losses
    from clt_eval.transcoder import padding_is_exact

    widths = [5, 2, 8, 3, 5]
    specs = [dataclasses.replace(s, n_features=w, preact_coef=s.preact_coef * preact)
             for s, w in zip(ENSEMBLES["relu"], widths, strict=True)]
    assert padding_is_exact(L, D, max(widths), B, "cpu", torch.float32)
    steps = 120 if batch_size == 0 else 60
    whole = []
    check = losses._padding_adds_nothing
    monkeypatch.setattr(losses, "_padding_adds_nothing",
                        lambda *a: whole.append(check(*a)) or whole[-1])
    ens, final = _fit(specs, data, steps, batch_size)
    assert whole and set(whole) == {not preact}
    assert ens.ragged and ens.cfg.n_features == 8
    for i, w in enumerate(widths):
        assert not ens.W_enc.detach()[i, ..., w:].any()
        assert not ens.b_enc.detach()[i, ..., w:].any()
        assert not any(W.detach()[i, w:].any() for W in ens.decoder_params())
        alone, final_alone = _fit([specs[i]], data, steps, batch_size)
        assert ens.select([i]).cfg.n_features == w
        _assert_same_run(ens, i, alone)
        for key in ("loss", "mse", "sparsity", "l0"):
            assert torch.equal(final[key][i], final_alone[key][0]), (i, key)


def test_a_padded_ensemble_trains_and_evaluates_each_run_as_its_width_alone():
    """End to end on the Boolean toy: ``train_group`` on runs of two widths (one padded
    ensemble) gives every run the record and weights of its width's ensemble alone."""
    import json

    from clt_eval.case_study import load_case_study
    from clt_eval.training.experiment import case_data, train_group

    case = load_case_study("boolean_two_step")
    model = case.model()
    data = case_data(case, model)
    specs = [RunSpec(arch=a, penalty=p, n_features=w, seed=i, sparsity_coef=0.1)
             for i, (a, p, w) in enumerate([("plt", "tanh", 3), ("clt", "l1", 6),
                                            ("clt", "tanh", 3), ("plt", "l1", 6)])]
    cfg = TrainConfig(steps=40, device="cpu", log_every=0)
    together = train_group(case, model, specs, cfg, data)
    assert together.transcoder.ragged
    for width in (3, 6):
        rows = [i for i, s in enumerate(specs) if s.n_features == width]
        apart = train_group(case, model, [specs[i] for i in rows], cfg, data)
        for j, i in enumerate(rows):
            assert (json.dumps(together.records[i], sort_keys=True)
                    == json.dumps(apart.records[j], sort_keys=True))
            _assert_same_run(together.transcoder, i, apart.transcoder, j)


def test_evaluating_a_padded_ensemble_whole_is_refused_with_a_clear_error():
    from clt_eval.case_study import load_case_study
    from clt_eval.errors import CltEvalError
    from clt_eval.evaluate import evaluate

    case = load_case_study("boolean_two_step")
    tc = Transcoder([RunSpec(n_features=w, seed=i).transcoder_config(case.d_model,
                                                                     case.n_layers)
                     for i, w in enumerate((3, 6))])
    with pytest.raises(CltEvalError, match=r"several widths \(\[3, 6\] features\)"):
        evaluate(case, tc)
    assert len(evaluate(case, tc.select([1]))) == 1
