"""Is a patched direction real, or an MLP-in-the-middle illusion?

Makelov, Lange & Nanda (ICLR 2024) show that a 1-d subspace patch can reproduce a
counterfactual without the model ever using that subspace: the direction v combines a part in
the kernel of the component's output weights (it varies with the feature but never reaches
the residual stream) with a part in their row space that is constant on real inputs
(dormant). The patch moves the kernel part's variation onto the dormant part. Their checks,
which ``illusion_check`` runs:

1. patch the whole component: if it does nothing, the direction opened a pathway the
   component never uses;
2. split v = v_row + v_ker against the reader's weights and patch each part alone (the
   paper's IOI MLP8 direction: 46.7% FLDD, its row part alone 13.5%, its kernel part 0%);
3. check that v's projection varies on real inputs *through its row-space part*.

Reader weights act on the patched space from the right, as TransformerLens stores them: an
MLP's hidden activations h [H] reach the residual stream as h @ W_out [H, D]; a residual
direction [D] is read as x @ W_read [D, H]. Either way the part that can matter downstream
is the column space of that matrix (the row space of the paper's W_out [D, H]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from clt_eval.errors import require
from clt_eval.patching import as_basis, cache_hook, fraction_of_change, run_patched

# The direction "works" when its patch achieves at least half of the counterfactual change:
# the paper's headline illusory direction (IOI MLP8, 46.7% FLDD) sits right at this level.
WORKS = 0.5
# The whole component counts as unused below 5% of the change (IOI MLP8 whole: −8%).
WHOLE_NULL = 0.05
# The row-space part alone "achieves much less" below half of what v achieves (IOI MLP8:
# 13.5 / 46.7 = 0.29). A faithful direction's row part does at least as well as v itself.
ROW_SHARE = 0.5
# The row-space projection counts as near-constant when its spread on real inputs (std of
# ⟨h, v_row/‖v_row‖⟩) is under a tenth of v's own (std of ⟨h, v̂⟩); v̂ = v_row + v_ker then
# gets over 90% of its spread from the kernel part. Exactly 0 for the toy's dormant units.
CONSTANT = 0.1
# Parts shorter than this are treated as absent (not patched; their effect counts as 0).
MIN_PART_NORM = 1e-6


@dataclass(frozen=True)
class Verdict:
    illusion: bool
    reason: str  # one sentence
    figures: dict[str, float]


def split_direction(v_S: torch.Tensor, W_ST: torch.Tensor,
                    rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_row, v_ker) with v = v_row + v_ker: v_row in the column space of ``W_ST`` (what
    the reader sees, s @ W), v_ker in the kernel {s : s @ W = 0}. Singular values below
    ``rtol`` × the largest count as zero (default max(S, T) × machine epsilon, as
    ``torch.linalg.matrix_rank``)."""
    require(isinstance(W_ST, torch.Tensor) and W_ST.dim() == 2, "W: expected a 2-d weight "
            "matrix [S, T] acting as s @ W")
    require(isinstance(v_S, torch.Tensor) and v_S.shape == W_ST.shape[:1],
            f"v: shape {tuple(getattr(v_S, 'shape', ()))}; expected [{W_ST.shape[0]}], the "
            "space the weight matrix reads from")
    W = W_ST.to(v_S.dtype)
    U, sv, _ = torch.linalg.svd(W, full_matrices=False)
    if rtol is None:
        rtol = max(W.shape) * torch.finfo(W.dtype).eps
    top = float(sv.max()) if sv.numel() else 0.0
    basis_SR = U[:, sv > rtol * top]  # W = 0 keeps nothing: all of v is in the kernel
    v_row = basis_SR @ (basis_SR.T @ v_S)
    return v_row, v_S - v_row


def _fraction(model, base, source, src_acts, hook, V, pos, value_fn, out_base, cf) -> float:
    out = run_patched(model, base, source, hook, V, pos, source_acts=src_acts)
    return fraction_of_change(value_fn(out), out_base, cf)


def illusion_check(model, hook_name: str, v: torch.Tensor, base_inputs, source_inputs,
                   counterfactual_N: torch.Tensor, value_fn: Callable, *,
                   W_out: torch.Tensor | None = None, W_read: torch.Tensor | None = None,
                   pos: int | None = None, rtol: float | None = None) -> Verdict:
    """Judge direction ``v`` at ``hook_name`` by re-patching it, its parts and the whole
    component from ``source_inputs`` into ``base_inputs``.

    ``counterfactual_N``: the output value each pair should reach (``value_fn(model_out)``
    gives the output value). Give ``W_out`` [H, D] for a direction among an MLP's hidden
    (post-nonlinearity) units, or ``W_read`` [D, H] for a residual-stream direction and the
    downstream reader's input weights. ``pos``: the token position patched, for [N, T, D]."""
    require((W_out is None) != (W_read is None), "W_out, W_read: expected exactly one (W_out "
            "[H, D] for an MLP's hidden units, W_read [D, H] for a residual direction)")
    W, wname = (W_out, "W_out") if W_out is not None else (W_read, "W_read")
    src = cache_hook(model, source_inputs, hook_name)
    acts = cache_hook(model, base_inputs, hook_name)
    S = src.shape[-1]
    require(isinstance(W, torch.Tensor) and W.dim() == 2 and W.shape[0] == S,
            f"{wname}: shape {tuple(getattr(W, 'shape', ()))}; expected [{S}, ...], rows "
            f"indexed like the {S} coordinates of {hook_name!r}")
    v_hat = as_basis(v, S, "v").to(src.device, src.dtype)[:, 0]
    v_row, v_ker = split_direction(v_hat, W.to(src.device), rtol)
    with torch.no_grad():
        out_base = value_fn(model(base_inputs))
    cf = counterfactual_N.to(out_base.device, out_base.dtype)
    require(cf.shape == out_base.shape, f"counterfactual_N: shape {tuple(cf.shape)}; expected "
            f"{tuple(out_base.shape)}, one output value per pair")
    run = (model, base_inputs, source_inputs, src, hook_name)
    figs = {"norm_row": float(v_row.norm()), "norm_kernel": float(v_ker.norm())}
    figs["fraction_v"] = _fraction(*run, v_hat, pos, value_fn, out_base, cf)
    figs["fraction_whole"] = _fraction(*run, None, pos, value_fn, out_base, cf)
    for part, vec in (("row", v_row), ("kernel", v_ker)):
        norm = float(vec.norm())
        figs[f"fraction_{part}"] = (_fraction(*run, vec / norm, pos, value_fn, out_base, cf)
                                    if norm > MIN_PART_NORM else 0.0)
    figs |= _spread(acts if pos is None else acts[:, pos], v_hat, v_row, v_ker)
    return _judge(figs, wname)


def _spread(acts_NS, v_hat, v_row, v_ker) -> dict[str, float]:
    """Spread on real inputs of the projections on v̂ and on its unit row and kernel parts."""
    acts = acts_NS.reshape(-1, acts_NS.shape[-1]).double()

    def std(u: torch.Tensor) -> float:
        norm = float(u.norm())
        if norm <= MIN_PART_NORM or acts.shape[0] < 2:
            return 0.0
        return float((acts @ (u.double() / norm)).std())

    figs = {"std_v": std(v_hat), "std_row": std(v_row), "std_kernel": std(v_ker)}
    figs["row_variation_ratio"] = (figs["std_row"] / figs["std_v"] if figs["std_v"] > 0
                                   else float("nan"))
    return figs


def _judge(f: dict[str, float], wname: str) -> Verdict:
    """The rule: a direction that works is an illusion when any check exposes it."""
    if not f["fraction_v"] >= WORKS:
        return Verdict(False, f"not an illusion to explain: patching along v achieves only "
                       f"{f['fraction_v']:.2f} of the counterfactual change (< {WORKS}).", f)
    found = []
    if f["fraction_whole"] < WHOLE_NULL:
        found.append(f"patching the whole component achieves {f['fraction_whole']:.2f}")
    if f["fraction_row"] < ROW_SHARE * f["fraction_v"]:
        found.append(f"its {wname} row-space part alone achieves {f['fraction_row']:.2f}")
    if f["row_variation_ratio"] < CONSTANT:
        found.append(f"its row-space projection is near-constant on real inputs (spread "
                     f"{f['row_variation_ratio']:.2f} of v's)")
    head = f"patching along v achieves {f['fraction_v']:.2f} of the counterfactual change"
    if found:
        return Verdict(True, f"{head}, but {'; '.join(found)}: the effect comes from a dormant "
                       "pathway, not from what the model computes.", f)
    return Verdict(False, f"{head} through the {wname} row space: the whole component achieves "
                   f"{f['fraction_whole']:.2f}, the row-space part alone "
                   f"{f['fraction_row']:.2f}, and its row-space projection varies on real "
                   f"inputs ({f['row_variation_ratio']:.2f} of v's spread).", f)
