"""Checks every writing job makes before it starts, so a bad output folder, a second writer
or a grid that cannot fit fails in one line within a second, with nothing written.

- ``check_output``: the folder can be written (not a file, no file on its path, writable,
  enough free disk) and holds nothing but this job's own earlier results.
- ``OutputLock``: one writer per folder; a lock left by a dead process is taken over.
- ``job_output``: both, plus the marker file that records which job owns the folder.
- ``check_grid_memory`` / ``check_run_count``: refuse grids the machine cannot hold.

Importing this module is cheap (no torch): the command line runs it before heavy imports.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from clt_eval.errors import CltEvalError

MARKER = ".clt-eval-job.json"
LOCK = ".clt-eval.lock"
JOBS = ("train", "sweep", "reproduce", "compare", "graph", "patch", "convert")
# Jobs that replace their whole output folder by a rename: a lock or marker inside it would
# make the folder look non-empty (and vanish with the rename), so their lock lives beside it.
REPLACING = ("convert", "scaffold")
# Files and folders at the top of an output folder that identify the job which wrote them.
RESULTS = {"results.json": ("train", "reproduce"), "sweep.json": ("sweep", "reproduce"),
           "transcoders": ("train", "sweep", "reproduce"), "groups": ("train",),
           "checkpoints": ("train", "sweep", "reproduce"), "metrics.json": ("evaluate",),
           "compare.json": ("compare",), "graph.json": ("graph",), "graphs.json": ("graph",),
           "patching.json": ("patch",), "summary.json": ("reproduce",)}
# `evaluate` only adds metrics.json beside saved transcoders: it never owns a folder, and
# the job that trained them may rerun (resume) there.
READERS = {"metrics.json": ("train", "sweep", "reproduce")}
# Other outputs of clt-eval jobs that say nothing about which job wrote them.
SIDE_OUTPUTS = {"report.md", "summary.md", "analytic_costs.json", "wandb", "graph.png",
                "graph.viewer.json"}
# `graph --prompts`: one folder per prompt, named by its index and a hash of its text.
PROMPT_FOLDER = re.compile(r"\d{3,}-[0-9a-f]{8}")
MIN_FREE_BYTES = 2**20  # the reports and JSON every job writes, at least
MAX_RUNS = 100_000  # more runs than any study here needs; a typo in a grid is likelier
BYTES_PER_FLOAT = 4
# Parameter, gradient and two Adam moments per weight.
COPIES_PER_PARAM = 4
# Pre-activations, activations and their gradients per feature and row, roughly.
COPIES_PER_ACTIVATION = 4

_HOST = socket.gethostname()


def _fail(option: str, path: Path, why: str) -> CltEvalError:
    return CltEvalError(f"{option} {str(path)!r}: {why}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---- the output folder -------------------------------------------------------------------
def check_output(path: str | Path, job: str, expect_bytes: int = 0,
                 option: str = "--out") -> Path:
    """The resolved folder ``path`` if job ``job`` may write there; else a one-line
    CltEvalError naming ``option``. Creates nothing (a probe file is made and removed).
    ``expect_bytes``: the disk the job will fill (at least MIN_FREE_BYTES is asked for)."""
    out = Path(path).expanduser().absolute()
    try:
        return _check_output(out, job, expect_bytes, option)
    except OSError as exc:  # e.g. a folder on the path that may not be searched
        raise _fail(option, out, f"cannot be inspected ({exc.strerror or exc}); expected a "
                    "folder you can read and write") from None


def _check_output(out: Path, job: str, expect_bytes: int, option: str) -> Path:
    if out.exists() and not out.is_dir():
        raise _fail(option, out, "is a file; expected a folder (new or one of this job's)")
    anchor = out
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise _fail(option, out, f"{str(anchor)!r} on its path is a file; expected a folder")
    _check_writable(anchor, out, option)
    free, need = shutil.disk_usage(anchor).free, max(expect_bytes, MIN_FREE_BYTES)
    if free < need:
        raise _fail(option, out, f"needs about {_size(need)} of disk but "
                    f"{str(anchor)!r} has {_size(free)} free; expected more free space or "
                    "another folder")
    if out.is_dir():
        _check_contents(out, job, option)
    # A running writer is reported now, not after the job's imports and checks.
    holder = _read_lock(lock_path(out, job)) if lock_path(out, job).exists() else None
    if _alive(holder):
        raise _fail(option, out, _held_by(holder, lock_path(out, job)))
    return out


def lock_path(out: Path, job: str) -> Path:
    """``<out>/.clt-eval.lock``; beside the folder for jobs that replace it whole."""
    return out.parent / f".{out.name}{LOCK}" if job in REPLACING else out / LOCK


def _check_writable(anchor: Path, out: Path, option: str) -> None:
    why = f"{str(anchor)!r} is not writable by this user; expected a folder you can write to"
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise _fail(option, out, why)
    # os.access can be wrong (root, network and read-only mounts): try a real file.
    try:
        fd, probe = tempfile.mkstemp(dir=anchor, prefix=".clt-eval-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _fail(option, out, f"{why} ({exc.strerror or exc})") from None


def read_marker(folder: Path) -> dict | None:
    path = folder / MARKER
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CltEvalError(f"{path}: unreadable job marker ({exc}); expected the JSON that "
                           "clt-eval writes (delete it if the folder is yours)") from None
    if not isinstance(data, dict) or not isinstance(data.get("job"), str):
        raise CltEvalError(f"{path}: expected a JSON object with a 'job' name")
    return data


def _check_contents(out: Path, job: str, option: str) -> None:
    marker = read_marker(out)
    if marker is not None:
        if marker["job"] != job:
            raise _fail(option, out, f"holds the results of `clt-eval {marker['job']}` "
                        f"({MARKER}); expected a new or empty folder, or one of `clt-eval "
                        f"{job}` (a rerun resumes)")
        return
    if job in REPLACING:
        return  # convert and scaffold check what they may replace themselves
    names = sorted(p.name for p in out.iterdir() if not _neutral(p.name))
    other = [n for n in names if n in RESULTS and job not in RESULTS[n]
             and job not in READERS.get(n, ())]
    if other:
        owners = ", ".join(f"{n} ({' or '.join(RESULTS[n])})" for n in other)
        raise _fail(option, out, f"holds results of another clt-eval job: {owners}; expected "
                    f"a new or empty folder, or one of `clt-eval {job}`")
    foreign = [n for n in names if not _ours(out / n, job)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        raise _fail(option, out, f"holds files clt-eval did not write ({shown}); expected a "
                    "new or empty folder, or one of this job's")


def _neutral(name: str) -> bool:
    """The lock and leftovers of atomic writes (hidden temporary names) belong to no job."""
    return name in (LOCK, MARKER) or (name.startswith(".") and (
        name.endswith(".tmp") or ".tmp-" in name or ".old-" in name
        or name.startswith(".clt-eval")))


def _ours(path: Path, job: str) -> bool:
    name = path.name
    if name in RESULTS or name in SIDE_OUTPUTS or name.endswith(".png"):
        return True
    if job == "graph" and PROMPT_FOLDER.fullmatch(name):
        return True
    # reproduce --all: one folder per case study, each a reproduce folder itself.
    return job == "reproduce" and path.is_dir() and (path / "results.json").exists()


def _write_marker(out: Path, job: str) -> None:
    from clt_eval.atomic import write_json_atomic

    write_json_atomic(out / MARKER, {"job": job, "created": _now(), "version": _version()})


def record_reader(folder: Path, reader: str) -> None:
    """Note in ``folder``'s marker (if any) that ``reader`` (evaluate) added files there."""
    from clt_eval.atomic import write_json_atomic

    marker = read_marker(folder)
    if marker is None or reader in marker.get("also", []):
        return
    write_json_atomic(folder / MARKER, marker | {"also": [*marker.get("also", []), reader]})


def marked_folder(path: Path, levels: int = 2) -> Path | None:
    """The folder holding a job marker: ``path`` or one of its first ``levels`` parents
    (evaluate may be given a single transcoder inside ``<out>/transcoders/``)."""
    path = Path(path).absolute()
    for folder in [path, *list(path.parents)[:levels]]:
        if (folder / MARKER).is_file():
            return folder
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clt-eval")
    except PackageNotFoundError:
        return "unknown"


# ---- one writer per folder ---------------------------------------------------------------
class OutputLock:
    """``<out>/.clt-eval.lock``, created with O_EXCL, holding the writer's PID, start time,
    host and command. Re-entrant within one process (the command line and the Python API
    both take it). A lock whose PID is gone on this host is stale and taken over; a lock
    from another host is respected, since its process cannot be checked from here."""

    _depth: dict[str, int] = {}
    _guard = threading.Lock()

    def __init__(self, path: str | Path, lock_file: str | Path | None = None,
                 option: str = "--out", command: str | None = None):
        self.path = Path(path).absolute()
        self.file = Path(lock_file).absolute() if lock_file else self.path / LOCK
        self.option = option
        self.command = command if command is not None else " ".join(sys.argv)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        key = str(self.file)
        with self._guard:
            if self._depth.get(key, 0) > 0:
                self._depth[key] += 1
                return
            self._create()
            self._depth[key] = 1

    def release(self) -> None:
        key = str(self.file)
        with self._guard:
            depth = self._depth.get(key, 0) - 1
            if depth > 0:
                self._depth[key] = depth
                return
            self._depth.pop(key, None)
            holder = _read_lock(self.file)
            if holder is not None and holder.get("pid") == os.getpid():
                self.file.unlink(missing_ok=True)

    def _create(self) -> None:
        info = {"pid": os.getpid(), "started": _now(), "host": _HOST, "command": self.command}
        for _ in range(3):  # a stale lock removed, then the race for it retried
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(self.file)
                if _alive(holder):
                    raise _fail(self.option, self.path, _held_by(holder, self.file)) from None
                self.file.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except OSError as exc:
                raise _fail(self.option, self.path, f"cannot create the lock {self.file.name} "
                            f"({exc.strerror or exc}); expected a writable folder") from None
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            return
        raise _fail(self.option, self.path, "another clt-eval job keeps taking the lock; "
                    "expected one writer at a time")


def _read_lock(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Empty or cut short: a writer between creating and filling it, or one that died
        # there. A few seconds tell the two apart.
        try:
            young = time.time() - path.stat().st_mtime < 5
        except OSError:
            return None
        return {"pid": None, "young": young}
    return data if isinstance(data, dict) else {"pid": None, "young": False}


def _alive(holder: dict | None) -> bool:
    if holder is None:
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return bool(holder.get("young"))
    if holder.get("host", _HOST) != _HOST:
        return True  # cannot be checked from here
    if pid == os.getpid():
        return False  # this process does not hold it (see OutputLock._depth): left over
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _held_by(holder: dict, file: Path) -> str:
    if holder.get("pid") is None:
        return f"another clt-eval job is starting here ({file.name}); expected one writer"
    where = "" if holder.get("host", _HOST) == _HOST else f" on host {holder['host']}"
    return (f"another clt-eval job (PID {holder['pid']}{where}, started "
            f"{holder.get('started', '?')}) is writing here; wait for it or stop it, or delete "
            f"{file} if that process is gone")


@contextmanager
def job_output(path: str | Path, job: str, expect_bytes: int = 0, option: str = "--out",
               command: str | None = None) -> Iterator[Path]:
    """Check ``path`` for ``job``, lock it and mark it as the job's; yield the resolved
    folder. Nothing is created when a check fails, and a job that fails before writing
    anything leaves no folder behind."""
    if job not in (*JOBS, "scaffold"):
        raise ValueError(f"job={job!r}: expected one of {JOBS}")
    out = check_output(path, job, expect_bytes, option)
    created = out
    while not created.parent.exists():
        created = created.parent
    created = None if created.exists() else created
    replaces = job in REPLACING
    home = out.parent if replaces else out
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fail(option, out, f"cannot be created ({exc.strerror or exc}); expected a "
                    "folder you can write to") from None
    lock_file = lock_path(out, job)
    wrote_marker = False
    try:
        with OutputLock(out, lock_file, option, command):
            # Checked again under the lock: another job may have written here meanwhile.
            check_output(out, job, 0, option)
            if not replaces and read_marker(out) is None:
                _write_marker(out, job)
                wrote_marker = True
            yield out
            if job == "convert":
                _write_marker(out, job)  # the rename replaced the folder, marker and all
    except BaseException:
        _undo(out, created, wrote_marker)
        raise


def _undo(out: Path, created: Path | None, wrote_marker: bool) -> None:
    """After a failure: drop the marker and folders this run made if nothing else landed."""
    if wrote_marker and out.is_dir() and {p.name for p in out.iterdir()} <= {MARKER}:
        (out / MARKER).unlink(missing_ok=True)
    if created is None:
        return
    folder = out
    while True:
        if folder.exists():
            try:
                folder.rmdir()  # only ever removes an empty folder
            except OSError:
                return
        if folder == created:
            return
        folder = folder.parent


# ---- what a grid costs -------------------------------------------------------------------
def run_bytes(n_layers: int, d_model: int, n_features: int, skip: bool = False) -> int:
    """Bytes of one run's weights in float32, counting the cross-layer decoder in its dense
    [L, L, F, D] form (the form the ensembles train)."""
    L, D, F = n_layers, d_model, n_features
    params = L * D * F + L * L * F * D + L * F + L * D + (L * D * D if skip else 0)
    return params * BYTES_PER_FLOAT


def grid_bytes(n_layers: int, d_model: int, n_features: int, runs: int, rows: int,
               skip: bool = False) -> int:
    """Memory to train ``runs`` runs as one ensemble on ``rows`` rows a step: parameters,
    gradients and Adam moments, plus the feature activations and their gradients."""
    state = run_bytes(n_layers, d_model, n_features, skip) * COPIES_PER_PARAM * runs
    acts = rows * n_layers * n_features * runs * BYTES_PER_FLOAT * COPIES_PER_ACTIVATION
    return state + acts


def available_memory(device: str | None = None) -> int:
    """Bytes still free where the job computes: the GPU's free memory for a CUDA device
    (auto counts as CUDA when one is visible), else this machine's MemAvailable."""
    if device is not None and device != "cpu":
        import torch

        if torch.cuda.is_available():
            index = int(device.partition(":")[2] or torch.cuda.current_device()) \
                if device.startswith("cuda") else torch.cuda.current_device()
            return torch.cuda.mem_get_info(index)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(need: int, what: str, available: int | None = None,
                 device: str | None = None) -> None:
    have = available_memory(device) if available is None else available
    if need > have:
        where = "this machine" if device in (None, "cpu") else f"device {device}"
        raise CltEvalError(f"{what}: needs about {_size(need)} of memory but {where} has "
                           f"{_size(have)} available; expected fewer features, fewer runs per "
                           "ensemble or a smaller --batch-size")


def ensemble_peak(specs, n_layers: int, d_model: int, rows: int,
                  max_ensemble: int | None = None) -> int:
    """Peak bytes over the ensembles ``specs`` train as (one at a time, each at most
    ``max_ensemble`` runs)."""
    groups: dict[tuple, list] = {}
    for s in specs:
        groups.setdefault(s.ensemble_key(), []).append(s)
    peak = 0
    for group in groups.values():
        runs = len(group) if max_ensemble is None else min(len(group), max_ensemble)
        spec = group[0]
        peak = max(peak, grid_bytes(n_layers, d_model, spec.n_features, runs, rows, spec.skip))
    return peak


def check_grid_memory(case_name: str, specs, batch_size: int, max_ensemble: int | None = None,
                      what: str = "grid", device: str | None = None) -> int:
    """Refuse ``specs`` when their largest ensemble cannot fit in memory on ``case_name``;
    return the bytes their saved weights take on disk. Loads the case study (not its model)
    for its shapes and data size."""
    from clt_eval.case_study import load_case_study

    if not specs:
        return 0
    # A lower bound that needs no case study: one layer, one dimension, one row.
    check_memory(ensemble_peak(specs, 1, 1, 1, max_ensemble), what, device=device)
    case = load_case_study(case_name)
    rows = batch_size if batch_size > 0 else len(case.inputs())
    check_memory(ensemble_peak(specs, case.n_layers, case.d_model, rows, max_ensemble), what,
                 device=device)
    return sum(run_bytes(case.n_layers, case.d_model, s.n_features, s.skip) for s in specs)


def check_run_count(n: int, what: str) -> None:
    if n > MAX_RUNS:
        raise CltEvalError(f"{what}: {n:,} runs; expected at most {MAX_RUNS:,} (split the grid "
                           "or use fewer seeds or λ points)")


def count_spec_runs(data: dict) -> int:
    """Runs a raw sweep spec's grid blocks describe, counted without expanding them (an
    absurd grid would not fit in memory as a list). Malformed values count as one value:
    the spec parser reports them."""
    grids = data.get("grid")
    if not isinstance(grids, list):
        return 0  # not a grid at all: the spec parser says so
    total = 0
    for block in grids:
        if not isinstance(block, dict):
            continue
        n = 1
        for key, raw in block.items():
            if key == "label":
                continue
            n *= _count_values(key, raw)
        total += n
    return total


def _count_values(key: str, raw) -> int:
    if key == "seeds" and isinstance(raw, int) and not isinstance(raw, bool):
        return max(raw, 1)
    if isinstance(raw, dict):
        v = raw.get("log")
        if isinstance(v, list) and len(v) == 3 and isinstance(v[2], int | float) and \
                math.isfinite(v[2]):
            return max(int(v[2]), 1)
        return 1
    if isinstance(raw, list | tuple):
        return max(len(raw), 1)
    return 1
