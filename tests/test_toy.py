"""The hand-built Boolean two-step toy (docs/concepts.md §4) computes what it claims to."""

import itertools

import torch

from clt_eval.replacement import collect_mlp_io

H0, Y, BIAS = 5, 9, 4  # residual layout documented in case_studies/boolean_two_step.py


def _cube():
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)))


def _half_xors(x):
    a, b, c, d = x.unbind(-1)
    return torch.stack([(a > 0) & (b < 0), (a < 0) & (b > 0),
                        (c > 0) & (d < 0), (c < 0) & (d > 0)], -1).float()


def test_inputs_are_the_whole_cube(case):
    x = case.inputs()
    assert x.shape == (16, 4)
    assert torch.equal(x, _cube())
    assert len({tuple(r.tolist()) for r in x}) == 16


def test_truth_table_matches_boolean_definition(case, model):
    import clt_eval.case_studies.boolean_two_step as toy

    x = case.inputs()
    # Independent Boolean definition: y = 2 · [XOR(a,b) ∧ XOR(c,d)], one input at a time.
    expected = torch.tensor([2.0 if (a != b) and (c != d) else 0.0
                             for a, b, c, d in x.tolist()])
    assert expected.sum() == 8.0  # 4 of the 16 inputs have both XORs true
    assert torch.equal(toy.truth_table(), expected)
    out = model(x)
    assert torch.equal(case.output_value(out), expected)
    assert torch.equal(out[:, Y], expected)


def test_half_xor_activations_equal_boolean_definitions(case, model):
    x = case.inputs()
    _, cache = model.run_with_cache(x)
    h = cache["blocks.0.mlp.hook_post"]
    assert h.shape == (16, 4)
    assert torch.equal(h, _half_xors(x))
    # What MLP0 writes into the stream is exactly those features, in dims 5..8.
    assert torch.equal(cache["blocks.0.hook_mlp_out"][:, H0:H0 + 4], _half_xors(x))
    # Pairwise sums are XOR(a,b) and XOR(c,d).
    assert torch.equal(h[:, 0] + h[:, 1], (x[:, 0] != x[:, 1]).float())
    assert torch.equal(h[:, 2] + h[:, 3], (x[:, 2] != x[:, 3]).float())


def test_residual_stream_is_consistent(case, model, x_BLD, y_BLD):
    assert x_BLD.shape == (16, 2, 10) and y_BLD.shape == (16, 2, 10)
    # MLP1's input is MLP0's input plus MLP0's output, exactly.
    assert torch.equal(x_BLD[:, 1], x_BLD[:, 0] + y_BLD[:, 0])
    # The layer-0 input is the embedding: the inputs and the constant bias dimension.
    assert torch.equal(x_BLD[:, 0, :4], case.inputs())
    assert torch.equal(x_BLD[:, 0, BIAS], torch.ones(16))
    assert torch.equal(x_BLD[:, 0, H0:], torch.zeros(16, 10 - H0))
    # The final stream is MLP1's input plus MLP1's output.
    assert torch.equal(model(case.inputs()), x_BLD[:, 1] + y_BLD[:, 1])


def test_hook_points_exist_and_are_captured(case, model):
    hooks = set(case.input_hooks) | set(case.output_hooks) | {
        g.hook for g in case.ground_truth()}
    assert hooks <= set(model.hook_dict)
    _, cache = model.run_with_cache(case.inputs())
    for name in hooks:
        assert name in cache, name
        assert cache[name].shape[0] == 16
    _, _, extra = collect_mlp_io(model, case.inputs(), case.input_hooks, case.output_hooks,
                                 ["blocks.1.mlp.hook_post"])
    assert torch.equal(extra["blocks.1.mlp.hook_post"][:, 0], _toy_truth(case.inputs()) / 2)


def _toy_truth(x):
    return 2.0 * ((x[:, 0] != x[:, 1]) & (x[:, 2] != x[:, 3])).float()


def test_off_distribution_inputs(case, model):
    off = case.off_distribution_inputs(64, seed=3)
    assert off.shape == (64, 4)
    assert torch.isfinite(off).all()
    # Not on the cube: no coordinate is exactly ±1.
    assert not (off.abs() == 1).any()
    # Near the cube though: each row is a corner plus small noise.
    assert (off - off.sign()).abs().mean() < 0.5
    assert torch.equal(off, case.off_distribution_inputs(64, seed=3))
    assert not torch.equal(off, case.off_distribution_inputs(64, seed=4))
    assert model(off).shape == (64, 10)
