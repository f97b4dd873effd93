"""wandb logging: real runs, offline by default so they can be synced later.

One wandb group per invocation.

Toy case studies: each ensemble (runs sharing shapes and loss form) is one wandb run. A wandb
run costs ~0.05 s and a folder of files (measured offline here, after a first one of ~2 s
with wandb's imports; only the first run of a process lists the installed packages, which
costs ~0.4 s a run), so one wandb run per transcoder would add half a minute to a
two-minute reproduction that trains hundreds of them. The ensemble's config lists every
member under ``runs`` and, flat at the top level, the settings the members share (``arch``,
``penalty``, ...) and the lists of those that vary (``sparsity_coefs``, ``seeds``); its tags
(``arch=clt``, ``lambda=0.001``, ``seed=2``, ...) let the runs table be filtered by any of
them; its history holds each member's losses under ``<metric>/<run_id>``; and the ``runs``
table has one row per member with flat config columns and final metrics.

Language models: a few transcoders train for many steps, so each one is its own wandb run,
with a flat config (arch, penalty, sparsity_coef, seed, model, layers, ...) and a history of
plain ``loss``/``mse``/``sparsity``/``l0`` keys, so wandb's charts and filters compare them
directly.
"""

from __future__ import annotations

import os
from pathlib import Path

# A WANDB_DIR the user set wins; otherwise each logger writes under its own output folder
# (passed to wandb.init, since the environment keeps only the first folder set in a process).
_USER_WANDB_DIR = os.environ.get("WANDB_DIR")
_PACKAGES_LISTED = False  # has a run of this process saved the list of installed packages?


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
        self.member_runs: list = []  # one wandb run per transcoder (start_runs)
        self.specs: dict = {}  # {run_id: spec} of the ensemble being logged

    def _init(self, name: str, config: dict, job_type: str, tags: list[str] | None = None):
        if self.mode == "disabled":
            # Not even wandb.init: a disabled wandb still reads the environment and warns
            # (e.g. that WANDB_* variables changed since an earlier run in this process).
            return NullRun()
        import wandb  # lazy: keeps `clt-eval --help` fast

        global _PACKAGES_LISTED
        # The installed packages are the same for every run of this process: list them with
        # the first one only (listing them costs ~0.4 s a run, a dozen runs per reproduce).
        settings = wandb.Settings(x_save_requirements=not _PACKAGES_LISTED)
        run = wandb.init(project=self.project, group=self.group, name=name,
                         job_type=job_type, config=config, mode=self.mode, tags=tags,
                         reinit="create_new", dir=self.dir, settings=settings)
        _PACKAGES_LISTED = True
        return run

    def start(self, name: str, config: dict, job_type: str = "train") -> None:
        """One wandb run. A config with ``runs`` ({run_id: spec}) describes an ensemble: its
        shared and varying settings are added flat, and tags name each setting's values."""
        tags = None
        self.specs = {}
        if isinstance(config.get("runs"), dict) and config["runs"]:
            self.specs = config["runs"]
            flat, tags = ensemble_fields(list(config["runs"].values()))
            config = flat | config
        self.run = self._init(name, config, job_type, tags)

    def start_runs(self, names: list[str], configs: list[dict],
                   job_type: str = "train") -> None:
        """One wandb run per transcoder, all open at once (they train in one ensemble)."""
        self.member_runs = [self._init(n, c, job_type, run_tags(c))
                            for n, c in zip(names, configs, strict=True)]

    def runs_logger(self):
        """A trainer callback logging member i's [R] values to its own run, plain keys."""
        def log(step: int, values: dict) -> None:
            for i, run in enumerate(self.member_runs):
                run.log({k: float(v[i]) for k, v in values.items()}, step=step)
        return log

    def finish_runs(self, rows: list[dict]) -> None:
        """Each member's final metrics into its summary; then close every member run."""
        for run, row in zip(self.member_runs, rows, strict=True):
            run.summary.update({k: _cell(v) for k, v in row.items()})
        self.finish()

    def ensemble_logger(self, run_ids: list[str]):
        """A trainer callback logging each member's [R] values under metric/run_id."""
        def log(step: int, values: dict) -> None:
            row = {f"{k}/{rid}": float(v[i]) for k, v in values.items()
                   for i, rid in enumerate(run_ids)}
            self.run.log(row, step=step)
        return log

    def table(self, key: str, rows: list[dict]) -> None:
        if not rows or isinstance(self.run, NullRun):
            return
        import wandb

        # A row naming a member run gets every setting of its spec as a column too (width,
        # activation, ...), so the table filters and groups by any of them.
        rows = [{k: v for k, v in self.specs.get(r.get("run_id"), {}).items()
                 if not isinstance(v, dict | list)} | r for r in rows]
        cols = list(dict.fromkeys(c for r in rows for c in r))
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
        if isinstance(self.run, NullRun):
            return
        import wandb

        self.run.log({p.stem: wandb.Image(str(p)) for p in paths})

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def finish(self) -> None:
        for run in self.member_runs:
            run.finish()
        self.member_runs = []
        if self.run is not None:
            self.run.finish()
            self.run = None


class NullRun:
    """What a disabled logger logs to: nothing."""

    def __init__(self):
        self.summary: dict = {}

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        pass


# Run settings worth filtering on, with the tag prefix each gets.
TAG_KEYS = {"arch": "arch", "penalty": "penalty", "decoder_norm": "decoder_norm",
            "sparsity_coef": "lambda", "k": "k", "seed": "seed", "n_features": "n_features"}


def run_tags(spec: dict) -> list[str]:
    """``key=value`` tags for one run's settings (wandb filters runs by tag)."""
    return [f"{tag}={spec[k]:g}" if isinstance(spec.get(k), float) else f"{tag}={spec[k]}"
            for k, tag in TAG_KEYS.items() if spec.get(k) is not None]


def ensemble_fields(specs: list[dict]) -> tuple[dict, list[str]]:
    """(flat config, tags) of an ensemble: each setting the members share, flat; each that
    varies as the sorted list of its values, under a plural key (``seeds``); tags for
    every member's values."""
    flat: dict = {}
    for k in TAG_KEYS:
        values = sorted({s.get(k) for s in specs if s.get(k) is not None})
        if len(values) == 1:
            flat[k] = values[0]
        elif values:
            flat[f"{k}s"] = values
    flat["n_members"] = len(specs)
    tags = sorted({t for s in specs for t in run_tags(s)})
    return flat, tags


def _cell(v):
    """wandb tables want scalars or strings; lists become strings."""
    return v if isinstance(v, int | float | str | bool) or v is None else str(v)
