"""Feature tracking across λ for the sweep report: loads each seed's saved transcoders in
λ order and follows the middle-layer ground-truth features with ``clt_eval.tracking``."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch

from clt_eval.case_study import middle_layers, step_at
from clt_eval.evaluate import CORR_MIN, COS_MIN
from clt_eval.replacement import collect_mlp_io
from clt_eval.tracking import track
from clt_eval.training.analysis import knob
from clt_eval.training.sweep_analysis import label


@torch.no_grad()
def tracking_rows(runner, grid: list[dict], width: int) -> list[dict]:
    """Per (setting, arch, middle-layer feature): median λ and L0 at which it stops being
    recovered (over the seeds where it does stop) and how it was lost. Empty when the
    transcoders were not saved."""
    from clt_eval.io import load_transcoder

    case = runner.case
    folder = runner.out / "transcoders"
    if not folder.is_dir():
        return []
    mids = [step_at(case, m) for m in middle_layers(case)]
    x, _, cache = collect_mlp_io(runner.model, case.inputs(), case.input_hooks,
                                 case.output_hooks, [gt.hook for gt in mids])
    series: dict = defaultdict(list)
    for r in grid:
        if r["spec"]["n_features"] == width and r["penalty"] not in ("topk", "batchtopk"):
            series[(label(r["spec"]), r["arch"], r["seed"])].append(r)
    per_feature: dict = defaultdict(list)
    for (name, arch, _), recs in sorted(series.items(), key=lambda kv: repr(kv[0])):
        recs = sorted(recs, key=knob)
        paths = [folder / r.get("trained_as", r["run_id"]) for r in recs]
        if len(recs) < 2 or not all(p.is_dir() for p in paths):
            continue
        tcs = [load_transcoder(p) for p in paths]
        outs = [tc(x).acts_RBLF[0] for tc in tcs]
        for gt in mids:
            m = gt.layer
            acts = [a[:, m] for a in outs]
            decs = [tc.decoder_block(m, m)[0] for tc in tcs]
            for g, t in enumerate(track(acts, decs, cache[gt.hook], gt.directions_GD,
                                        CORR_MIN, COS_MIN)):
                stop = t["stop"]
                per_feature[(name, arch, gt.names[g])].append(
                    (t["fate"], None if stop is None else knob(recs[stop]),
                     None if stop is None else recs[stop]["metrics"]["l0_total"]))
    return [_row(key, found) for key, found in sorted(per_feature.items())]


def _row(key, found) -> dict:
    stops = [s for _, s, _ in found if s is not None]
    l0s = [v for _, s, v in found if s is not None]
    return {"setting": key[0], "arch": key[1], "feature": key[2],
            "stop_median": float(np.median(stops)) if stops else None,
            "l0_median": float(np.median(l0s)) if l0s else None,
            "fates": dict(Counter(f for f, _, _ in found)), "n_seeds": len(found)}
