"""The two-step circuit on continuous inputs, built by hand, not trained.

The Boolean two-step case study has 16 inputs, few enough for a transcoder to memorise one
feature per input. Here the inputs are continuous, so no finite set of point features can
reproduce the MLPs: a transcoder has to learn the functions themselves.

Inputs (a, b, c, d) uniform on [−1, 1]⁴; ``inputs()`` is a fixed sample of ``n_samples``
points drawn with ``seed``, and ``off_distribution_inputs`` draws from [−2, 2]⁴ (twice the
scale: half of the off-distribution inputs leave the training box in some coordinate).

  step 1, layer 0: h = (ReLU(a − b), ReLU(b − a), ReLU(c − d), ReLU(d − c)), the continuous
      half-XORs; their pairwise sums are |a − b| and |c − d|.
  step 2, layer 1: y = ReLU(h₁ + h₂ + h₃ + h₄ − 1) = ReLU(|a − b| + |c − d| − 1), which is 0 on
      part of the input box and grows linearly on the rest, so it is not an affine function
      of the h's: step 2 needs its own nonlinearity (as "AND of the XORs" does on the cube).

The output is continuous, so "right" needs a tolerance: ``output_tolerance`` is a tenth of the
standard deviation of y over ``inputs()`` (about 0.05 for uniform inputs), an error small
against how much y varies between inputs, and the same rule the evaluation applies to any
continuous output that does not set its own.

Residual stream (d_model = 10, the two-step toy's layout):
    0..3  inputs a, b, c, d
    4     constant 1 (step 2's bias is a weight on it)
    5..8  step 1's h
    9     step 2's output y
"""

from __future__ import annotations

import torch

from clt_eval.case_studies import _mlp_stack as stack
from clt_eval.case_study import Circuit, GroundTruthLayer
from clt_eval.errors import CltEvalError

D_MODEL, BIAS, H0, Y = 10, 4, 5, 9
INPUT_NAMES = ("a", "b", "c", "d")
HALF_NAMES = ("relu(a-b)", "relu(b-a)", "relu(c-d)", "relu(d-c)")
OUTPUT_NAME = "y=relu(|a-b|+|c-d|-1)"
MAX_SAMPLES = 1 << 20
OFF_SEED_OFFSET = 1_000_003  # so off-distribution draws never replay the training draws
TOLERANCE_FRACTION = 0.1  # of y's standard deviation on inputs()


def closed_form(x_N4: torch.Tensor) -> torch.Tensor:
    """y = ReLU(|a − b| + |c − d| − 1), straight from the definition."""
    a, b, c, d = x_N4.unbind(-1)
    return ((a - b).abs() + (c - d).abs() - 1).relu()


class ContinuousTwoStep:
    """Case-study plugin: the two-step circuit on a seeded sample of continuous inputs."""

    name = "continuous_two_step"
    description = ("4 continuous inputs -> ReLU(a-b), ReLU(b-a), ReLU(c-d), ReLU(d-c) "
                   "(layer 0) -> y = ReLU(|a-b|+|c-d|-1) (layer 1)")
    n_layers = 2
    d_model = D_MODEL
    input_hooks = stack.input_hooks(2)
    output_hooks = stack.output_hooks(2)

    def __init__(self, n_samples: int = 2048, seed: int = 0):
        if not (isinstance(n_samples, int) and not isinstance(n_samples, bool)
                and 16 <= n_samples <= MAX_SAMPLES):
            raise CltEvalError(f"continuous_two_step: n_samples={n_samples!r}; expected an "
                               f"integer in 16..{MAX_SAMPLES}")
        if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
            raise CltEvalError(f"continuous_two_step: seed={seed!r}; expected an integer >= 0")
        self.n_samples, self.seed = n_samples, seed
        self._inputs = self._uniform(n_samples, seed, scale=1.0)
        self.output_tolerance = TOLERANCE_FRACTION * float(closed_form(self._inputs).std())

    @staticmethod
    def _uniform(n: int, seed: int, scale: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return scale * (2 * torch.rand(n, 4, generator=g) - 1)

    def mlps(self) -> list[stack.MLPSpec]:
        W0_in, W0_out = torch.zeros(D_MODEL, 4), torch.zeros(4, D_MODEL)
        for j, (i, sign) in enumerate([(0, 1.0), (0, -1.0), (2, 1.0), (2, -1.0)]):
            W0_in[i, j], W0_in[i + 1, j] = sign, -sign  # ReLU(±(x_i − x_{i+1})), no bias
            W0_out[j, H0 + j] = 1.0
        W1_in, W1_out = torch.zeros(D_MODEL, 1), torch.zeros(1, D_MODEL)
        W1_in[H0:H0 + 4, 0], W1_in[BIAS, 0] = 1.0, -1.0
        W1_out[0, Y] = 1.0
        return [(W0_in, None, W0_out), (W1_in, None, W1_out)]

    def model(self):
        return stack.mlp_stack(self.mlps(), stack.bias_embed(4, D_MODEL, BIAS))

    def inputs(self) -> torch.Tensor:
        return self._inputs.clone()

    def off_distribution_inputs(self, n: int = 512, seed: int = 0) -> torch.Tensor:
        return self._uniform(n, seed + OFF_SEED_OFFSET, scale=2.0)

    def output_value(self, model_out: torch.Tensor) -> torch.Tensor:
        return model_out[..., Y]

    def ground_truth(self) -> list[GroundTruthLayer]:
        eye = torch.eye(D_MODEL)
        return [GroundTruthLayer(0, stack.feature_hook(0), HALF_NAMES, eye[H0:H0 + 4]),
                GroundTruthLayer(1, stack.feature_hook(1), (OUTPUT_NAME,), eye[Y:Y + 1])]

    def input_directions(self) -> torch.Tensor:
        return torch.eye(4, D_MODEL)

    def circuit(self) -> Circuit:
        a_to_h = [(INPUT_NAMES[2 * (j // 2) + i], h) for j, h in enumerate(HALF_NAMES)
                  for i in range(2)]
        h_to_y = [(h, OUTPUT_NAME) for h in HALF_NAMES]
        layers = (dict.fromkeys(INPUT_NAMES, -1) | dict.fromkeys(HALF_NAMES, 0)
                  | {OUTPUT_NAME: 1})
        return Circuit(tuple(layers), tuple(a_to_h + h_to_y), layers)
