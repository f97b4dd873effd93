"""Two Boolean steps with the middle features in superposition, built by hand, not trained.

The middle step computes G = 2·n_pairs features but writes them into only d_mid < G residual
dimensions, along unit directions that cannot all be orthogonal; the output step still reads
exactly what it needs, because on the data set at most one middle feature is active at a time
and a ReLU with a bias filters out the interference between directions.

Inputs: n_pairs pairs (a_i, b_i) ∈ {−1, +1}², ordered a_0, b_0, a_1, b_1, …; the data set is
every such point on which at most one pair disagrees: 2^n_pairs·(n_pairs + 1) rows (32 for
the default 3 pairs), a finite table.

  step 1, layer 0: the 2·n_pairs half-XORs f_{2i} = [a_i=+1 ∧ b_i=−1] = ReLU(a_i − b_i − 1) and
      f_{2i+1} = [a_i=−1 ∧ b_i=+1] = ReLU(b_i − a_i − 1). Feature g writes the unit vector w_g
      into the d_mid middle dimensions: w_g ∝ (cos θ_g, sin θ_g, cos 2θ_g, sin 2θ_g, …),
      θ_g = 2πg/G, with (−1)^g as the last coordinate when d_mid is odd. For d_mid = 2 these
      are G points evenly spread on a circle (the two features of a pair are neighbours);
      the first pair of coordinates alone tells distinct θ apart, so the directions are
      distinct for every d_mid and c = max_{g≠h} w_g·w_h < 1.
  step 2, layer 1: one readout unit per "a_i=+1 ∧ b_i=−1" feature,
      r_i = ReLU((w_{2i}·m − τ)/(1 − τ)), τ = (1 + max(c, 0))/2, m the middle dimensions;
      each writes 2 into the output dimension: y = 2·[some pair has a_i=+1 ∧ b_i=−1].

Why the readout is exact on the data (the tests check every row): a disagreeing pair's unit
gets ReLU(2 − 1) = 1 and every other unit ReLU(−1) or ReLU(−3) = 0, so m is w_g for the one
active feature g, or 0. Then r_i's pre-activation is (1 − τ)/(1 − τ) = 1 for g = 2i;
(w_{2i}·w_g − τ)/(1 − τ) ≤ (c − τ)/(1 − τ) < 0 for any other g; −τ/(1 − τ) < 0 for m = 0.
So r_i = f_{2i} on every row. τ sits halfway between the largest interference and the signal
so that rounding cannot leak interference through.

Why the output step needs its ReLU: y is not an affine function of its MLP input (inputs,
bias and m) on the data. Suppose y/2 = φ·m + λ·x + ν. Rows with no disagreeing pair (m = 0,
a_i = b_i free) force ν = 0 and λ_{b_i} = −λ_{a_i} =: −μ_i. A row where pair i disagrees
then gives φ·w_{2i} + 2μ_i = 1 (a_i=+1) and φ·w_{2i+1} − 2μ_i = 0 (a_i=−1), so
φ·(w_{2i} + w_{2i+1}) = 1 for every i; summed over i, φ·Σ_g w_g = n_pairs. But Σ_g w_g = 0
(each coordinate is a frequency below G/2 sampled evenly): a contradiction.

Residual stream (d_model = 2·n_pairs + d_mid + 2):
    0..2P−1           inputs a_0, b_0, a_1, b_1, …
    2P                constant 1 (the MLPs' biases are weights on it)
    2P+1..2P+d_mid    the middle subspace, shared by all 2P half-XORs
    last              the output y
"""

from __future__ import annotations

import itertools
import math

import torch

from clt_eval.case_studies import _mlp_stack as stack
from clt_eval.case_study import Circuit, GroundTruthLayer
from clt_eval.errors import CltEvalError

PAIRS = (2, 3, 4, 5)
OUTPUT_SCALE = 2.0  # y ∈ {0, 2}, as in the two-step toy
OFF_DISTRIBUTION_NOISE = 0.2


def _int_in(field: str, value: object, allowed: range) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value in allowed):
        raise CltEvalError(f"boolean_superposition: {field}={value!r}; expected an integer in "
                           f"{allowed.start}..{allowed.stop - 1}")
    return value


def feature_directions(n_features: int, d_mid: int) -> torch.Tensor:
    """[G, d_mid] unit vectors, evenly spaced in angle: frequency pairs (cos jθ, sin jθ) for
    j = 1, 2, …, and for odd d_mid a last coordinate cos(Gθ/2) = (−1)^g. Every coordinate
    block has the same norm for every g, so the rows need one common scale and still sum to
    zero (each frequency is below G/2), which keeps y nonlinear in the stream (docstring)."""
    theta = 2 * math.pi * torch.arange(n_features, dtype=torch.float64) / n_features
    angles = theta[:, None] * torch.arange(1, d_mid // 2 + 1, dtype=torch.float64)
    coords = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(1)  # [G, 2·(d_mid//2)]
    if d_mid % 2:
        alternating = 1.0 - 2.0 * (torch.arange(n_features) % 2).double()
        coords = torch.cat([coords, alternating[:, None]], dim=1)
    return coords / coords[0].norm()


def readout_threshold(dirs_GM: torch.Tensor) -> float:
    """τ halfway between the largest interference max(c, 0) and the signal 1."""
    cos = dirs_GM @ dirs_GM.T
    c = cos.masked_fill(torch.eye(len(cos), dtype=torch.bool), -1.0).max().item()
    return (1.0 + max(c, 0.0)) / 2


class BooleanSuperposition:
    """Case-study plugin: 2·n_pairs middle features superposed in d_mid dimensions."""

    name = "boolean_superposition"
    description = ("n_pairs (default 3) Boolean pairs -> 2·n_pairs half-XORs superposed in "
                   "d_mid (default 2) dims (layer 0) -> ReLU readouts, y = 2·[some a_i+ b_i-] "
                   "(layer 1)")

    def __init__(self, n_pairs: int = 3, d_mid: int = 2):
        self.n_pairs = _int_in("n_pairs", n_pairs, range(PAIRS[0], PAIRS[-1] + 1))
        self.d_mid = _int_in("d_mid", d_mid, range(2, 2 * n_pairs))  # fewer dims than features
        self.n_inputs = 2 * n_pairs
        self.bias, self.mid = self.n_inputs, self.n_inputs + 1
        self.d_model = self.n_inputs + d_mid + 2
        self.output_dim = self.d_model - 1
        self.n_layers = 2
        self.input_hooks, self.output_hooks = stack.input_hooks(2), stack.output_hooks(2)
        self.dirs_GM = feature_directions(self.n_inputs, d_mid)
        self.tau = readout_threshold(self.dirs_GM)
        self.half_xor_names = tuple(f"a{i}{s}b{i}{t}" for i in range(n_pairs)
                                    for s, t in (("+", "-"), ("-", "+")))
        self.readout_names = tuple(f"read({n})" for n in self.half_xor_names[::2])

    # ---- the model --------------------------------------------------------------------
    def mlps(self) -> list[stack.MLPSpec]:
        D, G, M = self.d_model, self.n_inputs, slice(self.mid, self.mid + self.d_mid)
        W0_in, W0_out = torch.zeros(D, G), torch.zeros(G, D)
        for g in range(G):
            a, sign = 2 * (g // 2), 1.0 if g % 2 == 0 else -1.0
            W0_in[a, g], W0_in[a + 1, g], W0_in[self.bias, g] = sign, -sign, -1.0
        W0_out[:, M] = self.dirs_GM.float()
        scale = 1.0 / (1.0 - self.tau)  # so the readout is exactly 1 on its own feature
        W1_in, W1_out = torch.zeros(D, self.n_pairs), torch.zeros(self.n_pairs, D)
        W1_in[M] = (self.dirs_GM[::2].T * scale).float()
        W1_in[self.bias] = -self.tau * scale
        W1_out[:, self.output_dim] = OUTPUT_SCALE
        return [(W0_in, None, W0_out), (W1_in, None, W1_out)]

    def model(self):
        return stack.mlp_stack(self.mlps(), stack.bias_embed(self.n_inputs, self.d_model,
                                                             self.bias))

    # ---- data -------------------------------------------------------------------------
    def inputs(self) -> torch.Tensor:
        """Every point of {−1,+1}^(2·n_pairs) with at most one disagreeing pair, in
        lexicographic order."""
        rows = [p for p in itertools.product([-1.0, 1.0], repeat=self.n_inputs)
                if sum(p[2 * i] != p[2 * i + 1] for i in range(self.n_pairs)) <= 1]
        return torch.tensor(rows)

    def off_distribution_inputs(self, n: int = 512, seed: int = 0) -> torch.Tensor:
        """Data points plus Gaussian noise: near the table, but not on it."""
        g = torch.Generator().manual_seed(seed)
        data = self.inputs()
        rows = data[torch.randint(0, len(data), (n,), generator=g)]
        return rows + OFF_DISTRIBUTION_NOISE * torch.randn(rows.shape, generator=g)

    def output_value(self, model_out: torch.Tensor) -> torch.Tensor:
        return model_out[..., self.output_dim]

    # ---- ground truth -----------------------------------------------------------------
    def ground_truth(self) -> list[GroundTruthLayer]:
        (_, _, W0_out), (_, _, W1_out) = self.mlps()
        return [GroundTruthLayer(0, stack.feature_hook(0), self.half_xor_names, W0_out),
                GroundTruthLayer(1, stack.feature_hook(1), self.readout_names, W1_out)]

    def input_directions(self) -> torch.Tensor:
        return torch.eye(self.n_inputs, self.d_model)

    def circuit(self) -> Circuit:
        inputs = tuple(f"{v}{i}" for i in range(self.n_pairs) for v in "ab")
        edges = [(inputs[2 * (g // 2) + j], h)
                 for g, h in enumerate(self.half_xor_names) for j in range(2)]
        # The readout of f_{2i} depends on f_{2i} alone: every other feature's interference
        # is below the threshold on the data, so it has no effect there.
        edges += list(zip(self.half_xor_names[::2], self.readout_names, strict=True))
        layers = (dict.fromkeys(inputs, -1) | dict.fromkeys(self.half_xor_names, 0)
                  | dict.fromkeys(self.readout_names, 1))
        return Circuit(tuple(layers), tuple(edges), layers)
