"""`clt-eval train` and `clt-eval evaluate`: a grid of runs to folders, and back.

`train` runs on the sweep's engine (``training.sweep.Runner`` and ``RunStore``), so it resumes
exactly as a sweep does: one mechanism for every training job."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from clt_eval.atomic import write_json_atomic
from clt_eval.case_study import load_case_study
from clt_eval.errors import CltEvalError
from clt_eval.training.config import RunSpec, TrainConfig
from clt_eval.training.experiment import check_unique
from clt_eval.training.wandb_logger import WandbLogger
from clt_eval.transcoder import Transcoder, shared_fields


def train_grid(case_name: str, specs: list[RunSpec], train_cfg: TrainConfig, out: Path,
               wandb_mode: str) -> Path:
    """Train ``specs`` into ``out``: ``results.json`` (the arguments under ``args``, one
    record per run under ``runs``) and ``transcoders/<run_id>/``.

    Resumable, by the sweep's engine: ``results.json`` is rewritten after every ensemble, an
    interrupted ensemble continues from its checkpoint under ``checkpoints/``, and a rerun of
    the same command skips recorded runs; a rerun with other arguments is refused."""
    from clt_eval.training.checkpoint import is_main
    from clt_eval.training.sweep import Runner, RunStore, TrainJob

    check_unique(specs)
    load_case_study(case_name, validate=True)  # fails before anything is written
    store = RunStore(out / "results.json", "args", train_args(case_name, specs, train_cfg),
                     ("case_study", "train", "specs"), "command")
    logger = WandbLogger(wandb_mode, group=f"train-{out.name}", root=out)
    runner = Runner(TrainJob(case_name, train_cfg), out, store, logger, progress=is_main(),
                    twins=False)
    runner.run(specs, "training")
    store.write()  # also when every run was recorded already: the file is whole
    return store.path


def train_args(case_name: str, specs: list[RunSpec], train_cfg: TrainConfig) -> dict:
    """The arguments a `clt-eval train` folder is made with, as results.json records them."""
    return {"case_study": case_name, "train": asdict(train_cfg),
            "specs": [s.to_dict() for s in specs]}


def transcoder_dirs(run_dir: Path) -> list[Path]:
    if (run_dir / "config.json").exists():
        return [run_dir]
    found = sorted(p.parent for p in (run_dir / "transcoders").glob("*/config.json"))
    if not found:
        raise CltEvalError(f"{run_dir}: no config.json here or in {run_dir}/transcoders/*/; "
                           "expected a transcoder folder or a run folder")
    return found


def evaluate_dir(run_dir: Path) -> dict[str, dict]:
    """Evaluate every transcoder under ``run_dir``; writes metrics.json beside each.

    Everything is loaded and checked before anything is written, and transcoders of one case
    study with compatible shapes are stacked into one ensemble, evaluated in one pass.
    """
    from clt_eval.evaluate import check_fits_case
    from clt_eval.io import load_extra, load_transcoder

    if not run_dir.exists():
        raise CltEvalError(f"{run_dir}: no such folder")
    groups: dict[tuple, list] = defaultdict(list)
    for d in transcoder_dirs(run_dir):
        tc, name = load_transcoder(d), load_extra(d).get("case_study")
        if not isinstance(name, str):
            raise CltEvalError(f"{d}/config.json: field 'extra.case_study' is {name!r}; expected "
                               "the name of the case study the transcoder was trained on")
        # One width an ensemble: evaluation reads every stored feature.
        shape = shared_fields(tc.cfg) | {"n_features": tc.cfg.n_features}
        groups[(name, json.dumps(shape, sort_keys=True))].append((d, tc))
    # Unknown names, broken plugins and shapes that do not fit their case study fail here,
    # before anything is written.
    cases = {name: load_case_study(name, validate=True) for name, _ in groups}
    for (name, _), members in groups.items():
        for d, tc in members:
            check_fits_case(tc.cfg, cases[name], f"{d}/config.json")
    results = {}
    for (name, _), members in groups.items():
        results |= _evaluate_group(cases[name], members)
    return results


def _evaluate_group(case, members) -> dict[str, dict]:
    from clt_eval.evaluate import evaluate

    metrics = evaluate(case, Transcoder.stack([tc for _, tc in members]))
    for (d, _), m in zip(members, metrics, strict=True):
        write_json_atomic(d / "metrics.json", m)
    return {d.name: m for (d, _), m in zip(members, metrics, strict=True)}
