"""Faithfulness and reconstruction metrics (docs/concepts.md §5) as pure functions of tensors.

Shapes: R runs, B samples, L layers, F transcoder features, G ground-truth features,
D d_model. Every number in a report comes from one of these.

Run independence: a metric over an ensemble gives each run exactly the number it gets alone.
Batched products and sums over several runs at once do not: BLAS picks kernels by batch size
and PyTorch splits reductions by shape, so one run's rounding would depend on how many runs
it shares a tensor with. Every reduction below therefore runs once per run (``per_run``), on
that run's slice alone, the same call whatever the ensemble.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def per_run(fn, *run_tensors, shared=()):
    """``fn`` applied to each run's slice of ``run_tensors`` (plus the ``shared`` arguments),
    stacked back along a leading run axis: the same call a run alone makes."""
    R = run_tensors[0].shape[0]
    return torch.stack([fn(*(t[r] for t in run_tensors), *shared) for r in range(R)])


def nmse_per_layer(recon_RBLD: torch.Tensor, target_BLD: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained per layer, [R, L]: Σ‖ŷ−y‖² / Σ‖y−ȳ‖².

    NaN for a layer whose output does not vary over the data (a constant MLP output has no
    variance to explain; dividing by a clamped tiny variance would report rounding noise as
    errors of 1e10)."""
    err = per_run(lambda r_BLD: (r_BLD - target_BLD).pow(2).sum((0, 2)), recon_RBLD)
    var = (target_BLD - target_BLD.mean(0)).pow(2).sum((0, 2))
    scale = target_BLD.pow(2).sum((0, 2))
    constant = var <= 1e-10 * scale.clamp_min(1e-12)
    return torch.where(constant, torch.full_like(err, float("nan")), err / var.clamp_min(1e-12))


def l0_per_layer(acts_RBLF: torch.Tensor) -> torch.Tensor:
    """Mean number of active features per sample at each layer, [R, L]."""
    return per_run(lambda a_BLF: (a_BLF > 0).float().sum(-1).mean(0), acts_RBLF)


def dead_fraction(acts_RBLF: torch.Tensor) -> torch.Tensor:
    """Fraction of features that never fire on the data, per layer, [R, L]."""
    return per_run(lambda a_BLF: (~(a_BLF > 0).any(0)).float().mean(-1), acts_RBLF)


def correlation_matrix(a_NF: torch.Tensor, b_NG: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every column of ``a`` with every column of ``b``, [F, G].

    A constant column (a dead feature) correlates 0 with everything.
    """
    a = a_NF - a_NF.mean(0)
    b = b_NG - b_NG.mean(0)
    denom = a.norm(dim=0)[:, None] * b.norm(dim=0)[None, :]
    return torch.where(denom > 1e-12, a.T @ b / denom.clamp_min(1e-12), torch.zeros_like(denom))


def cosine_matrix(u_FD: torch.Tensor, v_GD: torch.Tensor) -> torch.Tensor:
    u = u_FD / u_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    v = v_GD / v_GD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return u @ v.T


def match_features(acts_NF, gt_acts_NG, dec_FD, gt_dirs_GD, corr_min=0.9, cos_min=0.9):
    """One-to-one (Hungarian) matching of transcoder to ground-truth features.

    Matches maximise total activation correlation; a ground-truth feature counts as recovered
    when its partner's correlation and decoder cosine both reach their thresholds. Returns a
    dict of per-ground-truth-feature lists: ``index`` (matched feature or -1), ``corr``,
    ``cos``, ``recovered``.
    """
    corr = correlation_matrix(acts_NF.float(), gt_acts_NG.float())
    cos = cosine_matrix(dec_FD.float(), gt_dirs_GD.float())
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    G = gt_acts_NG.shape[1]
    index, c, s = [-1] * G, [0.0] * G, [0.0] * G
    for f, g in zip(rows.tolist(), cols.tolist(), strict=True):
        index[g], c[g], s[g] = f, float(corr[f, g]), float(cos[f, g])
    recovered = [ci >= corr_min and si >= cos_min for ci, si in zip(c, s, strict=True)]
    return {"index": index, "corr": c, "cos": s, "recovered": recovered}


def recovery_fraction(match: dict) -> float:
    return float(np.mean(match["recovered"])) if match["recovered"] else float("nan")


def span_basis(dirs_GD: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis [D, K] of the span of the rows (K = their rank: features in
    superposition can outnumber the dimensions they share)."""
    dirs = dirs_GD.reshape(-1, dirs_GD.shape[-1]).float()
    U, S, _ = torch.linalg.svd(dirs.T, full_matrices=False)
    return U[:, S > rtol * S.max().clamp_min(1e-30)]


def skip_fraction(contrib_RBSD: torch.Tensor, dirs_GD: torch.Tensor, target_layer: int):
    """Share of a step's output written by earlier layers' features through cross-layer
    decoders.

    ``contrib_RBSD`` is what each source layer s writes to ``target_layer`` (b_dec excluded);
    ``dirs_GD`` the step's ground-truth output directions (one row, or several). Each source's
    mass is Σ_b ‖P c_s‖, the norm of its write projected on the span of those directions (for
    one direction u: Σ_b |⟨c_s, u⟩|); the skip fraction is the share of sources s <
    target_layer. 0 = faithful, 1 = fully skipped; NaN when nothing is written. Returns [R].
    """
    Q = span_basis(dirs_GD).to(contrib_RBSD.dtype)
    return per_run(_skip_fraction_one, contrib_RBSD, shared=(Q, target_layer))


def _skip_fraction_one(contrib_BSD: torch.Tensor, Q_DK: torch.Tensor, target_layer: int):
    mass_S = (contrib_BSD @ Q_DK).norm(dim=-1).sum(0)
    early = mass_S[:target_layer].sum()
    total = mass_S[: target_layer + 1].sum()
    return early / total.clamp_min(1e-9) if total > 1e-9 else torch.full_like(total, np.nan)


def output_accuracy(pred_RN: torch.Tensor, true_N: torch.Tensor, tol: float) -> torch.Tensor:
    """Fraction of samples whose output is within ``tol`` of the truth, [R]."""
    return per_run(lambda p_N: ((p_N - true_N).abs() < tol).float().mean(), pred_RN)


def intervention_agreement(true_clean_N, true_int_N, repl_int_RN, tol: float):
    """Agreement with the true model where the intervention really changes the output.

    Over the cases where the true model's output moves by more than ``tol``, the fraction
    where the replacement's intervened output lands within ``tol`` of the true model's. A
    model that skips the intermediate step predicts "no change" there and scores 0. [R];
    NaN if no intervention changes the true output.
    """
    moved = (true_int_N - true_clean_N).abs() > tol
    if not bool(moved.any()):
        return torch.full(repl_int_RN.shape[:1], float("nan"))
    want = true_int_N[moved]
    return per_run(lambda p_N: ((p_N[moved] - want).abs() < tol).float().mean(), repl_int_RN)


def output_agreement(pred_RN: torch.Tensor, true_N: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean absolute error and correlation of replacement vs true outputs, each [R]."""
    mae = per_run(lambda p_N: (p_N - true_N).abs().mean(), pred_RN)
    corr = per_run(lambda p_N: correlation_matrix(p_N[:, None], true_N[:, None])[0, 0], pred_RN)
    return {"mae": mae, "corr": corr}


def read_share(x_ND, W_enc_DF, acts_NF, P_a_DD, P_b_DD) -> float:
    """How much features read subspace A rather than B, by direct attribution.

    Each active feature's pre-activation gets |w·P_A x| from A and |w·P_B x| from B (the
    input×weight edges an attribution graph draws); weighted by activation, the share from A.
    For the output-layer features of a two-step circuit, 0 means C is computed from B (the
    true circuit), 1 means C is read straight from the inputs A. NaN if nothing is active.
    """
    from_a = ((x_ND @ P_a_DD) @ W_enc_DF).abs()
    from_b = ((x_ND @ P_b_DD) @ W_enc_DF).abs()
    a = (acts_NF * from_a).sum()
    total = a + (acts_NF * from_b).sum()
    return float(a / total) if float(total) > 1e-12 else float("nan")


def decoder_mass(block_norms_RSTF: torch.Tensor, acts_RBLF: torch.Tensor):
    """Where the decoders write, weighted by use: ([R, S] mass per source layer, [R] share
    in cross-layer blocks).

    A feature's mass in block s→t is its mean activation times ‖W_dec^{s→t}‖, so features
    that never fire weigh nothing whatever their decoder norm. The cross-layer share is the
    mass in blocks t > s over all mass: 0 for a PLT, and the part of a CLT's output that
    bypasses the layers in between. NaN share when nothing fires.
    """
    mass_RST = per_run(_block_mass, acts_RBLF, block_norms_RSTF)
    S = mass_RST.shape[1]
    off = torch.ones(S, S, dtype=torch.bool, device=mass_RST.device).triu(1)
    total = per_run(torch.sum, mass_RST)
    cross = per_run(lambda m_ST: (m_ST * off).sum(), mass_RST)
    share = torch.where(total > 1e-12, cross / total.clamp_min(1e-12),
                        torch.full_like(total, float("nan")))
    return per_run(lambda m_ST: m_ST.sum(-1), mass_RST), share


def _block_mass(acts_BLF: torch.Tensor, norms_STF: torch.Tensor) -> torch.Tensor:
    """[S, T]: Σ_f mean activation × block norm, as an elementwise product and a sum (an
    einsum would pick its kernel by shape)."""
    return (acts_BLF.mean(0)[:, None, :] * norms_STF).sum(-1)
