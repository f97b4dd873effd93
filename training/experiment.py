"""Train a list of runs on a case study as vectorised ensembles, then evaluate each run.

A sweep is data: a list of ``RunSpec``s. Runs that share an ensemble key (shapes and
activation) train together as one ``Transcoder``; arch, penalty, decoder norm, λ, k and seed
vary inside an ensemble.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from clt_eval.case_study import case_study_spec
from clt_eval.costs import cost_key, sparsity_costs
from clt_eval.device import resolve_device
from clt_eval.errors import CltEvalError
from clt_eval.evaluate import evaluate
from clt_eval.losses import family
from clt_eval.replacement import collect_mlp_io
from clt_eval.training import distributed, workers
from clt_eval.training.config import RunSpec, TrainConfig
from clt_eval.training.trainer import full_batches, init_b_dec, train
from clt_eval.transcoder import Transcoder

_NAMED = ("arch", "penalty", "decoder_norm", "activation", "sparsity_coef", "k", "n_features",
          "seed", "cross_layer_coef")


@functools.lru_cache(maxsize=1 << 16)  # a sweep asks ~16,000 times for its ~2,000 runs' ids
def run_id(spec: RunSpec) -> str:
    """A readable, unique folder name: the main fields, plus a short hash of any other field
    that differs from its default."""
    knob = f"k{spec.k}" if spec.k is not None else f"lam{spec.sparsity_coef:g}"
    rid = (f"{spec.arch}-{spec.penalty}-{spec.decoder_norm}-{spec.resolved_activation}-{knob}"
           f"-w{spec.n_features}-s{spec.seed}")
    if spec.cross_layer_coef:
        rid += f"-xl{spec.cross_layer_coef:g}"
    default = RunSpec().to_dict()
    extra = {k: v for k, v in spec.to_dict().items() if k not in _NAMED and v != default[k]}
    if extra:
        rid += "-" + hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:6]
    return rid


def canonical(spec: RunSpec) -> RunSpec:
    """The run that trains identically to ``spec``: a PLT has one decoder block per feature,
    so every decoder-norm choice prices it the same, and κ (which prices cross-layer blocks)
    has nothing to price. Sweeps train the canonical run once and report it under each name."""
    if spec.arch != "plt":
        return spec
    norm = "none" if spec.decoder_norm == "none" else "concatenated"
    return replace(spec, decoder_norm=norm, cross_layer_coef=0.0)


def check_unique(specs: list[RunSpec]) -> None:
    """Two identical runs would write the same folder: refuse before training anything."""
    ids = [run_id(s) for s in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise CltEvalError(f"runs: {len(dup)} duplicated run(s), e.g. {dup[0]}; expected each "
                           "combination of settings once")


def record(spec: RunSpec, metrics: dict) -> dict:
    return {"run_id": run_id(spec), "arch": spec.arch, "penalty": spec.penalty,
            "decoder_norm": spec.decoder_norm, "sparsity_coef": spec.sparsity_coef,
            "k": spec.k, "seed": spec.seed, "n_features": spec.n_features,
            "spec": spec.to_dict(), "metrics": metrics}


# Ensembles of fewer runs than this that differ only in width train as one, padded to the
# widest (``Transcoder.ragged``), where the caller allows it (``group_specs``'s ``pad``). A
# chosen bound, not a measured crossover: small ensembles pay mostly a step's fixed cost,
# which padding shares, while large ones would pay the padding's work on many runs. Measured
# on the default sweep's width block (widths 2-32, 30 runs each, 1 thread, 300 steps side by
# side): 35.8-46.7 ms a step for the seven ensembles apart against 24.6-27.4 ms for one
# padded to 32.
PAD_BELOW = 64


def group_specs(specs: list[RunSpec], mix_activations: bool = False,
                pad: Callable[[int], bool] | None = None) -> list[list[RunSpec]]:
    """The specs as ensembles that can train together (``RunSpec.ensemble_key``), in order,
    each ordered by ``layout_key``. ``pad(width)``: may ReLU runs be padded to ``width``
    features with every number kept (``padding_is_exact``)? Then small ensembles that differ
    only in width are merged into one (``PAD_BELOW``)."""
    groups: dict[tuple, list[RunSpec]] = defaultdict(list)
    for s in specs:
        groups[s.ensemble_key(mix_activations)].append(s)
    merged: dict[tuple, list[RunSpec]] = defaultdict(list)
    for key, g in groups.items():
        width = g[0].n_features
        if (pad is not None and len(g) < PAD_BELOW and pad(width)
                and all(s.resolved_activation == "relu" for s in g)):
            key = ("padded", tuple(kv for kv in key if kv[0] != "n_features"))
        merged[key] += g
    return [sorted(g, key=layout_key) for g in merged.values()]


def layout_key(spec: RunSpec) -> tuple:
    """Where a run sits in its ensemble: by width (a padded ensemble's penalties are
    computed width by width, ``losses._by_width``), then PLTs then CLTs, by activation, k
    and penalty inside each, penalties that weigh each feature by one norm (l1 and tanh
    with concatenated or summed norms, ``losses.family``) side by side. A run's numbers do
    not depend on its place, but the step's cost does: runs that decode, activate, select
    and are penalised alike then lie side by side, and each kind is computed on a view of
    its rows instead of a gathered copy (measured: docs/concepts.md §8.6)."""
    return (spec.n_features, spec.arch != "plt", spec.resolved_activation, spec.k or 0,
            family(spec.penalty, spec.decoder_norm), spec.penalty, spec.decoder_norm,
            spec.tanh_scale)


@dataclass
class EnsembleResult:
    specs: list[RunSpec]
    transcoder: Transcoder
    records: list[dict]


def train_group(case, model, specs, train_cfg: TrainConfig, data, logger=None, progress=None,
                checkpoint=None):
    """Train one ensemble of compatible runs and evaluate every member.

    Each run's result is the one it would get trained alone (tests/test_run_independence.py):
    minibatches are shuffled with each run's own seed. A run that diverged is not evaluated:
    its metrics hold ``diverged`` ({"step", "reason"}) and None for every other value.

    Under ``training.workers.use_workers(n)``, a large CPU ensemble is cut into up to ``n``
    parts trained side by side in processes of their own; the result is the same, bit for
    bit (tests/test_workers.py)."""
    device = resolve_device(train_cfg.device, "device")
    ranges = workers.parts(len(specs)) if workers.can_fork(device, train_cfg.dtype) else []
    if len(ranges) > 1:
        return _train_parts(case, model, specs, train_cfg, data, logger, progress, checkpoint,
                            ranges)
    return _train_whole(case, model, specs, train_cfg, data, logger, progress, checkpoint)


def _train_whole(case, model, specs, train_cfg, data, logger, progress, checkpoint):
    x, y = data
    cfgs = [s.transcoder_config(case.d_model, case.n_layers) for s in specs]
    tc = Transcoder(cfgs, seeds=[s.seed for s in specs])
    init_b_dec(tc, y)
    coefs = torch.tensor([s.sparsity_coef for s in specs])
    device = resolve_device(train_cfg.device, "device")
    # The data set moves to the training device once, not a batch at a time. Every rank of a
    # data-parallel job draws the same global batches and trains on its own rows of each.
    batches = distributed.local_batches(full_batches(x.to(device), y.to(device),
                                                     train_cfg.batch_size,
                                                     seed=[s.seed for s in specs]))
    final = train(tc, [s.loss_config() for s in specs], coefs, batches, train_cfg, logger,
                  progress, checkpoint, run_names=[run_id(s) for s in specs])
    final["loss"] = distributed.mean_over_ranks(final["loss"])  # each rank's is its rows'
    metrics = _evaluate_finite(case, model, tc, specs, x, final)
    return EnsembleResult(specs, tc, [record(s, m) for s, m in zip(specs, metrics, strict=True)])


def _train_parts(case, model, specs, train_cfg, data, logger, progress, checkpoint, ranges):
    """``train_group`` with the runs of each range trained by a process of its own; the
    progress bar follows the first part, and the values each part logged are logged
    together, step by step, once all have finished."""
    stop = workers.stop_event() if checkpoint is not None else None

    def part(i: int, runs: range):
        def fn():
            logged: list = []
            ckpt = checkpoint.part(i, len(ranges), stop) if checkpoint is not None else None
            res = _train_whole(case, model, [specs[j] for j in runs], train_cfg, data,
                               (lambda step, values: logged.append((step, values)))
                               if logger is not None else None,
                               progress if i == 0 else None, ckpt)
            # a part's result travels as JSON and named tensors (training/workers.py)
            tensors = {f"state.{k}": v for k, v in res.transcoder.state_dict().items()}
            tensors |= {f"log.{step}.{k}": v for step, values in logged
                        for k, v in values.items()}
            return {"records": res.records, "steps": [step for step, _ in logged]}, tensors
        return fn

    done = workers.run_parts([part(i, r) for i, r in enumerate(ranges)], stop)
    tcs = []
    for r, (_, tensors) in zip(ranges, done, strict=True):
        tc = Transcoder([specs[j].transcoder_config(case.d_model, case.n_layers) for j in r],
                        init=False)
        tc.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("state.")})
        tcs.append(tc)
    tc = Transcoder.stack(tcs)
    tc.eval()  # as ``train`` leaves a transcoder
    if logger is not None:
        _log_together(logger, [_logged(meta["steps"], tensors) for meta, tensors in done])
    return EnsembleResult(specs, tc, [rec for meta, _ in done for rec in meta["records"]])


def _logged(steps: list[int], tensors: dict) -> list[tuple[int, dict]]:
    """A part's logged values, [(step, {metric: [R_part] tensor})], from its result."""
    return [(step, {k.split(".", 2)[2]: v for k, v in tensors.items()
                    if k.startswith(f"log.{step}.")}) for step in steps]


def _log_together(logger, logs: list[list]) -> None:
    """Each step's values from every part, concatenated in run order, for the steps every
    part logged (a part resumed from an older checkpoint logs from its own restart on)."""
    by_step = [dict(log) for log in logs]
    for step in sorted(set.intersection(*(set(d) for d in by_step))):
        rows = [d[step] for d in by_step]
        logger(step, {k: torch.cat([r[k] for r in rows]) for k in rows[0]})


def _evaluate_finite(case, model, tc, specs, x, final) -> list[dict]:
    """Metrics of the runs that trained to the end; None-valued ones for diverged runs."""
    diverged = final["diverged"]
    ok = [i for i, d in enumerate(diverged) if d is None]
    metrics: list[dict] = [{} for _ in specs]
    # One width at a time: a padded ensemble's runs are evaluated cut back to their widths.
    for width in dict.fromkeys(specs[i].n_features for i in ok):
        rows = [i for i in ok if specs[i].n_features == width]
        sub = tc if len(rows) == len(specs) else tc.select(rows)
        costs = sparsity_costs(sub, x)  # each run priced as the analytic decompositions are
        for j, (i, m) in enumerate(zip(rows, evaluate(case, sub, model), strict=True)):
            s = specs[i]
            m["final_loss"] = float(final["loss"][i])
            m["sparsity_cost"] = float(costs[cost_key(s.penalty, s.decoder_norm)][j]
                                       + s.cross_layer_coef * costs["cross_layer"][j])
            metrics[i] = m
    keys = list(metrics[ok[0]]) if ok else ["final_loss", "sparsity_cost"]
    return [m | {"diverged": None} if d is None else dict.fromkeys(keys) | {"diverged": d}
            for m, d in zip(metrics, diverged, strict=True)]


def case_data(case, model):
    """(x_BLD, y_BLD): MLP inputs and outputs of the case study's data set."""
    x, y, _ = collect_mlp_io(model, case.inputs(), case.input_hooks, case.output_hooks)
    return x, y


def train_log_save(case, model, group, train_cfg, data, logger, bar, out, save=True,
                   checkpoint=None):
    """Train one ensemble as one wandb run (config, per-run losses, metrics table), then save
    each member transcoder under ``out/transcoders/<run_id>``; returns the run records."""
    from clt_eval.io import save_transcoder
    from clt_eval.training.checkpoint import is_main

    ids = [run_id(s) for s in group]
    logger.start(f"{group[0].resolved_activation}-{ids[0]}",
                 {"case_study": case_study_spec(case), "train": train_cfg.__dict__,
                  "runs": {i: s.to_dict() for i, s in zip(ids, group, strict=True)}})
    try:
        res = train_group(case, model, group, train_cfg, data, logger.ensemble_logger(ids), bar,
                          checkpoint)
    except BaseException:
        logger.finish()  # close the wandb run cleanly; the checkpoint holds the state
        raise
    logger.table("runs", [flat_record(r) for r in res.records])
    logger.finish()
    if save and is_main():  # data-parallel replicas hold the same weights: rank 0 saves
        for i, (spec, rid) in enumerate(zip(group, ids, strict=True)):
            if res.records[i]["metrics"]["diverged"] is not None:
                continue  # a diverged run's weights are no result: nothing is saved for it
            save_transcoder(res.transcoder.select([i]), out / "transcoders" / rid,
                            extra={"case_study": case_study_spec(case), "run": spec.to_dict()})
    return res.records


def flat_record(rec: dict) -> dict:
    """A run record as one flat row (per-feature matches left out) for tables."""
    m = {k: v for k, v in rec["metrics"].items() if k != "matches"}
    return {k: rec[k] for k in ("run_id", "arch", "penalty", "decoder_norm", "sparsity_coef",
                                "k", "seed")} | m
