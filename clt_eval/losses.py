"""Training loss: reconstruction + sparsity penalty (GUIDE §3) + auxiliary terms.

Everything returns one value per run ([R]) so an ensemble of runs trains as one model: the
sum over runs has independent gradients for each run, and Adam is elementwise, so training
the ensemble is the same as training each run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clt_eval import activations as act
from clt_eval.config import LossConfig
from clt_eval.transcoder import Transcoder, TranscoderOutput


def feature_norms(block_norms_RSTF: torch.Tensor, decoder_norm: str) -> torch.Tensor:
    """Decoder norm of each feature, [R,S,F]; for ``per_block`` the blocks stay, [R,S,T,F].

    concatenated = ‖concat_t W_dec^{s→t}‖ = sqrt(Σ_t ‖W^{s→t}‖²) (Anthropic 2025);
    summed = Σ_t ‖W^{s→t}‖. For a PLT (one block per feature) all three coincide.
    """
    if decoder_norm == "concatenated":
        return block_norms_RSTF.pow(2).sum(2).clamp_min(1e-24).sqrt()
    if decoder_norm == "summed":
        return block_norms_RSTF.sum(2)
    if decoder_norm == "per_block":
        return block_norms_RSTF
    raise ValueError(f"decoder_norm={decoder_norm!r} has no feature norm")


def weighted_acts(acts_RBLF: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """a_i · ‖W_dec,i‖ per sample: [R,B,S,F], or [R,B,S,T,F] for per-block norms."""
    if norms.dim() == 4:  # per_block: one term per (feature, target layer)
        return acts_RBLF[:, :, :, None, :] * norms[:, None]
    return acts_RBLF * norms[:, None]


def penalty_terms(acts_RBLF, norms, penalty: str, tanh_scale: float) -> torch.Tensor:
    """Per-sample sparsity cost of each run, [R,B], for the norm-weighted penalties."""
    w = weighted_acts(acts_RBLF, norms)
    if penalty == "l1":
        terms = w
    elif penalty == "tanh":
        terms = torch.tanh(tanh_scale * w)
    else:
        raise ValueError(f"penalty={penalty!r} is not norm-weighted")
    return terms.flatten(2).sum(-1)


def sparsity_penalty(tc: Transcoder, out: TranscoderOutput, cfg: LossConfig) -> torch.Tensor:
    """Mean over the batch of the per-sample penalty, [R] (λ not applied)."""
    R = out.acts_RBLF.shape[0]
    if cfg.penalty in ("l1", "tanh"):
        norms = feature_norms(tc.decoder_block_norms(), cfg.decoder_norm)
        return penalty_terms(out.acts_RBLF, norms, cfg.penalty, cfg.tanh_scale).mean(1)
    if cfg.penalty == "l0":
        steps = act.step_l0(out.pre_RBLF, tc.threshold()[:, None], tc.cfg.jumprelu_bandwidth)
        return steps.flatten(1).sum(-1) / out.pre_RBLF.shape[1]
    return out.acts_RBLF.new_zeros(R)  # topk / batchtopk: a fixed budget, no penalty


def auxk_loss(tc: Transcoder, out: TranscoderOutput, target_BLD, dead_RLF) -> torch.Tensor:
    """AuxK (Gao et al. 2024): dead features try to explain the residual error, [R].

    Uses the top 2k dead pre-activations so gradients reach features TopK never selects.
    """
    R = out.pre_RBLF.shape[0]
    if not bool(dead_RLF.any()):
        return out.pre_RBLF.new_zeros(R)
    err = (target_BLD[None] - out.recon_RBLD).detach()
    masked = out.pre_RBLF.masked_fill(~dead_RLF[:, None], float("-inf"))
    aux = act.topk(masked.nan_to_num(neginf=-1e30), 2 * tc.k_R, tc.cfg.topk_mode == "joint")
    aux_recon = torch.einsum("rbsf,rstfd->rbtd", aux, tc.masked_W_dec())
    mse = (aux_recon - err).pow(2).flatten(1).sum(-1)
    return mse / err.pow(2).flatten(1).sum(-1).clamp_min(1e-12)


@dataclass
class LossParts:
    total_R: torch.Tensor
    mse_R: torch.Tensor
    sparsity_R: torch.Tensor


def training_loss(tc, out, target_BLD, cfg: LossConfig, coef_R, dead_RLF=None) -> LossParts:
    """Reconstruction (summed over layers and dims, mean over samples) + λ·penalty + extras.

    ``coef_R`` is each run's current λ (after warm-up).
    """
    B = target_BLD.shape[0]
    mse = (out.recon_RBLD - target_BLD[None]).pow(2).flatten(1).sum(-1) / B
    sparsity = sparsity_penalty(tc, out, cfg)
    total = mse + coef_R * sparsity
    if cfg.preact_coef > 0:
        total = total + cfg.preact_coef * (-out.pre_RBLF).relu().flatten(1).sum(-1) / B
    if cfg.penalty in ("topk", "batchtopk") and cfg.auxk_coef > 0 and dead_RLF is not None:
        total = total + cfg.auxk_coef * auxk_loss(tc, out, target_BLD, dead_RLF)
    return LossParts(total, mse.detach(), sparsity.detach())
