"""Training loss: reconstruction + sparsity penalty (docs/concepts.md §3) + auxiliary terms.

Everything returns one value per run ([R]) so an ensemble of runs trains as one model: the
sum over runs has independent gradients for each run, and Adam is elementwise, so training
the ensemble is the same as training each run alone -- bit for bit, which takes care: every
reduction here runs over one run's own numbers in an order that does not depend on how many
runs share the tensor (``row_sum``), and no term switches on for a run because of another
run's settings or state.

Targets are ``[B,L,D]`` (one batch for every run) or ``[R,B,L,D]`` (each run its own batch).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import torch

from clt_eval import activations as act
from clt_eval import fused_penalty
from clt_eval.config import NORMED_PENALTIES, LossConfig
from clt_eval.transcoder import Transcoder, TranscoderOutput, row_sum


def row_mean(t_MX: torch.Tensor) -> torch.Tensor:
    return row_sum(t_MX) / t_MX[0].numel()


def with_run_axis(target: torch.Tensor) -> torch.Tensor:
    """A target batch as [R or 1, B, L, D]: shared batches gain a run axis that broadcasts."""
    return target if target.dim() == 4 else target[None]


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
    return summed_terms(weighted_acts(acts_RBLF, norms), penalty, tanh_scale)


def summed_terms(w: torch.Tensor, penalty: str, tanh_scale: float) -> torch.Tensor:
    """[R,B]: Σ of a sample's penalty terms, from its weighted activations ``w``."""
    if penalty == "l1":
        terms = w
    elif penalty == "tanh":
        terms = torch.tanh(tanh_scale * w)
    else:
        raise ValueError(f"penalty={penalty!r} is not norm-weighted")
    return per_sample_sum(terms)


def per_sample_sum(terms: torch.Tensor) -> torch.Tensor:
    """[R,B]: the sum of each sample's terms ([R,B,...]), in an order independent of R."""
    R, B = terms.shape[:2]
    return row_sum(terms.reshape(R * B, -1)).view(R, B)


def per_run(cfgs: LossConfig | list[LossConfig], R: int) -> list[LossConfig]:
    """One loss config per run: runs of one ensemble may use different penalties and norms."""
    return [cfgs] * R if isinstance(cfgs, LossConfig) else list(cfgs)


def family(penalty: str, decoder_norm: str) -> str:
    """How a penalty is computed: "rows" (l1 or tanh, each feature weighed by one decoder
    norm), "blocks" (l1 or tanh by each decoder block's norm), or the penalty's own name:
    "l0" (JumpReLU's count of features past θ), "topk" and "batchtopk" (a fixed budget, no
    penalty)."""
    if penalty in NORMED_PENALTIES:
        return "blocks" if decoder_norm == "per_block" else "rows"
    return penalty


@dataclass(frozen=True)
class LossPlan:
    """Per-run loss settings as tensors and run groups, built once per training rather than
    from R config objects at every step (that Python loop cost ~1 ms a step at R = 512)."""

    groups: dict  # (penalty, decoder norm, tanh c) -> [R] bool: is the run in the group?
    concat_R: torch.Tensor  # [R] bool: is the run's penalty weighed by concatenated norms?
    cross_R: torch.Tensor  # κ
    preact_R: torch.Tensor
    auxk_R: torch.Tensor
    normed: bool  # does any run need the decoder block norms?
    # Stretches of runs of one ``family``, in order: [(family, start, stop, keys)], keys
    # being the set of (penalty, norm, c) the stretch's runs use.
    segments: tuple = ()
    tanh_R: torch.Tensor | None = None  # [R] bool: tanh penalty?
    scale_R: torch.Tensor | None = None  # [R] tanh's c (1 for the other runs), float64
    # A ragged ensemble's stretches of runs of one width, [(width, start, stop, plan)], each
    # with the plan of its own runs: their penalties are computed cut to their width (unless
    # ``_padding_adds_nothing``).
    by_width: tuple = ()
    # [R] int: the decoder norm that weighs each run's l1 / tanh penalty
    # (``fused_penalty.KINDS``), 0 for runs without one
    kind_R: torch.Tensor | None = None
    l0_R: torch.Tensor | None = None  # [R] bool: JumpReLU L0 penalty?
    cross_kind_R: torch.Tensor | None = None  # [R] int: CROSS_LAYER where κ > 0, else 0

    @classmethod
    def build(cls, cfgs, R: int, widths: list[int] | None = None) -> LossPlan:
        """``widths``: each run's width, when runs of several widths share the ensemble."""
        if isinstance(cfgs, LossPlan):
            return cfgs
        cfgs = per_run(cfgs, R)
        by_width = ()
        if widths is not None and len(set(widths)) > 1:
            by_width = tuple((w, start, stop, cls.build(cfgs[start:stop], stop - start))
                             for w, start, stop in act.segments(list(widths)))
        runs: dict[tuple, list[int]] = defaultdict(list)
        for r, c in enumerate(cfgs):
            runs[(c.penalty, c.decoder_norm, c.tanh_scale)].append(r)
        cross = torch.tensor([c.cross_layer_coef for c in cfgs])
        masks = {k: torch.zeros(R, dtype=torch.bool).index_fill(0, torch.tensor(v), True)
                 for k, v in runs.items()}
        concat = torch.tensor([c.penalty in NORMED_PENALTIES and c.decoder_norm ==
                               "concatenated" for c in cfgs])
        keys = [(c.penalty, c.decoder_norm, c.tanh_scale) for c in cfgs]
        segs = tuple((fam, start, stop, frozenset(keys[start:stop])) for fam, start, stop in
                     act.segments([family(c.penalty, c.decoder_norm) for c in cfgs]))
        return cls(masks, concat, cross,
                   torch.tensor([c.preact_coef for c in cfgs]),
                   torch.tensor([c.auxk_coef if c.penalty in ("topk", "batchtopk") else 0.0
                                 for c in cfgs]),
                   any(k[0] in NORMED_PENALTIES for k in runs) or bool((cross > 0).any()),
                   segs, torch.tensor([c.penalty == "tanh" for c in cfgs]),
                   torch.tensor([c.tanh_scale if c.penalty == "tanh" else 1.0
                                 for c in cfgs], dtype=torch.float64), by_width,
                   kind_R=torch.tensor([fused_penalty.KINDS[c.decoder_norm]
                                        if c.penalty in NORMED_PENALTIES else 0
                                        for c in cfgs], dtype=torch.int64),
                   l0_R=torch.tensor([c.penalty == "l0" for c in cfgs], dtype=torch.bool),
                   cross_kind_R=(cross > 0).long() * fused_penalty.CROSS_LAYER)

    def to(self, device: torch.device) -> LossPlan:
        """The plan with its per-run tensors on ``device`` (it is built on the CPU)."""
        return dataclasses.replace(
            self, groups={k: v.to(device) for k, v in self.groups.items()},
            concat_R=self.concat_R.to(device), cross_R=self.cross_R.to(device),
            preact_R=self.preact_R.to(device), auxk_R=self.auxk_R.to(device),
            tanh_R=self.tanh_R.to(device), scale_R=self.scale_R.to(device),
            kind_R=self.kind_R.to(device), l0_R=self.l0_R.to(device),
            cross_kind_R=self.cross_kind_R.to(device),
            by_width=tuple((w, a, b, p.to(device)) for w, a, b, p in self.by_width))


def sparsity_penalty(tc: Transcoder, out: TranscoderOutput, cfgs,
                     block_norms_RSTF: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of each run's per-sample penalty, [R] (λ not applied).

    Small runs on the CPU get their l1 and tanh penalties, each run with its own norm and c,
    from one compiled pass (``fused_penalty``; ``_fused``). Otherwise runs are grouped by
    (penalty, norm, c), so l1 and tanh runs with any decoder norm train side by side in one
    ensemble. When the runs come in a few long stretches of one ``family`` each (the sweep
    orders them so), each stretch's penalty is computed on a view of its own rows, its runs'
    norms and penalties chosen run by run (``torch.where``). Otherwise each group's penalty
    is computed for every run and kept for the group's own runs (``torch.where``): the
    others' terms reach a run only as exact zeros, in value and gradient, and selecting
    costs fewer and cheaper ops than gathering each group's rows and scattering them back.
    Either way a run's value is the one it gets alone. ``cfgs`` is one ``LossConfig``, one
    per run, or a ``LossPlan``.
    """
    R = out.pre_RBLF.shape[0]
    plan = LossPlan.build(cfgs, R)
    if block_norms_RSTF is None and plan.normed:
        block_norms_RSTF = tc.decoder_block_norms()
    if (block_norms_RSTF is not None and bool((plan.kind_R > 0).any())
            and fused_penalty.fits(out.acts_RBLF, block_norms_RSTF)):
        return _fused(tc, out, plan, block_norms_RSTF)
    if len(plan.groups) > 1 and _by_segment(plan, R):
        return act.apply_by_segment(
            lambda key, acts, rows: _segment_penalty(tc, out, plan, key, acts, rows,
                                                     block_norms_RSTF),
            out.acts_RBLF, [((fam, keys), start, stop)
                            for fam, start, stop, keys in plan.segments])
    values = _group_penalties(tc, out, plan, block_norms_RSTF)
    if len(plan.groups) == 1:
        return next(iter(values.values()), out.pre_RBLF.new_zeros(R))
    result = out.pre_RBLF.new_zeros(R)  # TopK / BatchTopK: a fixed budget, no penalty
    for key, value in values.items():
        result = torch.where(plan.groups[key], value, result)
    return result


# Runs per stretch, on average, from which computing each stretch's penalty on its own rows
# beats computing every group's penalty for every run. Measured on the toy, 1 thread, 300
# steps, 8 penalty groups in up to 16 stretches: 540 runs 13.1-14.0 vs 15.6-15.8 s (by
# stretch vs for every run); 80 runs (about 5 a stretch) 4.1-4.4 vs 3.8 s.
MIN_STRETCH_RUNS = 8


def _fused(tc, out, plan: LossPlan, block_norms_RSTF) -> torch.Tensor:
    """[R]: ``sparsity_penalty`` with every l1 and tanh run's penalty from one compiled pass
    (``fused_penalty``) and the L0 runs' from ``_l0_penalty``, stretch by stretch when the
    runs lie in long stretches of one kind."""
    value = fused_penalty.normed_penalty(out.acts_RBLF, block_norms_RSTF, plan.kind_R,
                                         plan.tanh_R, plan.scale_R)
    if not bool(plan.l0_R.any()):
        return value
    R = value.shape[0]
    if _by_segment(plan, R):
        l0 = torch.cat([_l0_penalty(tc, out, slice(start, stop)) if fam == "l0" else
                        value.new_zeros(stop - start) for fam, start, stop, _ in plan.segments])
    else:
        l0 = _l0_penalty(tc, out)
    return torch.where(plan.l0_R, l0, value)


def _by_segment(plan: LossPlan, R: int) -> bool:
    """Compute the penalties stretch by stretch? When the runs lie in few, long stretches."""
    # At most two stretches per (penalty, norm, c) group: a family's stretch holds one or
    # more whole groups, so a layout with each group in one place per arch qualifies.
    segs = plan.segments
    return (bool(segs) and act.contiguous(segs, len(plan.groups))
            and R >= MIN_STRETCH_RUNS * len(segs))


def _segment_penalty(tc, out, plan: LossPlan, key: tuple, acts_RBLF, rows: slice,
                     block_norms_RSTF):
    """[R_seg]: the penalty of a stretch of runs of one ``family`` that use the (penalty,
    norm, c) ``keys``, from their own rows only: the same elementwise ops and row sums, row
    by row, as for a run alone."""
    fam, keys = key
    if fam == "l0":
        return _l0_penalty(tc, out, rows)
    if fam not in ("rows", "blocks"):  # TopK / BatchTopK: a fixed budget, no penalty
        return acts_RBLF.new_zeros(acts_RBLF.shape[0])
    blocks = block_norms_RSTF[rows]
    norms = blocks if fam == "blocks" else _run_norms(blocks, keys, plan.concat_R[rows])
    return row_mean(_run_terms(weighted_acts(acts_RBLF, norms), keys, plan.tanh_R[rows],
                               plan.scale_R[rows]))


def _run_norms(blocks_RSTF, keys: frozenset, concat_R) -> torch.Tensor:
    """[R,S,F]: each run's feature norm, concatenated or summed as the run asks."""
    kinds = {k[1] for k in keys}
    if len(kinds) == 1:
        return feature_norms(blocks_RSTF, next(iter(kinds)))
    return torch.where(concat_R[:, None, None], feature_norms(blocks_RSTF, "concatenated"),
                       feature_norms(blocks_RSTF, "summed"))


def _run_terms(w, keys: frozenset, tanh_R, scale_R) -> torch.Tensor:
    """[R,B]: each run's summed penalty terms, l1 or tanh with its own c, from its weighted
    activations ``w``: for a run, the same elementwise values as ``summed_terms``."""
    if len(keys) == 1 or {k[0] for k in keys} == {"l1"}:
        penalty, _, scale = next(iter(keys))
        return summed_terms(w, penalty, scale)
    shape = (-1,) + (1,) * (w.dim() - 1)
    # c in w's dtype, as a Python float c is when it multiplies w alone (``summed_terms``)
    tanh = torch.tanh(scale_R.to(w.dtype).view(shape) * w)
    if {k[0] for k in keys} != {"tanh"}:
        tanh = torch.where(tanh_R.view(shape), tanh, w)
    return per_sample_sum(tanh)


def _group_penalties(tc, out, plan: LossPlan, block_norms_RSTF) -> dict:
    """{group: [R] penalty of every run as if it were in the group}, for the groups with a
    penalty. Concatenated and summed norms share one weighting ([R,B,S,F], each run with its
    own norm), per-block norms have theirs ([R,B,S,T,F]); groups that differ only in those
    norms share one value."""
    keys = [k for k in plan.groups if k[0] in NORMED_PENALTIES or k[0] == "l0"]
    row_norms = list(dict.fromkeys(k[1] for k in keys
                                   if k[0] in NORMED_PENALTIES and k[1] != "per_block"))
    weighted = {}
    if row_norms:
        norms = {n: feature_norms(block_norms_RSTF, n) for n in row_norms}
        if len(norms) == 1:
            n_RSF = norms[row_norms[0]]
        else:  # each run its own norm: concatenated where it asks for it, else summed
            n_RSF = torch.where(plan.concat_R[:, None, None], norms["concatenated"],
                                norms["summed"])
        weighted["rows"] = weighted_acts(out.acts_RBLF, n_RSF)
    if any(k[0] in NORMED_PENALTIES and k[1] == "per_block" for k in keys):
        weighted["blocks"] = weighted_acts(out.acts_RBLF, block_norms_RSTF)
    shared: dict = {}
    values = {}
    for penalty, norm, scale in keys:
        part = ("l0",) if penalty == "l0" else \
            (penalty, "blocks" if norm == "per_block" else "rows", scale)
        if part not in shared:
            shared[part] = (_l0_penalty(tc, out) if penalty == "l0" else
                            row_mean(summed_terms(weighted[part[1]], penalty, scale)))
        values[(penalty, norm, scale)] = shared[part]
    return values


def _l0_penalty(tc, out, rows: slice = slice(None)) -> torch.Tensor:
    """[R]: the JumpReLU L0 penalty of every run (or of ``rows``), the mean count of
    features past θ."""
    pre = out.pre_RBLF[rows]
    steps = act.step_l0(pre, tc.threshold()[rows][:, None], tc.cfg.jumprelu_bandwidth)
    return row_sum(steps) / pre.shape[1]


def cross_layer_mass(tc: Transcoder, acts_RBLF: torch.Tensor,
                     block_norms_RSTF: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i a_i Σ_{t>s} ‖W_dec,i^{s→t}‖ per sample, [R,B]: what the cross-layer decoder
    blocks write, in l1 units. 0 for a PLT, which has no such blocks."""
    norms_RSTF = tc.decoder_block_norms() if block_norms_RSTF is None else block_norms_RSTF
    S = norms_RSTF.shape[1]
    off = torch.ones(S, S, dtype=torch.bool, device=norms_RSTF.device).triu(1)
    cross_RSF = (norms_RSTF * off[None, :, :, None]).sum(2)
    return per_sample_sum(acts_RBLF * cross_RSF[:, None])


def auxk_loss(tc: Transcoder, out: TranscoderOutput, target_BLD, dead_RLF,
              runs: torch.Tensor | None = None) -> torch.Tensor:
    """AuxK (Gao et al. 2024): dead features try to explain the residual error, [R].

    Uses the top 2k dead pre-activations so gradients reach features TopK never selects.
    Computed for the runs in ``runs`` ([R] bool, default all) that have a dead feature; the
    others get 0, whatever their neighbours' state (and in a mixed ensemble the ReLU and
    JumpReLU runs cost nothing here)."""
    R = out.pre_RBLF.shape[0]
    wanted_R = dead_RLF.flatten(1).any(1)
    if runs is not None:
        wanted_R = wanted_R & runs
    if not bool(wanted_R.any()):
        return out.pre_RBLF.new_zeros(R)
    idx = wanted_R.nonzero().flatten()
    target = with_run_axis(target_BLD)  # [1,B,L,D] shared, or [R,B,L,D] (own minibatches)
    err = ((target if target.shape[0] == 1 else target[idx]) - out.recon_RBLD[idx]).detach()
    masked = out.pre_RBLF[idx].masked_fill(~dead_RLF[idx][:, None], float("-inf"))
    aux = act.topk(masked.nan_to_num(neginf=-1e30), 2 * tc.k_R[idx],
                   tc.cfg.topk_mode == "joint")
    aux_recon = tc.write(aux, runs=idx.tolist())
    mse = row_sum((aux_recon - err).pow(2))
    value = mse / row_sum(err.pow(2)).clamp_min(1e-12)
    return value.new_zeros(R).index_put((idx,), value)


def _penalties(tc, out, plan: LossPlan, coef_R, block_norms) -> list:
    """[[R] sparsity penalty, [R] pre-activation term or None, [R] cross-layer term or
    None]: what the loss adds to the reconstruction, in the order it adds them."""
    B = out.pre_RBLF.shape[1]
    terms = [sparsity_penalty(tc, out, plan, block_norms), None, None]
    if bool((plan.preact_R > 0).any()):
        terms[1] = plan.preact_R * row_sum((-out.pre_RBLF).relu()) / B
    if bool((plan.cross_R > 0).any()):
        terms[2] = coef_R * plan.cross_R * _mean_cross_layer_mass(tc, out, plan, block_norms)
    return terms


def _mean_cross_layer_mass(tc, out, plan: LossPlan, block_norms) -> torch.Tensor:
    """[R]: ``cross_layer_mass`` averaged over the batch, for the runs with κ > 0 (0 for the
    others, whose term κ·mass is 0 either way); an l1 penalty whose norm is the cross-layer
    blocks' summed norms, so small runs take the same compiled pass."""
    if fused_penalty.fits(out.acts_RBLF, block_norms):
        R = out.acts_RBLF.shape[0]
        return fused_penalty.normed_penalty(
            out.acts_RBLF, block_norms, plan.cross_kind_R,
            torch.zeros(R, dtype=torch.bool), torch.ones(R, dtype=torch.float64))
    return row_mean(cross_layer_mass(tc, out.acts_RBLF, block_norms))


def _by_width(tc, out, plan: LossPlan, coef_R, block_norms) -> list:
    """``_penalties`` of a ragged ensemble, stretch by stretch of one width, on copies cut to
    that width: the same ops on the same shapes as each run alone (a sum over the padded
    features, or over the batch of a tensor with them, would round differently). A term
    some stretches lack is an exact 0 for their runs, which adds nothing."""
    parts = []
    for width, start, stop, sub in plan.by_width:
        rows = slice(start, stop)
        part = TranscoderOutput(_cut(out.pre_RBLF, rows, width), _cut(out.acts_RBLF, rows, width),
                                out.recon_RBLD[rows])
        parts.append(_penalties(tc, part, sub, coef_R[rows], _cut(block_norms, rows, width)))
    return [None if all(p[i] is None for p in parts) else
            torch.cat([torch.zeros_like(p[0]) if p[i] is None else p[i] for p in parts])
            for i in range(3)]


def _padding_adds_nothing(out, plan: LossPlan, block_norms) -> bool:
    """May a ragged ensemble's penalties be computed on its whole padded tensors? When every
    term is summed in ``fused_penalty``'s in-order loops, to which a padded feature (an
    activation and decoder norm of exact zeros) adds exact zeros: l1 or tanh penalties and
    the cross-layer mass, no pre-activation term."""
    return (block_norms is not None and bool((plan.kind_R > 0).all())
            and not bool((plan.preact_R > 0).any())
            and fused_penalty.fits(out.acts_RBLF, block_norms))


def _cut(t: torch.Tensor | None, rows: slice, width: int) -> torch.Tensor | None:
    return None if t is None else t[rows, ..., :width].contiguous()


@dataclass
class LossParts:
    total_R: torch.Tensor
    mse_R: torch.Tensor
    sparsity_R: torch.Tensor


def training_loss(tc, out, target_BLD, cfgs, coef_R, dead_RLF=None) -> LossParts:
    """Reconstruction (summed over layers and dims, mean over samples) + λ·penalty + extras.

    ``cfgs`` is one ``LossConfig`` for all runs, one per run, or a prebuilt ``LossPlan``;
    ``coef_R`` is each run's current λ (after warm-up).
    """
    B, R = target_BLD.shape[-3], out.pre_RBLF.shape[0]
    plan = LossPlan.build(cfgs, R, [c.n_features for c in tc.cfgs] if tc.ragged else None)
    mse = row_sum((out.recon_RBLD - with_run_axis(target_BLD)).pow(2)) / B
    block_norms = tc.decoder_block_norms() if plan.normed else None  # once per step
    ragged = plan.by_width and not _padding_adds_nothing(out, plan, block_norms)
    terms = (_by_width if ragged else _penalties)(tc, out, plan, coef_R, block_norms)
    sparsity = terms[0]
    total = mse + coef_R * sparsity
    for term in terms[1:]:  # pre-activation, cross-layer
        if term is not None:
            total = total + term
    if bool((plan.auxk_R > 0).any()) and dead_RLF is not None:
        # Only for the runs that have AuxK (other activations in a mixed ensemble add an
        # exact 0: their loss and gradients stay what they are alone).
        total = total + plan.auxk_R * auxk_loss(tc, out, target_BLD, dead_RLF,
                                                plan.auxk_R > 0)
    return LossParts(total, mse.detach(), sparsity.detach())
