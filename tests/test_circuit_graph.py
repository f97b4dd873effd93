"""Attribution-graph scores on exact hand-built decompositions whose graphs are known.

Two toys: the Boolean two-step toy (its hand-built decompositions) and a three-step chain
built here: half-XORs (layer 0) -> X = XOR(a,b) ∧ XOR(c,d) (layer 1) -> out = 3·[X] (layer 2).
"""

import math

import pytest
import torch
from torch import nn

from clt_eval.case_study import Circuit, GroundTruthLayer
from clt_eval.circuit_graph import circuit_scores
from clt_eval.config import TranscoderConfig
from clt_eval.errors import CltEvalError
from clt_eval.evaluate import _recovery
from clt_eval.replacement import collect_mlp_io
from clt_eval.transcoder import Transcoder


@torch.no_grad()
def score(case, model, tc, **kw):
    """circuit_scores with the matches evaluate computes for the same activations."""
    gt = case.ground_truth()
    x, _, cache = collect_mlp_io(model, case.inputs(), case.input_hooks, case.output_hooks,
                                 [g.hook for g in gt])
    out = tc(x)
    matches = _recovery(tc, out, gt, cache)["matches"]
    return circuit_scores(case, tc, x, out.acts_RBLF, matches, **kw), (x, out, matches)


# ---- the Boolean two-step toy -------------------------------------------------------------
@pytest.fixture(scope="module")
def decomps():
    from clt_eval.case_studies.boolean_two_step_costs import decompositions

    return decompositions()


def test_faithful_two_step_is_the_true_circuit(case, model, decomps):
    s, _ = score(case, model, decomps["faithful"])
    assert s["circuit_edge_precision"].tolist() == [1.0]
    assert s["circuit_edge_recall"].tolist() == [1.0]
    assert s["shortcut_edges"].tolist() == [0]
    assert s["missing_middle_edges"].tolist() == [0]
    assert s["path_depth"].tolist() == [2.0]
    assert {tuple(e) for e in s["predicted_edges"][0]} == set(case.circuit().edges)


def test_clt_shortcut_loses_the_middle_step(case, model, decomps):
    s, _ = score(case, model, decomps["clt_shortcut"])
    assert s["missing_middle_edges"].tolist() == [4]
    assert s["circuit_edge_recall"][0] < 1
    assert s["shortcut_edges"][0] > 0
    assert s["path_depth"].tolist() == [1.0]
    # No point feature is a recovered half-XOR, so nothing maps: no predicted edge at all.
    assert s["predicted_edges"] == [[]] and math.isnan(s["circuit_edge_precision"][0])


def test_clt_skip_keeping_b_still_shortcuts(case, model, decomps):
    s, _ = score(case, model, decomps["clt_skip_keeps_b"])
    # The 4 corner features write y from layer 0; the half-XORs reach nothing downstream.
    assert s["shortcut_edges"].tolist() == [4]
    assert s["missing_middle_edges"].tolist() == [4]
    assert s["circuit_edge_precision"].tolist() == [1.0]
    assert s["circuit_edge_recall"].tolist() == [pytest.approx(8 / 12)]
    assert s["path_depth"].tolist() == [1.0]


def test_best_plt_cannot_shortcut(case, model, decomps):
    s, _ = score(case, model, decomps["best_plt"])
    assert s["shortcut_edges"].tolist() == [0]
    assert s["path_depth"].tolist() == [2.0]  # point feature -> output feature
    assert s["missing_middle_edges"].tolist() == [4]  # but B is not recovered


def test_ensemble_scores_each_run_as_alone(case, model, decomps):
    names = ["faithful", "clt_shortcut", "clt_skip_keeps_b", "best_plt"]
    tc = Transcoder.stack([decomps[n] for n in names])
    together, _ = score(case, model, tc)
    for r, n in enumerate(names):
        alone, _ = score(case, model, decomps[n])
        for key, value in alone.items():
            got = together[key][r]
            if isinstance(got, torch.Tensor):
                torch.testing.assert_close(got, value[0], equal_nan=True)
            else:
                assert got == value[0], (n, key)


def _with_leak(decomps, scale: float) -> Transcoder:
    """faithful as a CLT plus 4 unmatched layer-0 corner features that also write y."""
    from clt_eval.case_studies.boolean_two_step import BIAS, D_MODEL, Y
    from clt_eval.case_studies.boolean_two_step_costs import WIDTH

    base = decomps["faithful"]
    tc = Transcoder([TranscoderConfig(d_model=D_MODEL, n_layers=2, n_features=WIDTH)])
    with torch.no_grad():
        for p in tc.parameters():
            p.zero_()
        tc.W_enc.copy_(base.W_enc)
        for W, W_base in zip(tc.decoder_params(), base.decoder_params(), strict=True):
            W.copy_(W_base)
        corners = [(1, -1, 1, -1), (1, -1, -1, 1), (-1, 1, 1, -1), (-1, 1, -1, 1)]
        for k, p in enumerate(corners):
            tc.W_enc[0, 0, :4, 4 + k] = torch.tensor(p, dtype=torch.float)
            tc.W_enc[0, 0, BIAS, 4 + k] = -3.0
            tc.decoder_block(0, 1, masked=False)[0, 4 + k, Y] = 2.0 * scale
    return tc


def test_threshold_counts_the_own_write_in_the_total(case, model, decomps):
    # y's own feature writes 0.5 on average into W(y); each corner writes 2·scale/16.
    small, _ = score(case, model, _with_leak(decomps, 0.01))
    assert small["shortcut_edges"].tolist() == [0]
    big, _ = score(case, model, _with_leak(decomps, 1.0))
    assert big["shortcut_edges"].tolist() == [4]
    strict, _ = score(case, model, _with_leak(decomps, 1.0), threshold=0.2)
    assert strict["shortcut_edges"].tolist() == [0]


def test_per_run_inputs_give_the_same_graph(case, model, decomps):
    tc = decomps["clt_skip_keeps_b"]
    s, (x, out, matches) = score(case, model, tc)
    again = circuit_scores(case, tc, x[None], out.acts_RBLF, matches)
    assert again["predicted_edges"] == s["predicted_edges"]
    assert again["shortcut_edges"].tolist() == s["shortcut_edges"].tolist()


def test_bad_input_is_one_clear_error(case, model, decomps):
    tc = decomps["faithful"]
    _, (x, out, matches) = score(case, model, tc)
    with pytest.raises(CltEvalError, match="matches"):
        circuit_scores(case, tc, x, out.acts_RBLF, matches * 2)
    with pytest.raises(CltEvalError, match="x_BLD"):
        circuit_scores(case, tc, x[:3], out.acts_RBLF, matches)


# ---- a three-step chain -------------------------------------------------------------------
D3, BIAS3, H3, X3, OUT3 = 11, 4, 5, 9, 10
HALF = ("a+b-", "a-b+", "c+d-", "c-d+")


class _MLP(nn.Module):
    def __init__(self, W_in, W_out):
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.W_in, self.W_out = nn.Parameter(W_in, False), nn.Parameter(W_out, False)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x):
        return self.hook_post(self.hook_pre(x @ self.W_in).relu()) @ self.W_out


class _Block(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.mlp = mlp
        self.hook_resid_mid, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, resid):
        resid = self.hook_resid_mid(resid)
        return resid + self.hook_mlp_out(self.mlp(resid))


def _half_xor_enc(i: int) -> torch.Tensor:
    enc = torch.zeros(D3)
    a, sign = (0 if i < 2 else 2), (1.0 if i % 2 == 0 else -1.0)
    enc[a], enc[a + 1], enc[BIAS3] = sign, -sign, -1.0
    return enc


def _x_enc() -> torch.Tensor:
    enc = torch.zeros(D3)
    enc[H3:H3 + 4], enc[BIAS3] = 1.0, -1.0
    return enc


def _out_enc() -> torch.Tensor:
    enc = torch.zeros(D3)
    enc[X3], enc[BIAS3] = 2.0, -1.0
    return enc


def _chain_model():
    from transformer_lens import HookedRootModule

    eye = torch.eye(D3)
    mlps = [_MLP(torch.stack([_half_xor_enc(i) for i in range(4)], 1), eye[H3:H3 + 4]),
            _MLP(_x_enc()[:, None], eye[X3:X3 + 1]),
            _MLP(_out_enc()[:, None], 3 * eye[OUT3:OUT3 + 1])]

    class Chain(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([_Block(m) for m in mlps])
            self.setup()

        def forward(self, inputs):
            resid = torch.cat([inputs, torch.ones(len(inputs), 1),
                               torch.zeros(len(inputs), D3 - 5)], 1)
            for block in self.blocks:
                resid = block(resid)
            return resid

    return Chain().eval()


class ThreeStepChain:
    name = "three_step_chain"
    description = "half-XORs (0) -> X (1) -> out (2)"
    n_layers, d_model = 3, D3
    input_hooks = tuple(f"blocks.{i}.hook_resid_mid" for i in range(3))
    output_hooks = tuple(f"blocks.{i}.hook_mlp_out" for i in range(3))

    def model(self):
        return _chain_model()

    def inputs(self):
        from clt_eval.case_studies.boolean_two_step import all_inputs

        return all_inputs()

    def off_distribution_inputs(self, n=512, seed=0):
        return self.inputs()

    def output_value(self, model_out):
        return model_out[..., OUT3]

    def ground_truth(self):
        eye = torch.eye(D3)
        return [GroundTruthLayer(0, "blocks.0.mlp.hook_post", HALF, eye[H3:H3 + 4]),
                GroundTruthLayer(1, "blocks.1.mlp.hook_post", ("X",), eye[X3:X3 + 1]),
                GroundTruthLayer(2, "blocks.2.mlp.hook_post", ("out",), 3 * eye[OUT3:OUT3 + 1])]

    def input_directions(self):
        return torch.eye(D3)[:4]

    def circuit(self):
        inputs = ("a", "b", "c", "d")
        edges = [(inputs[2 * (j // 2) + i], h) for j, h in enumerate(HALF) for i in range(2)]
        edges += [(h, "X") for h in HALF] + [("X", "out")]
        layers = {n: -1 for n in inputs} | {h: 0 for h in HALF} | {"X": 1, "out": 2}
        return Circuit(inputs + HALF + ("X", "out"), tuple(edges), layers)


def _chain_tc(arch: str, feats: list[tuple[int, torch.Tensor, dict]]) -> Transcoder:
    tc = Transcoder([TranscoderConfig(d_model=D3, n_layers=3, n_features=8, arch=arch)])
    with torch.no_grad():
        for p in tc.parameters():
            p.zero_()
        count = [0, 0, 0]
        for layer, enc, decs in feats:
            f, count[layer] = count[layer], count[layer] + 1
            tc.W_enc[0, layer, :, f] = enc
            for target, vec in decs.items():
                tc.decoder_block(layer, target, masked=False)[0, f] = vec
    return tc


@pytest.fixture(scope="module")
def chain():
    case = ThreeStepChain()
    eye = torch.eye(D3)
    half = [(0, _half_xor_enc(i), {0: eye[H3 + i]}) for i in range(4)]
    faithful = _chain_tc("plt", half + [(1, _x_enc(), {1: eye[X3]}),
                                        (2, _out_enc(), {2: 3 * eye[OUT3]})])
    corners = [torch.tensor(p, dtype=torch.float) for p in
               [(1, -1, 1, -1), (1, -1, -1, 1), (-1, 1, 1, -1), (-1, 1, -1, 1)]]
    corner_enc = [torch.cat([p, torch.tensor([-3.0]), torch.zeros(D3 - 5)]) for p in corners]
    skipping = _chain_tc("clt", half + [(0, e, {1: eye[X3], 2: 3 * eye[OUT3]})
                                        for e in corner_enc])
    return case, case.model(), {"faithful": faithful, "skipping": skipping}


def test_chain_decompositions_are_exact(chain):
    case, model, tcs = chain
    x, y, _ = collect_mlp_io(model, case.inputs(), case.input_hooks, case.output_hooks)
    for tc in tcs.values():
        torch.testing.assert_close(tc(x).recon_RBLD[0], y)


def test_chain_faithful_has_depth_three(chain):
    case, model, tcs = chain
    s, _ = score(case, model, tcs["faithful"])
    assert s["circuit_edge_precision"].tolist() == [1.0]
    assert s["circuit_edge_recall"].tolist() == [1.0]
    assert s["shortcut_edges"].tolist() == [0]
    assert s["missing_middle_edges"].tolist() == [0]
    assert s["path_depth"].tolist() == [3.0]


def test_chain_skipping_clt_is_shallow(chain):
    case, model, tcs = chain
    s, _ = score(case, model, tcs["skipping"])
    # each corner writes X (unmapped source, (b)) and out (jumps a step, (a) and (b)).
    assert s["shortcut_edges"].tolist() == [8]
    assert s["path_depth"][0] < 3 and s["path_depth"].tolist() == [1.0]
    assert s["missing_middle_edges"].tolist() == [5]  # h -> X (4) and X -> out
    assert s["circuit_edge_recall"].tolist() == [pytest.approx(8 / 13)]
