"""Exact hand-built decompositions of the Boolean two-step toy, as transcoder weights.

docs/concepts.md §4: reconstruction alone cannot tell the faithful decomposition from a shortcut,
so we
build each exact decomposition and price it under every penalty (``clt_eval.costs``):

* ``faithful``: the 4 half-XORs at layer 0, the AND-of-XORs at layer 1 (the true circuit).
* ``best_plt``: one "point" feature per input with a non-zero MLP0 output (12 of 16), each
  writing that input's whole MLP0 output; layer 1 as faithful. By the triangle inequality
  Σ a_i‖w_i‖ ≥ ‖Σ a_i w_i‖ this is the cheapest exact PLT under l1, and it also has the
  smallest possible L0 (a sample with a non-zero output needs ≥ 1 active feature), so under
  l1, tanh and l0 it beats the faithful decomposition whenever the width allows 12 features.
* ``clt_shortcut``: the same 12 point features also write y to layer 1 through the
  cross-layer decoder; no layer-1 features at all. The cheapest exact CLT under
  concatenated-norm l1 (it attains the lower bound E‖(y_0, y_1)‖).
* ``clt_skip_keeps_b``: the faithful half-XORs plus 4 "corner" features at layer 0 that write
  y only through cross-layer decoders: skips C's own layer yet keeps B; costs as faithful.
"""

from __future__ import annotations

import torch

from clt_eval.case_studies.boolean_two_step import BIAS, D_MODEL, H0, Y, all_inputs
from clt_eval.costs import Feature, hand_built
from clt_eval.transcoder import Transcoder

WIDTH = 12  # features per layer needed by the widest decomposition (12 point features)


def _half_xor(i: int):
    enc = torch.zeros(D_MODEL)
    a = 0 if i < 2 else 2  # first input of the pair (a,b) or (c,d)
    sign = 1.0 if i % 2 == 0 else -1.0
    enc[a], enc[a + 1], enc[BIAS] = sign, -sign, -1.0
    return enc, {0: torch.eye(D_MODEL)[H0 + i]}


def _and_of_xors():
    enc = torch.zeros(D_MODEL)
    enc[H0:H0 + 4], enc[BIAS] = 1.0, -1.0
    return enc, {1: 2 * torch.eye(D_MODEL)[Y]}


def _half_xors_of(p: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(D_MODEL)
    out[H0:H0 + 4] = torch.stack([(p[0] > p[1]), (p[0] < p[1]), (p[2] > p[3]), (p[2] < p[3])])
    return out


def _point(p: torch.Tensor, write_y: bool):
    """Fires 1 on input p only: p·x - 3 is 1 at p and ≤ -1 at every other corner."""
    enc = torch.zeros(D_MODEL)
    enc[:4], enc[BIAS] = p, -3.0
    dec = {0: _half_xors_of(p)}
    y = 2.0 * float(p[0] != p[1] and p[2] != p[3])
    if write_y and y:
        dec[1] = y * torch.eye(D_MODEL)[Y]
    return enc, dec


def _build(arch: str, features: list[Feature]) -> Transcoder:
    return hand_built(arch, D_MODEL, 2, WIDTH, features)


def decompositions() -> dict[str, Transcoder]:
    """Name -> single-run transcoder that reconstructs both MLPs exactly on all 16 inputs."""
    points = [p for p in all_inputs() if _half_xors_of(p).abs().sum() > 0]
    half_xors = [(0, *_half_xor(i)) for i in range(4)]
    layer1 = [(1, *_and_of_xors())]
    corners = [p for p in points if p[0] != p[1] and p[2] != p[3]]
    corner_feats = [(0, _point(p, True)[0], {1: 2 * torch.eye(D_MODEL)[Y]}) for p in corners]
    return {
        "faithful": _build("plt", half_xors + layer1),
        "best_plt": _build("plt", [(0, *_point(p, False)) for p in points] + layer1),
        "clt_shortcut": _build("clt", [(0, *_point(p, True)) for p in points]),
        "clt_skip_keeps_b": _build("clt", half_xors + corner_feats),
    }
