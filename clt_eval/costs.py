"""Sparsity cost of a given decomposition under every penalty × decoder-norm choice.

Used to compare hand-built exact decompositions (what the penalty *should* prefer) with what
training finds. Pure functions of a transcoder and its inputs; λ is left out (costs per unit λ).
"""

from __future__ import annotations

import torch

from clt_eval.config import TranscoderConfig
from clt_eval.losses import cross_layer_mass, feature_norms, penalty_terms
from clt_eval.transcoder import Transcoder

# (source layer, encoder vector [D], {target layer: decoder vector [D]}): one hand-built feature
Feature = tuple[int, torch.Tensor, dict[int, torch.Tensor]]

NORMS = ("concatenated", "summed", "per_block")


@torch.no_grad()
def hand_built(arch: str, d_model: int, n_layers: int, width: int,
               features: list[Feature]) -> Transcoder:
    """A single-run transcoder (ReLU, zero biases) holding exactly ``features``, each in the
    next free slot of its source layer: how case studies write down exact decompositions."""
    cfg = TranscoderConfig(d_model=d_model, n_layers=n_layers, n_features=width, arch=arch)
    tc = Transcoder([cfg])
    for p in tc.parameters():
        p.zero_()
    count = [0] * n_layers
    for layer, enc, decs in features:
        f = count[layer]
        count[layer] += 1
        tc.W_enc[0, layer, :, f] = enc
        for target, vec in decs.items():
            tc.decoder_block(layer, target, masked=False)[0, f] = vec
    return tc


@torch.no_grad()
def sparsity_costs(tc: Transcoder, x_BLD: torch.Tensor, tanh_scale: float = 1.0) -> dict:
    """{"l1/concatenated": [R], ..., "l0": [R], "max_l0": [R], "cross_layer": [R]}: mean cost
    per sample.

    ``max_l0`` is the largest number of active features any sample needs: the smallest joint
    TopK budget k that can reproduce the decomposition exactly.
    """
    was_training = tc.training
    tc.eval()  # inference-time activations (BatchTopK's threshold), and no buffer updates
    acts = tc(x_BLD).acts_RBLF
    tc.train(was_training)
    block_norms = tc.decoder_block_norms()
    out = {}
    for penalty in ("l1", "tanh"):
        for norm in NORMS:
            terms = penalty_terms(acts, feature_norms(block_norms, norm), penalty, tanh_scale)
            out[f"{penalty}/{norm}"] = terms.mean(1)
    active = (acts > 0).flatten(2).sum(-1).float()  # [R, B]
    out["l0"] = active.mean(1)
    out["cross_layer"] = cross_layer_mass(tc, acts).mean(1)  # priced by κ (cross_layer_coef)
    out["max_l0"] = active.amax(1)
    return out


def cost_key(penalty: str, decoder_norm: str) -> str | None:
    """Which entry of ``sparsity_costs`` prices a run trained with this penalty: the penalty
    itself, or for topk the per-sample budget it needs (``max_l0``), for batchtopk the mean."""
    if penalty in ("l1", "tanh"):
        return f"{penalty}/{decoder_norm}"
    return {"l0": "l0", "topk": "max_l0", "batchtopk": "l0"}.get(penalty)
