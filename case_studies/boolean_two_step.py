"""The Boolean two-step toy (docs/concepts.md §4), built by hand, not trained.

Residual stream (d_model = 10):
    0..3  inputs a, b, c, d ∈ {-1, +1}
    4     constant 1 (bias)
    5..8  MLP0's half-XORs  [a=+1∧b=-1], [a=-1∧b=+1], [c=+1∧d=-1], [c=-1∧d=+1]
    9     MLP1's output y = 2·[XOR(a,b) ∧ XOR(c,d)]

Step 1 (MLP0): a half-XOR is ReLU(±a ∓ b - 1): 1 at its corner, ≤ 0 at the other three.
Step 2 (MLP1): with u = XOR(a,b) = h1+h2 and v = XOR(c,d) = h3+h4 (each 0 or 1),
y = 2·ReLU(u + v - 1) is 2 exactly when both hold. Not linear in the h's, so step 2 needs its
own nonlinearity. There is no attention, so an MLP's input is the residual stream itself
(``hook_resid_mid``), and MLP1 reads MLP0's input plus MLP0's output.
"""

from __future__ import annotations

import itertools

import torch

from clt_eval.case_study import Circuit, GroundTruthLayer

D_MODEL, BIAS, H0, Y = 10, 4, 5, 9
INPUT_NAMES = ("a", "b", "c", "d")
HALF_XOR_NAMES = ("a+b-", "a-b+", "c+d-", "c-d+")
OUTPUT_NAME = "y=XOR(a,b)&XOR(c,d)"


def _mlp0() -> tuple[torch.Tensor, None, torch.Tensor]:
    W_in = torch.zeros(D_MODEL, 4)
    for j, (i, sign) in enumerate([(0, 1), (0, -1), (2, 1), (2, -1)]):
        W_in[i, j], W_in[i + 1, j], W_in[BIAS, j] = sign, -sign, -1.0
    W_out = torch.zeros(4, D_MODEL)
    W_out[torch.arange(4), H0 + torch.arange(4)] = 1.0
    return W_in, None, W_out


def _mlp1() -> tuple[torch.Tensor, None, torch.Tensor]:
    W_in = torch.zeros(D_MODEL, 1)
    W_in[H0:H0 + 4, 0], W_in[BIAS, 0] = 1.0, -1.0
    W_out = torch.zeros(1, D_MODEL)
    W_out[0, Y] = 2.0
    return W_in, None, W_out


def build_model():
    """inputs [N, 4] -> final residual stream [N, 10], on the shared hooked MLP stack."""
    from clt_eval.case_studies._mlp_stack import bias_embed, mlp_stack

    return mlp_stack([_mlp0(), _mlp1()], bias_embed(4, D_MODEL, BIAS))


def all_inputs() -> torch.Tensor:
    """The 16 points of {-1,+1}^4, in lexicographic order of (a, b, c, d)."""
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)))


class BooleanTwoStep:
    """Case-study plugin for the Boolean two-step toy."""

    name = "boolean_two_step"
    description = "A -> B (half-XORs, layer 0) -> C (AND of XORs, layer 1); no A -> C edge"
    n_layers = 2
    d_model = D_MODEL
    input_hooks = ("blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid")
    output_hooks = ("blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out")
    middle_layer = 0
    output_layer = 1
    # Off-distribution inputs: cube corners plus Gaussian noise of this size (docs/concepts.md §5).
    off_distribution_noise = 0.2

    def model(self):
        return build_model()

    def inputs(self) -> torch.Tensor:
        return all_inputs()

    def off_distribution_inputs(self, n: int = 512, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        corners = all_inputs()[torch.randint(0, 16, (n,), generator=g)]
        return corners + self.off_distribution_noise * torch.randn(n, 4, generator=g)

    def output_value(self, model_out: torch.Tensor) -> torch.Tensor:
        return model_out[..., Y]

    def ground_truth(self) -> list[GroundTruthLayer]:
        eye = torch.eye(D_MODEL)
        return [
            GroundTruthLayer(0, "blocks.0.mlp.hook_post", HALF_XOR_NAMES, eye[H0:H0 + 4]),
            GroundTruthLayer(1, "blocks.1.mlp.hook_post", (OUTPUT_NAME,), 2 * eye[Y:Y + 1]),
        ]

    def input_directions(self) -> torch.Tensor:
        return torch.eye(D_MODEL)[:4]

    def analytic_decompositions(self) -> dict:
        """Optional extra: the exact hand-built decompositions to price (docs/concepts.md §4)."""
        from clt_eval.case_studies.boolean_two_step_costs import decompositions

        return decompositions()

    def circuit(self) -> Circuit:
        a_to_b = [(INPUT_NAMES[2 * (j // 2) + i], h)
                  for j, h in enumerate(HALF_XOR_NAMES) for i in range(2)]
        b_to_c = [(h, OUTPUT_NAME) for h in HALF_XOR_NAMES]
        layers = {n: -1 for n in INPUT_NAMES} | {h: 0 for h in HALF_XOR_NAMES}
        return Circuit(INPUT_NAMES + HALF_XOR_NAMES + (OUTPUT_NAME,), tuple(a_to_b + b_to_c),
                       layers | {OUTPUT_NAME: 1})


def truth_table() -> torch.Tensor:
    """y for each of the 16 inputs, computed directly from the Boolean definition."""
    x = all_inputs()
    xor_ab, xor_cd = x[:, 0] != x[:, 1], x[:, 2] != x[:, 3]
    return 2.0 * (xor_ab & xor_cd).float()
