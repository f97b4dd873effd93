"""Hand-built exact decompositions of the toy: their costs (docs/concepts.md §4) and their
evaluation.

The expected costs are derived here by hand, independently of ``clt_eval.costs``:

* faithful: 4 half-XORs (value 1, decoder norm 1); on average 1 fires per sample (each XOR
  holds on half the inputs). The layer-1 feature (value 1, decoder norm 2: it writes y = 2)
  fires on 4/16 inputs. l1 = 1 + 0.25·2 = 1.5; l0 = 1.25. PLT: every norm choice agrees.
* best_plt: 12 point features, one per input with a non-zero MLP0 output, value 1 there.
  8 of them write one half-XOR (norm 1), 4 write two (norm √2). Layer 1 as faithful.
  l1 = (8 + 4√2)/16 + 0.5 = 0.5 + 0.25·√2 + 0.5; l0 = 12/16 + 4/16 = 1.
* clt_shortcut: the same 12 point features; the 4 with y = 2 also write (0, 2) to layer 1.
  Their blocks have norms √2 and 2: concatenated √6, summed √2 + 2. No layer-1 features.
  l1/concatenated = 0.5 + 0.25·√6, l1/summed = 0.5 + 0.25·(√2 + 2); l0 = 0.75; max_l0 = 1.
* clt_skip_keeps_b: the faithful half-XORs plus 4 corner features writing y = 2 only through
  the cross-layer decoder (one block of norm 2 each): every cost as faithful.
"""

import math

import pytest
import torch

from clt_eval.costs import sparsity_costs
from clt_eval.evaluate import evaluate

NORMS = ("concatenated", "summed", "per_block")
SQ2, SQ6 = math.sqrt(2), math.sqrt(6)

FAITHFUL_L1 = 1.0 + 0.25 * 2
BEST_PLT_L1 = 0.5 + 0.25 * SQ2 + 0.5
EXPECTED = {
    "faithful": {"l1": dict.fromkeys(NORMS, FAITHFUL_L1), "l0": 1.25, "max_l0": 3.0},
    "best_plt": {"l1": dict.fromkeys(NORMS, BEST_PLT_L1), "l0": 1.0, "max_l0": 2.0},
    "clt_shortcut": {"l1": {"concatenated": 0.5 + 0.25 * SQ6,
                            "summed": 0.5 + 0.25 * (SQ2 + 2),
                            "per_block": 0.5 + 0.25 * (SQ2 + 2)},
                     "l0": 0.75, "max_l0": 1.0},
    "clt_skip_keeps_b": {"l1": dict.fromkeys(NORMS, FAITHFUL_L1), "l0": 1.25, "max_l0": 3.0},
}


@pytest.fixture(scope="module")
def decomps():
    from clt_eval.case_studies.boolean_two_step_costs import decompositions

    return decompositions()


def test_hand_derived_numbers_are_what_the_brief_says():
    # Guard against a typo in the expectations above.
    assert math.isclose(BEST_PLT_L1, 1.3535533, rel_tol=1e-6)
    assert math.isclose(EXPECTED["clt_shortcut"]["l1"]["concatenated"], 1.1123724, rel_tol=1e-6)
    assert EXPECTED["clt_shortcut"]["l1"]["concatenated"] < BEST_PLT_L1 < FAITHFUL_L1


def test_decompositions_present(decomps):
    assert set(decomps) == set(EXPECTED)
    assert decomps["faithful"].cfgs[0].arch == "plt"
    assert decomps["best_plt"].cfgs[0].arch == "plt"
    assert decomps["clt_shortcut"].cfgs[0].arch == "clt"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_decomposition_reconstructs_both_layers_exactly(name, decomps, x_BLD, y_BLD):
    tc = decomps[name]
    tc.eval()
    with torch.no_grad():
        recon = tc(x_BLD).recon_RBLD[0]
    assert recon.shape == y_BLD.shape
    assert (recon - y_BLD).abs().max() < 1e-6
    assert y_BLD.abs().sum() > 0  # the targets are not trivially zero


@pytest.mark.parametrize("name", list(EXPECTED))
def test_costs_equal_hand_derived_values(name, decomps, x_BLD):
    costs = sparsity_costs(decomps[name], x_BLD, tanh_scale=1.0)
    exp = EXPECTED[name]
    for norm in NORMS:
        assert costs[f"l1/{norm}"].shape == (1,)
        assert math.isclose(costs[f"l1/{norm}"].item(), exp["l1"][norm], rel_tol=1e-5), norm
    assert math.isclose(costs["l0"].item(), exp["l0"], rel_tol=1e-6)
    assert math.isclose(costs["max_l0"].item(), exp["max_l0"], rel_tol=1e-6)


def test_tanh_costs(decomps, x_BLD):
    faithful = sparsity_costs(decomps["faithful"], x_BLD, tanh_scale=1.0)
    want = math.tanh(1) + 0.25 * math.tanh(2)
    for norm in NORMS:
        assert math.isclose(faithful[f"tanh/{norm}"].item(), want, rel_tol=1e-5), norm
    shortcut = sparsity_costs(decomps["clt_shortcut"], x_BLD, tanh_scale=1.0)
    want = 0.5 * math.tanh(1) + 0.25 * math.tanh(SQ6)
    assert math.isclose(shortcut["tanh/concatenated"].item(), want, rel_tol=1e-5)
    # per_block tanh saturates each block separately: tanh(√2) + tanh(2) per corner.
    want = 0.5 * math.tanh(1) + 0.25 * (math.tanh(SQ2) + math.tanh(2))
    assert math.isclose(shortcut["tanh/per_block"].item(), want, rel_tol=1e-5)
    # tanh_scale c enters as tanh(c · a · ‖W‖).
    scaled = sparsity_costs(decomps["faithful"], x_BLD, tanh_scale=0.5)
    want = math.tanh(0.5) + 0.25 * math.tanh(1.0)
    assert math.isclose(scaled["tanh/concatenated"].item(), want, rel_tol=1e-5)


def test_penalties_rank_the_shortcut_cheapest(decomps, x_BLD):
    """The claim the toy exists to make: sparsity prefers the shortcut (docs/concepts.md §1, §4)."""
    c = {n: sparsity_costs(decomps[n], x_BLD) for n in ("faithful", "best_plt", "clt_shortcut")}
    for key in ("l1/concatenated", "l0"):
        assert c["clt_shortcut"][key] < c["best_plt"][key] < c["faithful"][key], key


EVAL_EXPECTED = {
    # name: (skip_fraction, middle_feature_recovery, intervention_agreement)
    "faithful": (0.0, 1.0, 1.0),
    "best_plt": (0.0, 0.0, 1.0),
    "clt_shortcut": (1.0, 0.0, 0.0),
    "clt_skip_keeps_b": (1.0, 1.0, 0.0),
}


@pytest.mark.parametrize("name", list(EVAL_EXPECTED))
def test_evaluate_on_decompositions(name, decomps, case, model):
    skip, recovery, agreement = EVAL_EXPECTED[name]
    (res,) = evaluate(case, decomps[name], model)
    assert res["output_accuracy"] == 1.0
    assert max(res["nmse_per_layer"]) < 1e-9
    assert math.isclose(res["skip_fraction"], skip, abs_tol=1e-6)
    assert res["skips"] == float(skip > 0.5)
    assert math.isclose(res["middle_feature_recovery"], recovery, abs_tol=1e-6)
    assert math.isclose(res["intervention_agreement"], agreement, abs_tol=1e-6)


def test_sparsity_costs_leaves_batchtopk_transcoder_unchanged():
    from clt_eval.config import TranscoderConfig
    from clt_eval.transcoder import Transcoder

    tc = Transcoder([TranscoderConfig(d_model=4, n_layers=2, n_features=3,
                                      activation="batchtopk", k=1)])
    before = tc.batchtopk_threshold.clone()
    sparsity_costs(tc, torch.randn(8, 2, 4))
    assert torch.equal(tc.batchtopk_threshold, before)
    assert tc.training  # the caller's mode is restored
