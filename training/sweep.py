"""`clt-eval sweep`: train a sweep spec's runs, find matched-L0 points, analyse, report.

Resumable by construction. ``sweep.json`` is rewritten atomically after every ensemble with
the records of the runs finished so far, so a run is either fully recorded or not at all;
a new invocation on the same ``--out`` skips every recorded run. An ensemble interrupted
mid-training continues from its checkpoint (``checkpoints/``, saved every
``CHECKPOINT_EVERY`` steps and on Ctrl-C/SIGTERM at the next step boundary), so no step is
trained twice after a clean stop, and at most ``CHECKPOINT_EVERY`` after a hard kill.
`clt-eval train` and `clt-eval reproduce` resume through the same ``Runner`` and ``RunStore``.
The matched-L0 search is resumable too: its λ points are a deterministic function of
earlier results, so replaying it finds its finished runs in ``sweep.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from clt_eval.atomic import nan_to_none, write_json_atomic, write_text_atomic
from clt_eval.case_study import load_case_study
from clt_eval.device import resolve_device
from clt_eval.errors import CltEvalError, require
from clt_eval.training.checkpoint import Checkpoint, is_main, stop_gracefully
from clt_eval.training.config import RunSpec, TrainConfig
from clt_eval.training.experiment import (
    canonical,
    case_data,
    check_unique,
    group_specs,
    run_id,
    train_log_save,
)
from clt_eval.training.sweep_spec import SweepSpec
from clt_eval.training.wandb_logger import WandbLogger
from clt_eval.transcoder import padding_is_exact

CHECKPOINT_EVERY = 250
MAX_ENSEMBLE = 1024  # runs per ensemble: big enough to amortise a step, small enough to
# checkpoint often and keep memory flat


class RunStore:
    """A JSON file of finished runs' records, headed by the arguments that made them.

    The one resume mechanism of every training job: it is rewritten atomically after each
    ensemble, so a run is either fully recorded or not at all, and a rerun skips recorded
    runs. A rerun whose arguments differ (in the ``checked`` keys of ``header``) is refused
    in one line, since its runs would not be the recorded ones."""

    def __init__(self, path: Path, header_key: str, header: dict, checked: tuple[str, ...],
                 source: str):
        self.path, self.header_key, self.source = path, header_key, source
        # Compared as JSON reads it back (tuples become lists).
        self.header = json.loads(json.dumps(header))
        self.checked = checked
        self.records: dict[str, dict] = {}
        self.extra: dict = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise CltEvalError(f"{self.path}: unreadable ({exc}); expected the {self.path.name}"
                               f" of an earlier run of this {self.source}") from None
        require(isinstance(data, dict) and isinstance(data.get("runs"), list),
                f"{self.path}: field 'runs' missing; expected the {self.path.name} of an "
                f"earlier run of this {self.source}")
        was = data.get(self.header_key) or {}
        for key in self.checked:
            if was.get(key) != self.header[key]:
                diff = _difference(key, was.get(key), self.header[key], self.source)
                raise CltEvalError(f"{self.path}: the folder was made with {diff}; resume with "
                                   f"the same {self.source} or choose another --out")
        self.records = {r["run_id"]: r for r in data["runs"]}

    def done(self, spec: RunSpec) -> bool:
        return run_id(spec) in self.records

    def get(self, spec: RunSpec) -> dict:
        return self.records[run_id(spec)]

    def twin(self, spec: RunSpec, trained: RunSpec) -> dict:
        """``spec``'s record, copied from the identical run ``trained`` (see ``canonical``)."""
        rec = copy.deepcopy(self.get(trained))
        rec |= {"run_id": run_id(spec), "decoder_norm": spec.decoder_norm,
                "spec": spec.to_dict(), "trained_as": run_id(trained)}
        return rec

    def add(self, records: list[dict]) -> None:
        # NaN -> None once, as each record arrives, not for every record at every write
        self.records |= {r["run_id"]: nan_to_none(r) for r in records}
        self.write()

    def write(self) -> None:
        if not is_main():
            return  # data-parallel replicas hold the same records: rank 0 writes them
        write_json_atomic(self.path, {self.header_key: self.header,
                                      "runs": list(self.records.values())}
                          | nan_to_none(self.extra), records=True)


def _difference(key: str, was, now, source: str) -> str:
    """The first differing field, e.g. "train.lr=0.01, this command has 0.02"."""
    if isinstance(was, dict) and isinstance(now, dict):
        for k in list(was) + [k for k in now if k not in was]:
            if was.get(k) != now.get(k):
                return _difference(f"{key}.{k}", was.get(k), now.get(k), source)
    if isinstance(was, list) and isinstance(now, list) and len(was) != len(now):
        return f"{len(was)} {key}, this {source} has {len(now)}"
    if isinstance(was, list) and isinstance(now, list):
        i = next(i for i, (a, b) in enumerate(zip(was, now, strict=True)) if a != b)
        return _difference(f"{key}[{i}]", was[i], now[i], source)
    return f"{key}={was!r}, this {source} has {now!r}"


class SweepStore(RunStore):
    """``sweep.json``: the spec, every finished run's record, and later the analysis. A sweep
    may grow (new grid points train, recorded ones are kept) but not change its case study
    or training settings; with ``strict`` (reproduce) the whole spec must match."""

    def __init__(self, out: Path, spec: SweepSpec, strict: bool = False):
        header = spec.to_dict()
        checked = tuple(header) if strict else ("case_study", "train")
        super().__init__(out / "sweep.json", "spec", header, checked, "spec")
        self.spec = spec


@dataclass(frozen=True)
class TrainJob:
    """What a ``Runner`` needs of a job besides its runs: `clt-eval train` has no spec."""

    case_study: str
    train: TrainConfig


class Runner:
    """Trains runs not yet in the store, as vectorised ensembles with checkpoints."""

    def __init__(self, spec: SweepSpec | TrainJob, out: Path, store: RunStore, logger,
                 progress=True, save_transcoders=True, twins=True):
        self.spec, self.out, self.store, self.logger = spec, out, store, logger
        self.case = load_case_study(spec.case_study)
        self.model = self.case.model()
        self.data = case_data(self.case, self.model)
        self.progress, self.save = progress, save_transcoders
        # Train a PLT once for every decoder norm (``canonical``); `train` trains each as asked.
        self.twins = twins
        self.trained = 0  # runs trained by this invocation
        self.active: Checkpoint | None = None

    def run(self, specs: list[RunSpec], desc: str) -> list[dict]:
        """Records for ``specs``, training those not yet recorded."""
        from tqdm.auto import tqdm

        check_unique(specs)
        canon = {s: canonical(s) if self.twins else s for s in specs}
        chunks = self._chunks(list(dict.fromkeys(
            c for c in canon.values() if not self.store.done(c))))
        steps = len(chunks) * self.spec.train.steps
        with tqdm(total=steps, desc=f"{desc}: {sum(map(len, chunks))} runs", unit="step",
                  disable=not self.progress or not chunks) as bar, \
                stop_gracefully(lambda: self.active):
            for chunk in chunks:
                self.active = Checkpoint(self._checkpoint_path(chunk), CHECKPOINT_EVERY)
                recs = train_log_save(self.case, self.model, chunk, self.spec.train, self.data,
                                      self.logger, bar, self.out, save=self.save,
                                      checkpoint=self.active)
                self.store.add(recs)
                self.active.remove()
                self.trained += len(chunk)
                if self.active.stop_requested:  # a signal that came during evaluation
                    raise KeyboardInterrupt("stopped between ensembles")
                self.active = None
        twins = [self.store.twin(s, c) for s, c in canon.items()
                 if s != c and not self.store.done(s)]
        if twins:
            self.store.add(twins)
        return [self.store.get(s) for s in specs]

    def _chunks(self, pending: list[RunSpec]) -> list[list[RunSpec]]:
        """Ensembles of at most MAX_ENSEMBLE runs, in a deterministic order, so a resumed
        sweep rebuilds the interrupted ensemble exactly and finds its checkpoint. Small
        ensembles of several widths train as one where padding keeps every run's numbers
        (``group_specs``)."""
        x, train = self.data[0], self.spec.train
        batch = train.batch_size or x.shape[0]
        device = resolve_device(train.device, "device")

        def pad(width: int) -> bool:
            return train.dtype == "float32" and padding_is_exact(
                self.case.n_layers, self.case.d_model, width, batch, device, x.dtype)

        out = []
        for group in group_specs(pending, mix_activations=True, pad=pad):
            out += [group[i:i + MAX_ENSEMBLE] for i in range(0, len(group), MAX_ENSEMBLE)]
        return out

    def _checkpoint_path(self, chunk: list[RunSpec]) -> Path:
        key = json.dumps([run_id(s) for s in chunk] + [asdict(self.spec.train)])
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.out / "checkpoints" / f"{digest}.safetensors"


def run_sweep(spec: SweepSpec, out: Path, wandb_mode: str = "offline", progress: bool = True,
              save_transcoders: bool = True, strict: bool = False) -> dict:
    """Train, search, analyse and report; returns {"sweep": path, "report": path, ...}.
    ``strict``: resume only with the very spec the folder was made with (see SweepStore)."""
    from clt_eval.training.matched_l0 import matched_l0_search
    from clt_eval.training.report import analytic_costs

    # Threads are the caller's choice (the command line's --threads).
    load_case_study(spec.case_study, validate=True)  # a bad plugin fails before any write
    started = time.time()
    store = SweepStore(out, spec, strict)
    logger = WandbLogger(wandb_mode, group=f"sweep-{spec.name}-{out.name}", root=out)
    runner = Runner(spec, out, store, logger, progress, save_transcoders)
    grid = runner.run(spec.runs(), "grid")
    matched = matched_l0_search(runner, spec, grid) if spec.matched_l0 else None
    store.extra = {"matched_l0": matched, "seconds": time.time() - started,
                   "trained_this_invocation": runner.trained}
    store.write()
    analytic = analytic_costs(runner.case, runner.data[0])
    report, plots, summary = _report(out, spec, runner, grid, matched, analytic)
    store.extra["summary"] = summary
    store.write()
    _log_summary(logger, spec, grid, plots, summary)
    return {"sweep": store.path, "report": report, "plots": plots, "trained": runner.trained,
            "store": store, "summary": summary, "analytic": analytic}


def _report(out, spec, runner, grid, matched, analytic):
    """The sweep's report over the runs that trained to the end (a diverged run has no
    metrics to plot); a one-paragraph report when none did."""
    from clt_eval.training.sweep_report import write_sweep_report

    finite = [r for r in grid if r["metrics"].get("diverged") is None]
    if finite:
        return write_sweep_report(out, spec, runner, finite, matched, analytic)
    text = (f"# clt-eval sweep `{spec.name}` on `{spec.case_study}`\n\nEvery one of the "
            f"{len(grid)} runs diverged (see `diverged` in sweep.json for the step and "
            "reason); there is nothing to analyse. A smaller learning rate or λ may help.\n")
    path = write_text_atomic(out / "report.md", text) if is_main() else out / "report.md"
    return path, [], {}


def _log_summary(logger, spec, grid, plots, summary) -> None:
    from clt_eval.training.experiment import flat_record

    logger.start("summary", {"spec": spec.to_dict(), "n_runs": len(grid)}, job_type="report")
    logger.table("all_runs", [flat_record(r) for r in grid])
    for key, rows in summary.get("tables", {}).items():
        logger.table(key, rows)
    logger.images(plots)
    logger.finish()
