"""Subspace patching primitives and metrics, against values worked out by hand."""

import math

import pytest
import torch

from clt_eval.errors import CltEvalError
from clt_eval.illusion import split_direction
from clt_eval.patching import (
    as_basis,
    fldd,
    fraction_of_change,
    interchange_accuracy,
    logit_diff,
    subspace_patch,
    whole_patch,
)

W = torch.tensor([1.0, 2.0, 3.0])  # base
U = torch.tensor([3.0, 2.0, 1.0])  # source; u − w = (2, 0, −2)


def test_patch_along_one_direction_by_hand():
    # v = (1, 1, 0)/√2: vᵀ(u − w) = 2/√2 = √2, so w' = w + √2 v = w + (1, 1, 0) = (2, 3, 3).
    expected = torch.tensor([2.0, 3.0, 3.0])
    v = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2)
    assert torch.allclose(subspace_patch(W, U, v[:, None]), expected)
    # A single direction is normalised first: the unnormalised (1, 1, 0) gives the same.
    assert torch.allclose(subspace_patch(W, U, torch.tensor([1.0, 1.0, 0.0])), expected)
    # Batched: every row is patched on its own.
    batch = subspace_patch(torch.stack([W, U]), torch.stack([U, W]), v)
    assert torch.allclose(batch, torch.stack([expected, torch.tensor([2.0, 1.0, 1.0])]))


def test_patch_along_two_directions_and_everything():
    # span(e1, e2): the first two coordinates come from u, the third stays w's: (3, 2, 3).
    assert torch.allclose(subspace_patch(W, U, torch.eye(3)[:, :2]), torch.tensor([3.0, 2.0, 3.0]))
    # The whole space is the whole-component patch.
    assert torch.allclose(subspace_patch(W, U, torch.eye(3)), U)
    assert torch.equal(whole_patch(W, U), U)
    # A direction along which base and source agree changes nothing.
    assert torch.allclose(subspace_patch(W, U, torch.tensor([0.0, 1.0, 0.0])), W)


@pytest.mark.parametrize("V, needle", [
    (torch.zeros(3), "V_DK: is the zero vector"),
    (torch.ones(4), "V_DK: shape (4,)"),
    (torch.ones(3, 4), "k=4"),
    (torch.ones(3, 2), "not orthonormal"),
    (torch.tensor([1.0, float("nan"), 0.0]), "non-finite"),
])
def test_bad_directions_are_refused_by_name(V, needle):
    with pytest.raises(CltEvalError, match="V_DK") as info:
        subspace_patch(W, U, V)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_mismatched_base_and_source_are_refused():
    with pytest.raises(CltEvalError, match="source_ND: shape"):
        subspace_patch(W, U[:2], torch.ones(3))
    with pytest.raises(CltEvalError, match="source_ND"):
        whole_patch(W[None], U)


def test_as_basis_keeps_orthonormal_columns():
    Q = torch.linalg.qr(torch.randn(5, 2, generator=torch.Generator().manual_seed(0))).Q
    assert torch.equal(as_basis(Q, 5), Q)


def test_split_against_axis_aligned_w_out():
    # Unit 1 writes nothing: the kernel is span(e2), the row space span(e1, e3).
    W_out = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    v = torch.ones(3) / math.sqrt(3)
    row, ker = split_direction(v, W_out)
    assert torch.allclose(row, torch.tensor([1.0, 0.0, 1.0]) / math.sqrt(3))
    assert torch.allclose(ker, torch.tensor([0.0, 1.0, 0.0]) / math.sqrt(3))


def test_split_against_rank_one_w_out():
    # Units 1 and 2 write the same vector: the row space is span((1, 1, 0)), so e1 splits
    # into (½, ½, 0) that reaches the output and (½, −½, 0) that cancels out.
    W_out = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    row, ker = split_direction(torch.tensor([1.0, 0.0, 0.0]), W_out)
    assert torch.allclose(row, torch.tensor([0.5, 0.5, 0.0]), atol=1e-6)
    assert torch.allclose(ker, torch.tensor([0.5, -0.5, 0.0]), atol=1e-6)
    assert torch.allclose((ker @ W_out), torch.zeros(2), atol=1e-6)


def test_split_rank_tolerance():
    W_out = torch.diag(torch.tensor([1.0, 1e-9]))  # the second unit's weight is numerical noise
    row, ker = split_direction(torch.tensor([0.0, 1.0]), W_out)
    assert torch.allclose(row, torch.zeros(2)) and torch.allclose(ker, torch.tensor([0.0, 1.0]))
    row, _ = split_direction(torch.tensor([0.0, 1.0]), W_out, rtol=1e-12)
    assert torch.allclose(row, torch.tensor([0.0, 1.0]))


def test_split_refuses_wrong_size():
    with pytest.raises(CltEvalError, match="v: shape"):
        split_direction(torch.ones(4), torch.ones(3, 2))


def test_fraction_of_change_by_hand():
    base = torch.zeros(3)
    cf = torch.tensor([1.0, 2.0, 0.0])  # the third pair wants no change: left out
    patched = torch.tensor([0.5, 1.0, 5.0])
    # (0.5·1 + 1·2) / (1 + 4) = 0.5
    assert fraction_of_change(patched, base, cf) == pytest.approx(0.5)
    assert fraction_of_change(cf, base, cf) == pytest.approx(1.0)
    assert fraction_of_change(-cf, base, cf) == pytest.approx(-1.0)  # the wrong way
    assert math.isnan(fraction_of_change(patched, base, base))
    with pytest.raises(CltEvalError, match="patched_N, base_N, counterfactual_N"):
        fraction_of_change(patched[:2], base, cf)


def test_logit_diff_and_fldd_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 4.0]])
    ld = logit_diff(logits, torch.tensor([0, 2]), torch.tensor([1, 1]))
    assert torch.allclose(ld, torch.tensor([2.0, 2.0]))
    assert fldd(torch.tensor([1.0, 1.0]), ld) == pytest.approx(0.5)
    assert fldd(torch.tensor([-1.0, -1.0]), ld) == pytest.approx(1.5)  # preference reversed
    assert fldd(torch.tensor([3.0, 3.0]), ld) == pytest.approx(-0.5)  # strengthened
    with pytest.raises(CltEvalError, match="ld_clean_N"):
        fldd(ld, torch.zeros(2))


def test_interchange_accuracy_by_hand():
    logits = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    assert interchange_accuracy(logits, torch.tensor([1, 1])) == pytest.approx(0.5)
    values = torch.tensor([1.0, 2.0])
    assert interchange_accuracy(values, torch.tensor([1.05, 3.0]), atol=0.1) == pytest.approx(0.5)
    with pytest.raises(CltEvalError, match="counterfactual: shape"):
        interchange_accuracy(logits, torch.tensor([1]))


def _sequence_model():
    """A [N, T, 2] -> logits [N, T, 2] identity with one hook: a stand-in language model."""
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class Identity(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.hook_x = HookPoint()
            self.setup()

        def forward(self, x_NTD):
            return self.hook_x(x_NTD)

    return Identity()


def test_patch_one_token_position():
    from clt_eval.patching import run_patched

    model = _sequence_model()
    base, source = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    out = run_patched(model, base, source, "hook_x", torch.tensor([1.0, 0.0]), pos=-1)
    assert torch.equal(out, torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]]))
    assert torch.equal(run_patched(model, base, source, "hook_x", pos=1)[0, :, 0],
                       torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(CltEvalError, match="pos=0: hook 'hook_x' holds shape"):
        run_patched(model, base[:, 0], source[:, 0], "hook_x", pos=0)


def test_das_with_cross_entropy_swaps_the_answer():
    from clt_eval.patching import cross_entropy_loss, run_patched, train_das

    # The last token says "answer 0" in the base and "answer 1" in the source; the direction
    # that carries the answer is (e0 − e1)/√2.
    model = _sequence_model()
    base = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]]).repeat(4, 1, 1)
    source = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]]).repeat(4, 1, 1)
    answers = torch.ones(4, dtype=torch.long)
    result = train_das(model, "hook_x", base, source, cross_entropy_loss(answers), steps=100,
                       pos=-1)
    v = result.V_DK[:, 0]
    assert abs(float(v @ torch.tensor([1.0, -1.0]))) / 2 ** 0.5 > 0.99
    patched = run_patched(model, base, source, "hook_x", v, pos=-1)[:, -1]
    assert interchange_accuracy(patched, answers) == 1.0
    assert fldd(logit_diff(patched, torch.zeros(4, dtype=torch.long), answers),
                logit_diff(base[:, -1], torch.zeros(4, dtype=torch.long), answers)) > 1.5
