"""Language-model reconstruction metrics (docs/concepts.md §5) as pure functions of tensors.

"KL and CE loss with *all* MLPs replaced at once": the spliced model's next-token
distribution against the clean model's, and its cross-entropy loss between the clean model
(0 % lost) and the model with the replaced MLPs zero-ablated (100 % lost), as in Dunefsky et
al. (2024), "Transcoders find interpretable LLM feature circuits", and Ameisen et al. (2025).

Shapes: R runs, B prompts, P positions, V vocabulary, N tokens, L layers, D d_model.
"""

from __future__ import annotations

import torch


def kl_per_token(clean_logits_BPV: torch.Tensor, other_logits_RBPV: torch.Tensor):
    """KL(clean ‖ other) of the next-token distributions at every position, [R, B, P] (nats)."""
    logp = clean_logits_BPV.double().log_softmax(-1)[None]
    logq = other_logits_RBPV.double().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).to(clean_logits_BPV.dtype)


def next_token_ce(logits_RBPV: torch.Tensor, tokens_BP: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token p+1 from position p, [R] (nats)."""
    logp = logits_RBPV[:, :, :-1].double().log_softmax(-1)
    target = tokens_BP[None, :, 1:, None].expand(logp.shape[0], -1, -1, 1)
    return -logp.gather(-1, target)[..., 0].mean((1, 2)).to(logits_RBPV.dtype)


def ce_loss_recovered(ce_clean: torch.Tensor, ce_spliced: torch.Tensor,
                      ce_zero: torch.Tensor) -> torch.Tensor:
    """(CE_zero − CE_spliced) / (CE_zero − CE_clean): 1 when splicing costs nothing, 0 when it
    is as bad as deleting the MLPs. NaN when zero-ablating costs nothing either."""
    gap = ce_zero - ce_clean
    frac = (ce_zero - ce_spliced) / gap
    return torch.where(gap.abs() > 1e-9, frac, torch.full_like(frac, float("nan")))


def relative_error_norm(y_RNLD: torch.Tensor, recon_RNLD: torch.Tensor) -> torch.Tensor:
    """Per-layer relative error ‖y − ŷ‖ / ‖y‖ over all tokens (Frobenius norms), [R, L]."""
    err = (y_RNLD - recon_RNLD).pow(2).sum((1, 3))
    return (err / y_RNLD.pow(2).sum((1, 3)).clamp_min(1e-24)).sqrt()
