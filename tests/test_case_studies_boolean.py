"""The built-in chain, superposition and continuous case studies compute what they claim.

Every hook value is compared with a definition written here independently of the case-study
modules (Python Booleans, closed forms); the residual streams are checked for consistency;
each case study passes the contract validator and loads by ``module:Factory@args``. For the
chain, the hand-built decompositions are exact and cost what the derivation in
``case_studies/boolean_chain_costs.py`` says.
"""

import math

import pytest
import torch

from clt_eval.case_studies.boolean_chain import BooleanChain
from clt_eval.case_studies.boolean_superposition import BooleanSuperposition
from clt_eval.case_studies.continuous_two_step import ContinuousTwoStep
from clt_eval.case_study import load_case_study
from clt_eval.contract import check_case_study
from clt_eval.costs import sparsity_costs
from clt_eval.errors import CltEvalError
from clt_eval.replacement import collect_mlp_io

KS = (2, 3, 4, 5)
SQ2, SQ3, SQ5, SQ7 = math.sqrt(2), math.sqrt(3), math.sqrt(5), math.sqrt(7)


def _run(case, model=None):
    """(x_BLD, y_BLD, {layer: hidden units [N, H]}, final stream) on ``case.inputs()``."""
    model = model or case.model()
    hooks = [f"blocks.{ell}.mlp.hook_post" for ell in range(case.n_layers)]
    with torch.no_grad():
        x, y, extra = collect_mlp_io(model, case.inputs(), case.input_hooks,
                                     case.output_hooks, hooks)
    return x, y, {ell: extra[h] for ell, h in enumerate(hooks)}, extra["output"]


def _affine_misfit(x_ND: torch.Tensor, y_NE: torch.Tensor) -> float:
    """Largest error of the best affine fit of y from x. Singular values below 1e-5 of the
    largest are float32 rounding, not directions: keeping them would 'fit' anything."""
    X = torch.cat([x_ND, torch.ones(len(x_ND), 1)], dim=1).double()
    coef = torch.linalg.pinv(X, rtol=1e-5) @ y_NE.double()
    return float((X @ coef - y_NE.double()).abs().max())


def _assert_consistent_stream(case, x, y, out):
    for ell in range(case.n_layers - 1):  # an MLP reads the embedding plus all earlier outputs
        assert torch.equal(x[:, ell + 1], x[:, ell] + y[:, ell])
    assert torch.equal(out, x[:, -1] + y[:, -1])
    n_in = case.input_directions().shape[0]
    assert torch.equal(x[:, 0, :n_in], case.inputs())


# ---- the k-step Boolean chain ------------------------------------------------------------
@pytest.fixture(scope="module")
def chains():
    return {k: (case := BooleanChain(k=k), _run(case)) for k in KS}


def _chain_definition(k: int, row: list[float]) -> list[list[float]]:
    """The units of every step on one input, from the Boolean definitions."""
    a, b, c, d = (v > 0 for v in row)  # True for +1
    steps = [[a and not b, not a and b, c and not d, not c and d]]
    t = (a != b) and (c != d)
    steps.append([t])
    for j in range(3, k + 1):
        x = {3: a, 4: c, 5: b}[j]  # the input folded in at step j
        steps.append([t and not x, not t and x])
        t = t != x
    return [[float(v) for v in s] for s in steps]


@pytest.mark.parametrize("k", KS)
def test_chain_units_and_output_match_boolean_definition(k, chains):
    case, (x, y, hidden, out) = chains[k]
    assert case.inputs().shape == (16, 4) and len(set(map(tuple, case.inputs().tolist()))) == 16
    want = [_chain_definition(k, row) for row in case.inputs().tolist()]
    for ell in range(k):
        assert torch.equal(hidden[ell], torch.tensor([w[ell] for w in want])), ell
    y_true = torch.tensor([2.0 * sum(w[-1]) for w in want])
    assert torch.equal(case.output_value(out), y_true)
    assert 0 < y_true.count_nonzero() < 16


@pytest.mark.parametrize("k", KS)
def test_chain_residual_stream_is_consistent_and_steps_use_distinct_dims(k, chains):
    case, (x, y, _, out) = chains[k]
    _assert_consistent_stream(case, x, y, out)
    assert torch.equal(x[:, 0, 4], torch.ones(16))  # the constant-1 bias dimension
    dims = [set(g.directions_GD.abs().sum(0).nonzero().flatten().tolist())
            for g in case.ground_truth()]
    for i, di in enumerate(dims):
        assert min(di) > 4, "a step writes over the inputs or the bias"
        assert all(not (di & dj) for dj in dims[i + 1:]), "two steps share a dimension"
    assert dims[-1] == {case.d_model - 1}


@pytest.mark.parametrize("k", KS)
def test_chain_every_step_is_nonlinear_in_its_whole_input(k, chains):
    _, (x, y, hidden, _) = chains[k]
    for ell in range(k):
        assert _affine_misfit(x[:, ell], y[:, ell]) > 0.1, ell
        if ell > 0:  # and in the previous step's units alone
            assert _affine_misfit(hidden[ell - 1], hidden[ell]) > 0.1, ell


def test_chain_firing_rates_follow_from_independence(chains):
    # The folded input is independent of t_{j-1}: step 3 fires on 1/8 and 3/8, later 1/4.
    _, (_, _, hidden, _) = chains[5]
    assert hidden[1].mean().item() == 0.25
    assert hidden[2].mean(0).tolist() == [0.125, 0.375]
    for ell in (3, 4):
        assert hidden[ell].mean(0).tolist() == [0.25, 0.25]


def test_chain_k2_is_the_two_step_toy(chains):
    from clt_eval.case_studies.boolean_two_step import BooleanTwoStep

    toy = BooleanTwoStep()
    case, (x, y, hidden, out) = chains[2]
    tx, ty, thidden, tout = _run(toy)
    assert case.d_model == toy.d_model
    assert torch.equal(x, tx) and torch.equal(y, ty) and torch.equal(out, tout)
    assert all(torch.equal(hidden[ell], thidden[ell]) for ell in (0, 1))


@pytest.mark.parametrize("k", KS)
def test_chain_meets_contract_and_circuit_runs_forward(k):
    case = BooleanChain(k=k)
    check_case_study(case)
    assert not hasattr(case, "middle_layer") and not hasattr(case, "output_layer")
    circuit = case.circuit()
    for src, dst in circuit.edges:
        assert circuit.node_layers[src] < circuit.node_layers[dst], (src, dst)
    targets = {dst for _, dst in circuit.edges}
    assert all(n in targets for n, layer in circuit.node_layers.items() if layer >= 0)


def test_chain_loads_by_name_with_arguments():
    case = load_case_study("clt_eval.case_studies.boolean_chain:BooleanChain@k=4", validate=True)
    assert case.k == 4 and case.n_layers == 4 and len(case.ground_truth()) == 4
    with pytest.raises(CltEvalError, match="k=9"):
        load_case_study("clt_eval.case_studies.boolean_chain:BooleanChain@k=9")


@pytest.mark.parametrize("k", [1, 6, 0, "3", 3.0, True, None])
def test_chain_rejects_bad_k(k):
    with pytest.raises(CltEvalError, match=r"k=.*expected an integer in 2\.\.5"):
        BooleanChain(k=k)


# ---- the chain's hand-built decompositions -----------------------------------------------
@pytest.fixture(scope="module")
def chain_costs(chains):
    out = {}
    for k in KS:
        case, (x, y, _, _) = chains[k]
        decomps = case.analytic_decompositions()
        out[k] = {}
        for name, tc in decomps.items():
            with torch.no_grad():
                recon = tc(x).recon_RBLD[0]
            out[k][name] = (tc, recon, y, sparsity_costs(tc, x))
    return out


@pytest.mark.parametrize("k", KS)
def test_chain_decompositions_reconstruct_every_layer_exactly(k, chain_costs):
    names = set(chain_costs[k])
    assert names == {"faithful", "clt_skip_all"} | ({"clt_skip_last"} if k > 2 else set())
    for name, (tc, recon, y, _) in chain_costs[k].items():
        assert tc.cfg.arch == ("plt" if name == "faithful" else "clt")
        per_layer = (recon - y).abs().amax(dim=(0, 2))
        assert per_layer.shape == (k,) and per_layer.max() < 1e-5, (name, per_layer)
        assert (y.abs().sum((0, 2)) > 0).all()  # no layer's target is trivially zero


# l1 under (concatenated, summed, per-block), l0 and max_l0 at k = 3, derived by hand in
# case_studies/boolean_chain_costs.py.
K3_EXPECTED = {
    "faithful": ((2.25, 2.25, 2.25), 1.75, 4.0),
    "clt_skip_last": ((1 + (7 + SQ5) / 8, 2.25, 2.25), 1.625, 3.0),
    "clt_skip_all": (((4 + 2 * SQ5 + SQ7 + SQ3) / 8, 1.75 + SQ2 / 4, 1.75 + SQ2 / 4), 0.875, 1.0),
}


@pytest.mark.parametrize("name", list(K3_EXPECTED))
def test_chain_k3_costs_equal_hand_derived_values(name, chain_costs):
    costs = chain_costs[3][name][3]
    l1, l0, max_l0 = K3_EXPECTED[name]
    for norm, want in zip(("concatenated", "summed", "per_block"), l1, strict=True):
        assert math.isclose(costs[f"l1/{norm}"].item(), want, rel_tol=1e-5), norm
    assert math.isclose(costs["l0"].item(), l0, rel_tol=1e-6)
    assert costs["max_l0"].item() == max_l0


@pytest.mark.parametrize("k", KS)
def test_chain_cost_inequalities_hold_for_every_k(k, chain_costs):
    c = {name: v[3] for name, v in chain_costs[k].items()}
    faithful, skip_all = c["faithful"], c["clt_skip_all"]
    order = [skip_all, c.get("clt_skip_last", skip_all), faithful]
    for key in ("l1/concatenated", "l0"):  # inequalities (1) and (2)
        vals = [o[key].item() for o in order]
        assert vals[0] < vals[2] and vals[0] <= vals[1] <= vals[2], (key, vals)
        if k > 2:
            assert vals[0] < vals[1] < vals[2], (key, vals)
    # (3): under the summed norm only layer 0's superposed half-XORs save anything.
    saving = faithful["l1/summed"].item() - skip_all["l1/summed"].item()
    assert math.isclose(saving, (2 - SQ2) / 4, rel_tol=1e-5)
    if k > 2:
        assert math.isclose(c["clt_skip_last"]["l1/summed"].item(), faithful["l1/summed"].item(),
                            rel_tol=1e-6)
    # The faithful cost in closed form.
    want_l1 = 1.5 if k == 2 else 2.25 + (k - 3) / 2
    assert math.isclose(faithful["l1/concatenated"].item(), want_l1, rel_tol=1e-6)


# ---- superposition ------------------------------------------------------------------------
SUPERPOSITION_PARAMS = [(3, 2), (2, 2), (2, 3), (3, 3), (4, 5), (5, 2), (5, 9)]


@pytest.fixture(scope="module")
def superpositions():
    return {p: (case := BooleanSuperposition(*p), _run(case)) for p in SUPERPOSITION_PARAMS}


@pytest.mark.parametrize("params", SUPERPOSITION_PARAMS)
def test_superposition_truth_table(params, superpositions):
    case, (_, _, hidden, out) = superpositions[params]
    P = case.n_pairs
    rows = case.inputs().tolist()
    assert len(rows) == 2**P * (P + 1) == len(set(map(tuple, rows)))
    pairs = [[(r[2 * i] > 0, r[2 * i + 1] > 0) for i in range(P)] for r in rows]
    assert all(sum(a != b for a, b in p) <= 1 for p in pairs)
    half = torch.tensor([[float(v) for a, b in p for v in (a and not b, b and not a)]
                         for p in pairs])
    assert torch.equal(hidden[0], half)
    # The readouts recover their features exactly (up to float32 rounding of the scale) and
    # are exactly 0 elsewhere: interference never leaks through the threshold.
    assert torch.allclose(hidden[1], half[:, ::2], atol=1e-5, rtol=0)
    assert torch.equal(hidden[1] > 0, half[:, ::2] > 0)
    y_true = torch.tensor([2.0 * any(a and not b for a, b in p) for p in pairs])
    assert torch.allclose(case.output_value(out), y_true, atol=1e-5, rtol=0)


@pytest.mark.parametrize("params", SUPERPOSITION_PARAMS)
def test_superposition_is_real_and_the_readout_needs_its_relu(params, superpositions):
    case, (x, y, _, out) = superpositions[params]
    _assert_consistent_stream(case, x, y, out)
    mid = case.ground_truth()[0].directions_GD
    G = mid.shape[0]
    assert G == 2 * case.n_pairs > case.d_mid
    assert torch.linalg.matrix_rank(mid) == case.d_mid  # G features in d_mid dimensions
    assert torch.allclose(mid.norm(dim=1), torch.ones(G), atol=1e-6)
    off_diag = (mid @ mid.T)[~torch.eye(G, dtype=torch.bool)]
    assert off_diag.abs().max() > 0.1  # not orthogonal
    assert _affine_misfit(x[:, 0], y[:, 0]) > 0.1
    assert _affine_misfit(x[:, 1], y[:, 1]) > 0.1


def test_superposition_contract_name_loading_and_bad_parameters():
    check_case_study(BooleanSuperposition())
    case = load_case_study("clt_eval.case_studies.boolean_superposition:BooleanSuperposition"
                           "@n_pairs=4,d_mid=3", validate=True)
    assert (case.n_pairs, case.d_mid, case.d_model) == (4, 3, 13)
    for kwargs, field in [({"n_pairs": 1}, "n_pairs"), ({"n_pairs": 6}, "n_pairs"),
                          ({"n_pairs": "3"}, "n_pairs"), ({"d_mid": 1}, "d_mid"),
                          ({"d_mid": 6}, "d_mid"), ({"n_pairs": 2, "d_mid": 4}, "d_mid")]:
        with pytest.raises(CltEvalError, match=f"{field}=.*expected an integer in"):
            BooleanSuperposition(**kwargs)


# ---- continuous two-step ------------------------------------------------------------------
@pytest.fixture(scope="module")
def continuous():
    case = ContinuousTwoStep(n_samples=512, seed=1)
    return case, _run(case)


def test_continuous_hooks_equal_closed_form(continuous):
    case, (x, y, hidden, out) = continuous
    a, b, c, d = case.inputs().unbind(-1)
    h = torch.stack([a - b, b - a, c - d, d - c], dim=-1).clamp(min=0)
    assert torch.allclose(hidden[0], h, atol=1e-6)
    y_true = (h.sum(-1) - 1).clamp(min=0)
    assert torch.allclose(case.output_value(out), y_true, atol=1e-6)
    _assert_consistent_stream(case, x, y, out)
    check_case_study(case)


def test_continuous_data_is_not_a_finite_table(continuous):
    case, (x, y, _, out) = continuous
    inputs = case.inputs()
    assert inputs.shape == (512, 4) and inputs.abs().max() <= 1
    assert len(set(map(tuple, inputs.tolist()))) == 512
    y_out = case.output_value(out)
    assert y_out.unique().numel() > 100 and 0.3 < (y_out > 0).float().mean() < 0.9
    assert _affine_misfit(x[:, 1], y[:, 1]) > 0.1  # step 2 needs its ReLU
    assert math.isclose(case.output_tolerance, 0.1 * y_out.std().item(), rel_tol=1e-4)
    assert torch.equal(inputs, ContinuousTwoStep(n_samples=512, seed=1).inputs())
    assert not torch.equal(inputs, ContinuousTwoStep(n_samples=512, seed=2).inputs())


def test_continuous_off_distribution_is_wider(continuous):
    case, _ = continuous
    off = case.off_distribution_inputs(256, seed=1)
    assert off.shape == (256, 4) and off.abs().max() <= 2 and (off.abs() > 1).any()
    assert torch.equal(off, case.off_distribution_inputs(256, seed=1))
    assert not torch.allclose(off[:, :4], 2 * case.inputs()[:256])  # not the training draws


def test_continuous_loads_by_name_and_rejects_bad_parameters():
    case = load_case_study("clt_eval.case_studies.continuous_two_step:ContinuousTwoStep"
                           "@n_samples=64,seed=3")
    assert case.inputs().shape == (64, 4) and case.seed == 3
    for kwargs, field in [({"n_samples": 8}, "n_samples"), ({"n_samples": "64"}, "n_samples"),
                          ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed")]:
        with pytest.raises(CltEvalError, match=f"{field}="):
            ContinuousTwoStep(**kwargs)


# ---- the shared hooked stack --------------------------------------------------------------
def test_mlp_stack_rejects_mismatched_shapes():
    from clt_eval.case_studies._mlp_stack import bias_embed, mlp_stack

    good = (torch.zeros(5, 2), None, torch.zeros(2, 5))
    with pytest.raises(CltEvalError, match="layer 1 W_out"):
        mlp_stack([good, (torch.zeros(5, 2), None, torch.zeros(3, 5))], bias_embed(2, 5, 2))
    with pytest.raises(CltEvalError, match="layer 0 b_in"):
        mlp_stack([(torch.zeros(5, 2), torch.zeros(3), torch.zeros(2, 5))], bias_embed(2, 5, 2))
