"""Exact hand-built decompositions of the k-step Boolean chain, as transcoder weights.

Reconstruction alone cannot tell a faithful decomposition from one that skips steps: every
decomposition below reproduces every layer's MLP output exactly on the 16 inputs. What tells
them apart is what the sparsity penalty charges for each (priced by ``clt_eval.costs``).
Layers 0..k−1; m = k−2 is the last middle layer. All decoder biases are zero.

* ``faithful`` (PLT): one feature per true unit, at the unit's own layer, with the unit's own
  encoder and decoder.
* ``clt_skip_all`` (CLT): one "point" feature per input x at layer 0 (it fires 1 on x only)
  that writes x's MLP output at *every* layer, through its cross-layer decoders. Every step is
  skipped: no feature at any layer above 0.
* ``clt_skip_last`` (CLT, k ≥ 3): the faithful features at layers 0..m−1, plus point features
  at layer m−1 writing x's outputs at layers m and k−1: only the last middle step is skipped
  (its output, and the output step's, come from layer m−1 through cross-layer decoders).

Costs per sample, by hand (‖·‖ of a decoder is its norm; an active feature's value is 1).
Over the 16 inputs the cell (u, v, [a=+1]) with u = XOR(a,b), v = XOR(c,d) is uniform (8 cells
of 2 inputs); at k = 3 the outputs are y₀ = the half-XORs (‖y₀‖² = u + v), y₁ = t₂ = u∧v, and
y₂ = 2·t₃ with t₃ = XOR(t₂, [a=+1]):

    cell  (0,0,0) (0,0,1) (0,1,0) (0,1,1) (1,0,0) (1,0,1) (1,1,0)   (1,1,1)
    ‖y₀‖²    0       0       1       1       1       1       2         2
    y₁       0       0       0       0       0       0       1         1
    y₂       0       2       0       2       0       2       2         0

  faithful: half-XORs 1 active on average (norm 1), t₂ on 1/4 (norm 1), step 3's units on 1/2
  (norm 2): l1 = 1 + 1/4 + 1 = 2.25 under every norm; l0 = 1 + 1/4 + 1/2 = 1.75; the most
  active at once (max_l0) is 4, in cell (1,1,0). In general l1 = 2.25 + (k−3)/2 and
  l0 = 1.75 + (k−3)/2 for k ≥ 3 (each further middle step: 2 units, 1/4 each, norm 1).
  clt_skip_all: one point feature per non-zero column (7 of 8 cells), concatenated norm
  ‖(y₀, y₁, y₂)‖: l1/concatenated = (0 + 2 + 1 + √5 + 1 + √5 + √7 + √3)/8 ≈ 1.6062;
  summed = per-block = (2 + 1 + 3 + 1 + 3 + (3 + √2) + (1 + √2))/8 = 1.75 + √2/4 ≈ 2.1036;
  l0 = 7/8; max_l0 = 1.
  clt_skip_last: the half-XORs (l1 1, l0 1) plus point features writing (y₁, y₂) in 5 cells:
  l1/concatenated = 1 + (2 + 2 + 2 + √5 + 1)/8 = 1 + (7 + √5)/8 ≈ 2.1545;
  summed = per-block = 1 + (2 + 2 + 2 + 3 + 1)/8 = 2.25; l0 = 1 + 5/8 = 1.625; max_l0 = 3.

The inequalities, for every k (checked in the tests):
  (1) l1/concatenated: skip_all ≤ skip_last ≤ faithful. With zero decoder bias the features
      active on x write Σ_i a_i W_i = Y(x), the concatenation of all layers' outputs, so by the
      triangle inequality any exact decomposition costs ≥ E‖Y(x)‖, which skip_all attains. The
      point features of skip_last cost E‖(y_m, y_{k−1})‖ ≤ E(‖y_m‖ + ‖y_{k−1}‖), at most what
      the faithful features of layers m and k−1 cost (the triangle inequality per layer);
      strict wherever both are non-zero, as in cell (1,1,0) at k = 3.
  (2) l0: skip_all ≤ skip_last ≤ faithful. Any exact decomposition needs an active feature on
      every x with Y(x) ≠ 0, which is all skip_all spends; skip_last spends one feature where
      the faithful one spends at least one on layers m..k−1.
  (3) l1/summed: faithful − skip_all = (2 − √2)/4 for every k, and skip_last = faithful. Above
      layer 0 at most one unit per layer is active, so the summed norm charges ‖y_ℓ‖ per layer
      whoever writes it; the only saving is at layer 0, where one point feature writes two
      orthogonal half-XORs for √2 instead of 2 (on a quarter of the inputs). Skipping middle
      steps pays only under the concatenated norm (or l0).
"""

from __future__ import annotations

import torch

from clt_eval.case_studies.boolean_chain import BIAS, N_INPUTS, BooleanChain, all_inputs
from clt_eval.costs import Feature, hand_built
from clt_eval.transcoder import Transcoder

# (layer, encoder [D], {target layer: decoder [D]}): one hand-built transcoder feature.


def _faithful_features(case: BooleanChain, layers) -> list[Feature]:
    return [(s.layer, s.W_in[:, i], {s.layer: s.W_out[i]})
            for s in case.steps if s.layer in layers for i in range(len(s.names))]


def _point_features(case: BooleanChain, source: int, targets) -> list[Feature]:
    """One feature per input with a non-zero output at ``targets``, read at layer ``source``:
    p·x − 3 is 1 at x = p and ≤ −1 at every other corner (the stream keeps the inputs and the
    constant 1 unchanged at every layer), writing p's MLP output to each target layer."""
    x_N4 = all_inputs()
    y_NLD = case.mlp_outputs(x_N4)
    feats = []
    for p, y_LD in zip(x_N4, y_NLD, strict=True):
        decs = {t: y_LD[t] for t in targets if y_LD[t].abs().sum() > 0}
        if decs:
            enc = torch.zeros(case.d_model)
            enc[:N_INPUTS], enc[BIAS] = p, -float(N_INPUTS - 1)
            feats.append((source, enc, decs))
    return feats


def _build(arch: str, case: BooleanChain, width: int, features: list[Feature]) -> Transcoder:
    return hand_built(arch, case.d_model, case.n_layers, width, features)


def feature_lists(k: int) -> dict[str, tuple[str, list[Feature]]]:
    """Name -> (arch, features) of every decomposition of the k-step chain."""
    case = BooleanChain(k=k)
    L, m = case.n_layers, case.n_layers - 2
    out = {
        "faithful": ("plt", _faithful_features(case, range(L))),
        "clt_skip_all": ("clt", _point_features(case, 0, range(L))),
    }
    if k >= 3:  # with k = 2 the only middle step is layer 0: skipping it is skipping all
        kept = _faithful_features(case, range(m))
        out["clt_skip_last"] = ("clt", kept + _point_features(case, m - 1, (m, L - 1)))
    return out


def decompositions(k: int = 3) -> dict[str, Transcoder]:
    """Name -> single-run transcoder reconstructing every layer exactly on all 16 inputs. All
    share one width (the most features any of them puts on one layer), so they can be
    stacked into one ensemble."""
    lists = feature_lists(k)
    width = max(sum(1 for f in feats if f[0] == layer)
                for _, feats in lists.values() for layer in range(k))
    case = BooleanChain(k=k)
    return {name: _build(arch, case, width, feats) for name, (arch, feats) in lists.items()}
