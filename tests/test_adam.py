"""RunwiseAdam: torch's fused CPU kernel, with every element stepped the same way wherever it
lies in its tensor, so a run's weights do not depend on its place in an ensemble."""

from __future__ import annotations

import pytest
import torch

from clt_eval.training.adam import LANES, RunwiseAdam

R = 5


def _grads(shape, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    # magnitudes from 1e-3 to 1e3: the moments and the update round in every regime
    return [torch.randn(R, *shape, generator=g) * 10.0 ** (i % 7 - 3) for i in range(steps)]


def _train(p0, grads, opt_cls=RunwiseAdam, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = opt_cls([p], lr=1e-2, **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


# per-run sizes below, at and past one vector, none a multiple of LANES but the last two
@pytest.mark.parametrize("shape", [(3,), (3, 5), (2, 7, 3), (1, 1, 17), (LANES,), (4, 8)])
def test_each_run_steps_as_it_would_alone(shape):
    p0 = torch.randn(R, *shape, generator=torch.Generator().manual_seed(0))
    grads = _grads(shape, 30)
    together, _ = _train(p0, grads)
    for r in range(R):  # the last run's elements lie in the ensemble tensor's tail
        alone, _ = _train(p0[r:r + 1], [g[r:r + 1] for g in grads])
        assert torch.equal(alone, together[r:r + 1]), f"run {r} of shape {shape}"


def test_same_algorithm_as_torch_adam():
    shape = (3, 37)
    p0 = torch.randn(R, *shape, generator=torch.Generator().manual_seed(0))
    grads = _grads(shape, 50)
    ours, opt = _train(p0, grads)
    ref, ref_opt = _train(p0, grads, torch.optim.Adam, foreach=True)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    # the moments are computed the same way: bit for bit
    for k in ("exp_avg", "exp_avg_sq"):
        (s,), (t,) = opt.state.values(), ref_opt.state.values()
        assert torch.equal(s[k], t[k]), k
    assert float(s["step"]) == float(t["step"]) == 50


def test_state_is_torch_adams_and_resumes_exactly():
    shape = (2, 9)
    p0 = torch.randn(R, *shape, generator=torch.Generator().manual_seed(0))
    grads = _grads(shape, 20)
    straight, _ = _train(p0, grads)
    p, opt = _train(p0, grads[:12])
    saved = opt.state_dict()
    # a torch Adam reads the state (as a checkpoint made by either does)
    torch.optim.Adam([torch.nn.Parameter(p.clone())], lr=1e-2).load_state_dict(saved)
    q = torch.nn.Parameter(p.clone())
    resumed = RunwiseAdam([q], lr=1e-2)
    resumed.load_state_dict(saved)
    for g in grads[12:]:
        q.grad = g.clone()
        resumed.step()
    assert torch.equal(q.detach(), straight)


def test_what_the_detour_does_not_cover_steps_with_torchs_kernel():
    shape = (3, 5)
    p0 = torch.randn(R, *shape, generator=torch.Generator().manual_seed(0))
    grads = _grads(shape, 10)
    for kw in ({"amsgrad": True}, {"weight_decay": 0.1}):
        ours, _ = _train(p0, grads, lambda ps, lr, kw=kw: _with(RunwiseAdam(ps, lr), kw))
        ref, _ = _train(p0, grads, torch.optim.Adam, foreach=True, **kw)
        assert torch.equal(ours, ref), kw


def test_parameters_without_gradients_are_left_alone():
    a, b = (torch.nn.Parameter(torch.ones(R, 3)) for _ in range(2))
    opt = RunwiseAdam([a, b], lr=0.1)
    a.grad = torch.ones(R, 3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(R, 3)) and b not in opt.state
    assert (a.detach() < 1).all()


def _with(opt, kw):
    opt.param_groups[0].update(kw)
    return opt
