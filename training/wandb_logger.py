"""wandb logging: real runs, offline by default so they can be synced later.

One wandb group per invocation. Each ensemble (runs sharing shapes and loss form) is one
wandb run whose config lists every member run, whose history holds each member's losses
under ``<metric>/<run_id>``, and whose summary holds a table of every member's final metrics.
A wandb run costs ~0.1 s and a folder of files (measured offline here, after a first one of
~0.9 s), so one wandb run per transcoder would add about a minute to a two-minute
reproduction that trains hundreds of them.
"""

from __future__ import annotations

import os
from pathlib import Path

# A WANDB_DIR the user set wins; otherwise each logger writes under its own output folder
# (passed to wandb.init, since the environment keeps only the first folder set in a process).
_USER_WANDB_DIR = os.environ.get("WANDB_DIR")


def configure_wandb_dirs(root: Path) -> None:
    """Keep wandb's files under ``root`` instead of the home folder (unless the user set them)."""
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_DIR", str(root))
    for var, sub in (("WANDB_CACHE_DIR", ".cache"), ("WANDB_CONFIG_DIR", ".config"),
                     ("WANDB_DATA_DIR", ".data")):
        os.environ.setdefault(var, str(root / sub))
    os.environ.setdefault("WANDB_SILENT", "true")


class WandbLogger:
    def __init__(self, mode: str, group: str, project: str = "clt-eval", root: Path | None = None):
        self.mode, self.group, self.project = mode, group, project
        # A disabled run writes nothing: giving it a folder that does not exist yet only
        # made wandb warn about a missing git root.
        self.dir = None if mode == "disabled" else \
            _USER_WANDB_DIR or (str(root) if root is not None else None)
        if root is not None and mode != "disabled":
            configure_wandb_dirs(root)
        self.run = None

    def start(self, name: str, config: dict, job_type: str = "train") -> None:
        import wandb  # lazy: keeps `clt-eval --help` fast

        self.run = wandb.init(project=self.project, group=self.group, name=name,
                              job_type=job_type, config=config, mode=self.mode, reinit=True,
                              dir=self.dir)

    def ensemble_logger(self, run_ids: list[str]):
        """A trainer callback logging each member's [R] values under metric/run_id."""
        def log(step: int, values: dict) -> None:
            row = {f"{k}/{rid}": float(v[i]) for k, v in values.items()
                   for i, rid in enumerate(run_ids)}
            self.run.log(row, step=step)
        return log

    def table(self, key: str, rows: list[dict]) -> None:
        import wandb

        if not rows:
            return
        cols = list(rows[0])
        data = [[_cell(r.get(c)) for c in cols] for r in rows]
        # wandb types a column by its first value and rejects others: a column mixing
        # numbers and words ("never recovered") becomes text.
        for j in range(len(cols)):
            kinds = {type(row[j]) for row in data if row[j] is not None}
            if len(kinds) > 1 and not kinds <= {int, float, bool}:
                for row in data:
                    row[j] = None if row[j] is None else str(row[j])
        self.run.log({key: wandb.Table(columns=cols, data=data)})

    def images(self, paths: list[Path]) -> None:
        import wandb

        self.run.log({p.stem: wandb.Image(str(p)) for p in paths})

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _cell(v):
    """wandb tables want scalars or strings; lists become strings."""
    return v if isinstance(v, int | float | str | bool) or v is None else str(v)
