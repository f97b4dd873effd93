"""`clt-eval train` and `clt-eval evaluate`: a grid of runs to folders, and back."""

from __future__ import annotations

from pathlib import Path

from clt_eval.atomic import write_json_atomic
from clt_eval.case_study import load_case_study
from clt_eval.errors import CltEvalError
from training.config import RunSpec, TrainConfig
from training.experiment import case_data, check_unique, group_specs, train_log_save
from training.wandb_logger import WandbLogger


def train_grid(case_name: str, specs: list[RunSpec], train_cfg: TrainConfig, out: Path,
               wandb_mode: str) -> Path:
    from tqdm.auto import tqdm

    import case_studies  # noqa: F401
    check_unique(specs)
    case = load_case_study(case_name)  # fails before anything is written
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
    """Evaluate every transcoder under ``run_dir``; writes metrics.json beside each."""
    import case_studies  # noqa: F401
    from clt_eval.evaluate import evaluate
    from clt_eval.io import load_extra, load_transcoder

    if not run_dir.exists():
        raise CltEvalError(f"{run_dir}: no such folder")
    dirs = transcoder_dirs(run_dir)
    loaded = [(d, load_transcoder(d), load_extra(d)) for d in dirs]  # validate all first
    results, models = {}, {}
    for d, tc, extra in loaded:
        name = extra.get("case_study")
        if name is None:
            raise CltEvalError(f"{d}/config.json: field 'extra.case_study' missing; expected the "
                               "name of the case study the transcoder was trained on")
        case = load_case_study(name)
        model = models.setdefault(name, case.model())
        metrics = evaluate(case, tc, model)[0]
        write_json_atomic(d / "metrics.json", metrics)
        results[d.name] = metrics
    return results
