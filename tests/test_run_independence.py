"""A run trained inside an ensemble equals the same run trained alone, bit for bit.

The shapes are deliberately awkward (7 inputs, 5 features, 13 samples): with the toy's round
shapes ([16,10]@[10,16]) BLAS happens to round a batched product as it rounds a single one,
and a test on them would pass even with the batched kernels; with these it does not.
"""

from __future__ import annotations

import pytest
import torch

from clt_eval.training.config import RunSpec, TrainConfig
from clt_eval.training.trainer import full_batches, init_b_dec, train
from clt_eval.transcoder import Transcoder, row_sum, run_matmul

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


def test_minibatch_order_follows_each_runs_own_seed(data):
    x, y = data
    both = full_batches(x, y, batch_size=4, seed=[3, 8])
    one = full_batches(x, y, batch_size=4, seed=[8])
    for _ in range(5):  # past the end of the first epoch
        xb, yb = next(both)
        assert xb.shape == (2, 4, L, D)
        assert torch.equal(xb[1], next(one)[0][0])
    assert not torch.equal(*next(full_batches(x, y, 4, seed=[3, 8]))[0])


@pytest.mark.parametrize("shape", [(13, 8, 5), (5, 13, 7), (2, 300, 200)])
def test_run_matmul_does_not_depend_on_the_other_runs(shape):
    """One run's product (and its gradients) is the same inside any batch of runs; the
    last shape takes the one-BLAS-call-per-matrix path."""
    M, K, N = shape
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 2, M, K, generator=g, requires_grad=True)
    b = torch.randn(6, 2, K, N, generator=g, requires_grad=True)
    w = torch.randn(6, 2, M, N, generator=g)
    (run_matmul(a, b) * w).sum().backward()
    for r in (0, 5):
        a1, b1 = (t[r:r + 1].detach().clone().requires_grad_() for t in (a, b))
        out = run_matmul(a1, b1)
        (out * w[r:r + 1]).sum().backward()
        assert torch.equal(out[0], run_matmul(a, b)[r])
        assert torch.equal(a1.grad[0], a.grad[r]) and torch.equal(b1.grad[0], b.grad[r])
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
