"""`clt-eval train` and `clt-eval evaluate`: a grid of runs to folders, and back."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from clt_eval.training.config import RunSpec, TrainConfig
from clt_eval.training.experiment import case_data, check_unique, group_specs, train_log_save
from clt_eval.training.wandb_logger import WandbLogger

from clt_eval.atomic import write_json_atomic
from clt_eval.case_study import load_case_study
from clt_eval.errors import CltEvalError
from clt_eval.transcoder import Transcoder, shared_fields


def train_grid(case_name: str, specs: list[RunSpec], train_cfg: TrainConfig, out: Path,
               wandb_mode: str) -> Path:
    from tqdm.auto import tqdm

    check_unique(specs)
    case = load_case_study(case_name, validate=True)  # fails before anything is written
    model = case.model()
    data = case_data(case, model)
    logger = WandbLogger(wandb_mode, group=f"train-{out.name}", root=out)
    records = []
    with tqdm(total=len(group_specs(specs)) * train_cfg.steps, desc="training", unit="step") as bar:
        for group in group_specs(specs):
            records += train_log_save(case, model, group, train_cfg, data, logger, bar, out)
    return write_json_atomic(out / "results.json", {"runs": records})


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
    from clt_eval.io import load_extra, load_transcoder

    if not run_dir.exists():
        raise CltEvalError(f"{run_dir}: no such folder")
    groups: dict[tuple, list] = defaultdict(list)
    for d in transcoder_dirs(run_dir):
        tc, name = load_transcoder(d), load_extra(d).get("case_study")
        if name is None:
            raise CltEvalError(f"{d}/config.json: field 'extra.case_study' missing; expected the "
                               "name of the case study the transcoder was trained on")
        groups[(name, json.dumps(shared_fields(tc.cfg), sort_keys=True))].append((d, tc))
    # Unknown names and broken plugins fail here, before anything is written.
    cases = {name: load_case_study(name, validate=True) for name, _ in groups}
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
