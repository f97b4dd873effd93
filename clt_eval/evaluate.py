"""Evaluate every run of a transcoder ensemble against a case study's ground truth."""

from __future__ import annotations

import math

import torch

from clt_eval import metrics as M
from clt_eval.case_study import middle_layers, output_layer, step_at, steps
from clt_eval.circuit_graph import circuit_scores
from clt_eval.errors import require
from clt_eval.interventions import intervention_cases, projector
from clt_eval.replacement import collect_mlp_io, run_replacement

# Thresholds for "recovered" (docs/concepts.md §5) and for "skips" (the output is mostly written
# through cross-layer decoders).
CORR_MIN, COS_MIN, SKIP_THRESHOLD = 0.9, 0.9, 0.5
OFF_DISTRIBUTION_SAMPLES = 512


DISCRETE_LEVELS = 16  # an output with at most this many distinct values is a finite table


def output_tolerance(true_out: torch.Tensor, case=None) -> float:
    """Within this distance a predicted output counts as right: the case study's own
    ``output_tolerance`` if it sets one; for an output with few levels, half the smallest gap
    between two levels (the nearest level is then the right one); for a continuous output,
    a tenth of its standard deviation."""
    explicit = getattr(case, "output_tolerance", None)
    if explicit is not None:
        return float(explicit)
    levels = true_out.unique()
    if levels.numel() == 1:
        return 0.5
    if levels.numel() <= DISCRETE_LEVELS:
        return float(levels.diff().min() / 2)
    return float(0.1 * true_out.std())


def check_fits_case(cfg, case, source: str = "transcoder") -> None:
    """One line, before any tensor work, when a transcoder was built for another shape than
    the case study's (a wrong extra.case_study, or a config edited by hand)."""
    for name in ("n_layers", "d_model"):
        mine, theirs = getattr(cfg, name), getattr(case, name)
        require(mine == theirs, f"{source}: {name}={mine} but case study "
                f"{getattr(case, 'name', '?')!r} has {name}={theirs}; expected a transcoder "
                "trained on that case study")


@torch.no_grad()
def evaluate(case, tc, model=None, graph: bool = True) -> list[dict]:
    """One metrics dict per run of ``tc`` (an ensemble), in run order.

    Per-layer metrics are lists over model layers (``None`` where a layer has no ground-truth
    step, or for the skip fraction of layer 0, which has no earlier layer to skip from); the
    scalars kept from the two-step contract summarise them: ``skip_fraction`` is the output
    step's value, ``middle_feature_recovery`` the mean over the middle steps.

    A run's metrics are bitwise what it gets evaluated alone, whatever ensemble it is in
    (metrics.per_run, ``_behaviour_per_run`` unless the model is batch-invariant), unless
    ``tc.exact`` is False.
    """
    check_fits_case(tc.cfg, case)
    # A padded ensemble's metrics would count each run's padding as features of its own.
    require(not getattr(tc, "ragged", False),
            f"evaluate: the transcoder holds runs of several widths "
            f"({sorted({c.n_features for c in tc.cfgs})} features); expected one width: "
            "evaluate each width apart (tc.select(runs))")
    tc.eval()
    model = model if model is not None else case.model()
    inputs = case.inputs()
    gt_layers = steps(case)
    x, y, cache = collect_mlp_io(model, inputs, case.input_hooks, case.output_hooks,
                                 [g.hook for g in gt_layers])
    out = tc(x)
    per_run = _reconstruction(out, y) | _recovery(tc, out, gt_layers, cache)
    per_run |= _per_layer_recovery(case, per_run["recovery_per_layer"], gt_layers)
    per_run |= _skip(case, tc, out, gt_layers)
    mass, share = M.decoder_mass(tc.decoder_block_norms(), out.acts_RBLF)
    per_run["decoder_mass_per_layer"], per_run["cross_layer_share"] = mass, share
    per_run["output_reads_inputs"] = _reads_inputs(case, tc, out, x)
    # A model whose rows never see each other (``batch_invariant``, as the hand-built toys
    # declare) takes every run's samples in one pass and still gives each run its own numbers.
    batched = not tc.exact or getattr(model, "batch_invariant", False)
    behaviour = _behaviour if batched else _behaviour_per_run
    per_run |= behaviour(case, model, tc, inputs, cache["output"])
    if graph:
        per_run |= circuit_scores(case, tc, x, out.acts_RBLF, per_run["matches"])
    return [{k: _item(v, r) for k, v in per_run.items()} for r in range(tc.n_runs)]


def _item(v, r):
    """Run r's value of a per-run metric, as plain JSON-ready Python."""
    if isinstance(v, dict):
        return {k: _item(x, r) for k, x in v.items()}
    x = v[r]
    return _json_safe(x.tolist() if isinstance(x, torch.Tensor) else x)


def _json_safe(x):
    """NaN becomes None (JSON has no NaN; None reads as "undefined"), also inside lists."""
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _reconstruction(out, y) -> dict:
    nmse = M.nmse_per_layer(out.recon_RBLD, y)
    l0 = M.l0_per_layer(out.acts_RBLF)
    return {"nmse": M.per_run(torch.nanmean, nmse), "nmse_per_layer": nmse, "l0_per_layer": l0,
            "l0_total": M.per_run(torch.sum, l0),
            "dead_fraction_per_layer": M.dead_fraction(out.acts_RBLF)}


def _recovery(tc, out, gt_layers, cache) -> dict:
    """Per layer: fraction of ground-truth features recovered; the middle layer singled out."""
    R = tc.n_runs
    per_layer = torch.zeros(R, len(gt_layers))
    matches = [[None] * len(gt_layers) for _ in range(R)]
    for j, g in enumerate(gt_layers):
        W_own = tc.decoder_block(g.layer, g.layer)  # [R, F, D]: own-layer decoders only
        for r in range(R):
            m = M.match_features(out.acts_RBLF[r, :, g.layer], cache[g.hook], W_own[r],
                                 g.directions_GD, CORR_MIN, COS_MIN)
            per_layer[r, j] = M.recovery_fraction(m)
            matches[r][j] = {"layer": g.layer, "names": list(g.names)} | m
    return {"recovery_per_layer": per_layer, "matches": matches}


def _per_layer_recovery(case, rec_RJ: torch.Tensor, gt_layers) -> dict:
    """Recovery per model layer ([R, L]: every step's features, the output step's included;
    NaN off the steps) and its mean over the middle steps."""
    R, L = rec_RJ.shape[0], case.n_layers
    per_layer = torch.full((R, L), float("nan"))
    for j, g in enumerate(gt_layers):
        per_layer[:, g.layer] = rec_RJ[:, j]
    middle = per_layer[:, middle_layers(case)]
    return {"middle_feature_recovery_per_layer": per_layer,
            "middle_feature_recovery": M.per_run(torch.mean, middle)}


def _skip(case, tc, out, gt_layers) -> dict:
    """Skip fraction at every step layer t ≥ 1 ([R, L], NaN elsewhere); the output's value
    is the headline ``skip_fraction``."""
    R, L = tc.n_runs, case.n_layers
    contrib = tc.contributions(out.acts_RBLF)  # [R, B, S, T, D]
    per_layer = torch.full((R, L), float("nan"))
    for g in gt_layers:
        if g.layer >= 1:
            per_layer[:, g.layer] = M.skip_fraction(contrib[:, :, :, g.layer],
                                                    g.directions_GD, g.layer)
    frac = per_layer[:, output_layer(case)]
    return {"skip_fraction": frac, "skips": (frac > SKIP_THRESHOLD).float(),
            "skip_fraction_per_layer": per_layer}


def _reads_inputs(case, tc, out, x) -> list[float]:
    """Per run: share of the output layer's feature inputs that comes from the inputs A rather
    than from the step just before the output."""
    b_dirs = step_at(case, middle_layers(case)[-1]).directions_GD
    P_a, P_b = projector(case.input_directions()), projector(b_dirs)
    layer = output_layer(case)
    return [M.read_share(x[:, layer], tc.W_enc[r, layer], out.acts_RBLF[r, :, layer], P_a, P_b)
            for r in range(tc.n_runs)]


def _behaviour_per_run(case, model, tc, inputs, true_final) -> dict:
    """``_behaviour`` one run at a time. The replacement model pushes every run's samples
    through the true model as one batch, and a model's matmuls may round a row differently
    depending on how many rows they get; one run at a time, a run's numbers are its own.
    It costs one replacement pass per run instead of one per ensemble (measured on the
    Boolean toy, 40 runs: ~10x the batched time, ~0.2 s per run); a transcoder with
    ``exact = False`` takes the batched pass, as its own forward does."""
    parts = []
    for r in range(tc.n_runs):
        one = tc.select([r]).train(tc.training)  # select builds a module in training mode
        parts.append(_behaviour(case, model, one, inputs, true_final))
    return _cat_runs(parts)


def _cat_runs(parts: list):
    """Per-run results of one-run calls (tensors [1, ...], dicts of them) joined along runs."""
    if isinstance(parts[0], dict):
        return {k: _cat_runs([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _behaviour(case, model, tc, inputs, true_final) -> dict:
    """Replacement-model accuracy, interventions, and agreement off the training inputs."""
    hooks = (case.input_hooks, case.output_hooks)
    true_out = case.output_value(true_final)
    tol = output_tolerance(true_out, case)
    repl, _, _ = run_replacement(model, tc, inputs, *hooks)
    res = {"output_accuracy": M.output_accuracy(case.output_value(repl), true_out, tol)}
    cases = intervention_cases(case, model, tc, inputs)
    agree = {k: M.intervention_agreement(*v, tol) for k, v in cases.items()}
    cat = [torch.cat([v[i] for v in cases.values()], dim=-1) for i in range(3)]
    res["intervention_agreement"] = M.intervention_agreement(*cat, tol)
    res["intervention_agreement_by_kind"] = agree
    off = case.off_distribution_inputs(n=OFF_DISTRIBUTION_SAMPLES, seed=0)
    off_true = case.output_value(model(off))
    off_repl, _, _ = run_replacement(model, tc, off, *hooks)
    agreement = M.output_agreement(case.output_value(off_repl), off_true)
    res["offdist_mae"], res["offdist_corr"] = agreement["mae"], agreement["corr"]
    return res

