"""`clt-eval reproduce`: PLT vs CLT on the Boolean two-step toy, at matched L0, over seeds.

Trains every (penalty × decoder norm) setting on a small grid of sparsity settings for both
architectures and ≥ 10 seeds, evaluates each run's faithfulness, prices the hand-built exact
decompositions under every penalty, and writes results.json, analytic_costs.json, the
transcoders, report.md and plots under ``out``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from clt_eval.atomic import write_json_atomic
from clt_eval.case_study import load_case_study
from training.config import ReproduceConfig, RunSpec, TrainConfig
from training.experiment import case_data, flat_record, group_specs, train_log_save
from training.wandb_logger import WandbLogger

# Sparsity settings per (penalty, decoder norm): λ for penalties, k (joint TopK budget per
# sample, summed over layers) for topk/batchtopk. Chosen to bracket the faithful L0 of 1.25.
DEFAULT_GRID: dict[tuple[str, str], list[float]] = {
    ("l1", "concatenated"): [0.03, 0.1, 0.3],
    ("l1", "summed"): [0.03, 0.1, 0.3],
    ("l1", "per_block"): [0.03, 0.1, 0.3],
    ("tanh", "concatenated"): [0.03, 0.1, 0.3],
    ("tanh", "summed"): [0.03, 0.1, 0.3],
    ("tanh", "per_block"): [0.03, 0.1, 0.3],
    ("l0", "none"): [0.01, 0.03, 0.1],
    ("topk", "none"): [1, 2, 3],
    ("batchtopk", "none"): [1, 2],
}
QUICK_GRID = {("tanh", "concatenated"): [0.1], ("topk", "none"): [2]}


def build_specs(cfg: ReproduceConfig) -> list[RunSpec]:
    grid = QUICK_GRID if cfg.quick else DEFAULT_GRID
    specs = []
    for (penalty, norm), knobs in grid.items():
        for arch in ("plt", "clt"):
            for kn in knobs:
                budget = penalty in ("topk", "batchtopk")
                specs += [RunSpec(arch=arch, penalty=penalty, decoder_norm=norm,
                                  sparsity_coef=0.0 if budget else float(kn),
                                  k=int(kn) if budget else None, seed=seed,
                                  n_features=cfg.n_features)
                          for seed in range(cfg.seeds)]
    return specs


def reproduce(cfg: ReproduceConfig, progress: bool = True) -> dict:
    """Run the whole job; returns {"results": [...], "analytic": {...}, "report": path}."""
    from tqdm.auto import tqdm

    import case_studies  # noqa: F401  (registers the built-in case studies)
    from training.report import analytic_costs, write_report

    cfg = cfg.effective()
    torch.set_num_threads(2)  # the target machine; more threads only add overhead here
    case = load_case_study(cfg.case_study)
    out = Path(cfg.out)
    model = case.model()
    data = case_data(case, model)
    specs = build_specs(cfg)
    train_cfg = TrainConfig(steps=cfg.steps)
    logger = WandbLogger(cfg.wandb_mode, group=f"reproduce-{time.strftime('%Y%m%d-%H%M%S')}",
                         root=out)
    records, started = [], time.time()
    groups = group_specs(specs)
    with tqdm(total=len(groups) * train_cfg.steps, desc=f"training {len(specs)} runs",
              unit="step", disable=not progress) as bar:
        for group in groups:
            records += train_log_save(case, model, group, train_cfg, data, logger, bar, out,
                                      save=cfg.save_transcoders)
    analytic = analytic_costs(case, data[0])
    write_json_atomic(out / "results.json", {"config": cfg.__dict__, "runs": records,
                                              "train_seconds": time.time() - started})
    write_json_atomic(out / "analytic_costs.json", analytic)
    report, plots = write_report(out, records, analytic, cfg)
    _log_summary(logger, records, plots, cfg)
    return {"results": records, "analytic": analytic, "report": report}


def _log_summary(logger, records, plots, cfg) -> None:
    logger.start("report", {"case_study": cfg.case_study, "n_runs": len(records)},
                 job_type="report")
    logger.table("all_runs", [flat_record(r) for r in records])
    logger.images(plots)
    logger.finish()
