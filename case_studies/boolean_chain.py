"""A k-step Boolean chain (k = 2..5): one MLP layer per step, built by hand, not trained.

The Boolean two-step case study stretched to k steps, so that a cross-layer transcoder can
skip any subset of the middle steps. The inputs are (a, b, c, d) ∈ {−1, +1}⁴, all 16 points,
for every k: a finite truth table.

Steps (t_j ∈ {0, 1} is the Boolean variable step j computes; each unit is one ReLU):
  step 1, layer 0: the half-XORs [a=+1∧b=−1], [a=−1∧b=+1], [c=+1∧d=−1], [c=−1∧d=+1],
      ReLU(±a ∓ b − 1); their pairwise sums are XOR(a,b) and XOR(c,d).
  step 2, layer 1: t₂ = XOR(a,b) ∧ XOR(c,d) = ReLU(h₁ + h₂ + h₃ + h₄ − 1).
  step j ≥ 3, layer j−1: t_j = XOR(t_{j−1}, [x_j = +1]) by two half-XOR units,
      [t_{j−1}=1 ∧ x_j=−1] = ReLU(t − x_j − 1) and [t_{j−1}=0 ∧ x_j=+1] = ReLU(x_j − t),
      where t is the sum of step j−1's units and x_j = a, c, b for j = 3, 4, 5.
  The last step's units write 2 into the output dimension: y = 2·t_k ∈ {0, 2}. For k = 2 this
  is the two-step toy exactly (same weights, same residual layout).

Residual stream (d_model = 10 for k = 2, else 2k + 5):
    0..3   inputs a, b, c, d
    4      constant 1 (the MLPs' biases are weights on it)
    5..8   step 1's four half-XORs
    9      t₂ (for k = 2, the output y)
    10..   two dimensions for each further middle step j = 3..k−1, one per unit
    last   the output y (for k ≥ 3)

Why fold in a, c, b rather than fresh inputs: the table stays at 16 rows (a fresh input per
step would double it), and two properties still hold, both checked in the tests.
(1) x_j is independent of t_{j−1} over the 16 inputs: t₂ involves a only through a ≠ b, a
fair coin whatever a is; t₃ = t₂ ⊕ [a=+1] is a fair coin whatever c is; given b, t₄ =
[a≠b]·[c≠d] ⊕ [a=+1] ⊕ [c=+1] is a fair coin (if a ≠ b, [c≠d] is a fair coin independent of
a, b, c; if a = b, [c=+1] is). So t_j is uniform for j ≥ 3 and the firing rates are simple:
step 3's units fire on 1/8 and 3/8 of the inputs, every later step's units on 1/4 each.
(2) Every step is genuinely nonlinear: its units are not an affine function of the MLP's
whole input (inputs, bias and every earlier unit) on the 16 inputs, so no linear map could
stand in for any MLP. In ±1 monomials, s = 1 − 2t multiplies by −x_j at
each XOR: s₂ = (1 + ab + cd − abcd)/2, s₃ = −(a + b + acd − bcd)/2, s₄ = (ac + bc + ad − bd)/2,
s₅ = −(abc + c + abd − d)/2; each step needs a monomial (abcd; acd; ac; abc) that the stream
before it does not hold.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from clt_eval.case_studies import _mlp_stack as stack
from clt_eval.case_study import Circuit, GroundTruthLayer
from clt_eval.errors import CltEvalError

INPUT_NAMES = ("a", "b", "c", "d")
N_INPUTS, BIAS, H0, T2 = 4, 4, 5, 9
HALF_XOR_NAMES = ("a+b-", "a-b+", "c+d-", "c-d+")
FOLDED_INPUTS = (0, 2, 1)  # x_j for steps j = 3, 4, 5: a, c, b (see the module docstring)
K_VALUES = (2, 3, 4, 5)
OUTPUT_SCALE = 2.0  # y = 2·t_k, as in the two-step toy


@dataclass(frozen=True)
class Step:
    """One step of the chain: the MLP of its layer, one hidden unit per named feature."""

    layer: int
    names: tuple[str, ...]
    W_in: torch.Tensor  # [D, H], biases on the constant-1 dimension
    W_out: torch.Tensor  # [H, D]
    edges: tuple[tuple[str, str], ...]  # (source, unit) pairs of the ground-truth circuit


def d_model_for(k: int) -> int:
    return 10 if k == 2 else 2 * k + 5


def all_inputs() -> torch.Tensor:
    """The 16 points of {−1, +1}⁴, in lexicographic order of (a, b, c, d)."""
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=N_INPUTS)))


def _half_xor_step(D: int) -> Step:
    W_in, W_out = torch.zeros(D, 4), torch.zeros(4, D)
    edges = []
    for j, (i, sign) in enumerate([(0, 1.0), (0, -1.0), (2, 1.0), (2, -1.0)]):
        W_in[i, j], W_in[i + 1, j], W_in[BIAS, j] = sign, -sign, -1.0
        W_out[j, H0 + j] = 1.0
        edges += [(INPUT_NAMES[i], HALF_XOR_NAMES[j]), (INPUT_NAMES[i + 1], HALF_XOR_NAMES[j])]
    return Step(0, HALF_XOR_NAMES, W_in, W_out, tuple(edges))


def _and_step(D: int, is_output: bool) -> Step:
    name = ("y" if is_output else "t2") + "=XOR(a,b)&XOR(c,d)"
    W_in, W_out = torch.zeros(D, 1), torch.zeros(1, D)
    W_in[H0:H0 + 4, 0], W_in[BIAS, 0] = 1.0, -1.0  # 1 only when both XORs hold
    W_out[0, T2] = OUTPUT_SCALE if is_output else 1.0
    return Step(1, (name,), W_in, W_out, tuple((h, name) for h in HALF_XOR_NAMES))


def _xor_step(D: int, j: int, prev: Step, prev_dims: list[int], out_dims: list[int],
              scale: float) -> Step:
    """Step j ≥ 3: t_j = XOR(t_{j−1}, [x_j=+1]), t_{j−1} = sum of ``prev_dims``."""
    x = FOLDED_INPUTS[j - 3]
    xn = INPUT_NAMES[x]
    names = (f"t{j - 1}+{xn}-", f"t{j - 1}-{xn}+")  # [t=1 ∧ x=−1], [t=0 ∧ x=+1]
    W_in, W_out = torch.zeros(D, 2), torch.zeros(2, D)
    W_in[prev_dims, 0], W_in[x, 0], W_in[BIAS, 0] = 1.0, -1.0, -1.0  # ReLU(t − x − 1)
    W_in[prev_dims, 1], W_in[x, 1] = -1.0, 1.0  # ReLU(x − t)
    W_out[0, out_dims[0]], W_out[1, out_dims[1]] = scale, scale
    edges = [(src, n) for n in names for src in (*prev.names, xn)]
    return Step(j - 1, names, W_in, W_out, tuple(edges))


def chain_steps(k: int) -> list[Step]:
    """The k steps, in layer order; the last one is the output."""
    D = d_model_for(k)
    steps = [_half_xor_step(D), _and_step(D, is_output=k == 2)]
    prev_dims, free = [T2], T2 + 1
    for j in range(3, k + 1):
        is_output = j == k
        out_dims = [D - 1, D - 1] if is_output else [free, free + 1]
        scale = OUTPUT_SCALE if is_output else 1.0
        steps.append(_xor_step(D, j, steps[-1], prev_dims, out_dims, scale))
        prev_dims, free = out_dims, free + 2
    return steps


class BooleanChain:
    """Case-study plugin: a k-step Boolean chain, every middle step a nonlinear one."""

    name = "boolean_chain"
    description = ("k-step Boolean chain (k=2..5, default 3) on 4 inputs: half-XORs -> "
                   "AND of XORs -> XOR with a, c, b; each step one layer; k=2 is the two-step toy")
    off_distribution_noise = 0.2  # cube corners plus Gaussian noise of this size

    def __init__(self, k: int = 3):
        if not (isinstance(k, int) and not isinstance(k, bool) and k in K_VALUES):
            raise CltEvalError(f"boolean_chain: k={k!r}; expected an integer in 2..5")
        self.k = k
        self.n_layers = k
        self.d_model = d_model_for(k)
        self.input_hooks = stack.input_hooks(k)
        self.output_hooks = stack.output_hooks(k)
        self.steps = chain_steps(k)
        self.output_dim = self.d_model - 1

    def mlps(self) -> list[stack.MLPSpec]:
        return [(s.W_in, None, s.W_out) for s in self.steps]

    def embed(self, inputs_N4: torch.Tensor) -> torch.Tensor:
        return stack.bias_embed(N_INPUTS, self.d_model, BIAS)(inputs_N4)

    def model(self):
        return stack.mlp_stack(self.mlps(), stack.bias_embed(N_INPUTS, self.d_model, BIAS))

    def inputs(self) -> torch.Tensor:
        return all_inputs()

    def off_distribution_inputs(self, n: int = 512, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        corners = all_inputs()[torch.randint(0, 16, (n,), generator=g)]
        return corners + self.off_distribution_noise * torch.randn(n, N_INPUTS, generator=g)

    def output_value(self, model_out: torch.Tensor) -> torch.Tensor:
        return model_out[..., self.output_dim]

    def ground_truth(self) -> list[GroundTruthLayer]:
        return [GroundTruthLayer(s.layer, stack.feature_hook(s.layer), s.names, s.W_out.clone())
                for s in self.steps]

    def input_directions(self) -> torch.Tensor:
        return torch.eye(N_INPUTS, self.d_model)

    def circuit(self) -> Circuit:
        layers = dict.fromkeys(INPUT_NAMES, -1)
        for s in self.steps:
            layers |= dict.fromkeys(s.names, s.layer)
        edges = tuple(e for s in self.steps for e in s.edges)
        return Circuit(tuple(layers), edges, layers)

    def mlp_outputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """[N, L, D]: every layer's MLP output, in plain torch (no model library)."""
        return stack.forward_mlps(self.mlps(), self.embed(inputs))[0]

    def analytic_decompositions(self) -> dict:
        """Optional extra: exact hand-built decompositions to price (boolean_chain_costs)."""
        from clt_eval.case_studies.boolean_chain_costs import decompositions

        return decompositions(self.k)
