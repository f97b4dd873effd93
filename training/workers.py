"""Ensembles of tiny transcoders trained by several single-threaded worker processes.

A toy's step is hundreds of small ops, each too small for torch to split across threads, so
one process uses one core however many it is given. Its runs are independent to the last
bit, though (``Transcoder.exact``): an ensemble cut into contiguous parts, each trained in a
process of its own, gives every run the very numbers the whole ensemble gives it. The parts
run side by side (the first in this process, the others in forked children, which inherit
the loaded model and data instead of importing everything again), and their results are
joined in the ensemble's order: the transcoders stacked, the records and logged values
concatenated.

Only for CPU training in float32 in a single (non data-parallel) process, on Linux. Worth
it on idle cores only: beside other jobs a second process adds its own fixed cost and little
else (docs/scale.md, "Threads and worker processes"; ``device.auto_workers``).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from clt_eval.errors import CltEvalError

# What a part returns: a JSON value and named tensors.
Result = tuple[object, dict[str, torch.Tensor]]

# A part smaller than this gains little over training with the rest: a step's fixed cost
# (~1,000 ops) is paid once per process. Measured on the two-step toy, 300 steps, one
# process vs two parts side by side: 240 runs 15.9 vs 8.5 s; 80 runs 8.4 vs 5.7 s; 56 runs
# 4.35 vs 2.80 s; 32 runs 3.20 vs 2.74 s.
MIN_PART_RUNS = 24

_workers = 1  # set for a job by ``use_workers``


@contextlib.contextmanager
def use_workers(n: int) -> Iterator[None]:
    """Train ensembles with up to ``n`` processes while the context is active."""
    global _workers
    before, _workers = _workers, max(1, int(n))
    try:
        yield
    finally:
        _workers = before


def workers() -> int:
    return _workers


def parts(n_runs: int, n_workers: int | None = None,
          min_runs: int | None = None) -> list[range]:
    """Contiguous, near-equal ranges of run indices, one per process: as many as
    ``n_workers`` (default: the current setting) allows with at least ``min_runs`` (default
    MIN_PART_RUNS) runs each. Equal counts: weighting CLT runs above PLT runs (more decoder
    blocks) made the parts less even, not more, on the toys (measured)."""
    n = max(1, min(n_workers or _workers, n_runs // max(1, min_runs or MIN_PART_RUNS)))
    bounds = [round(i * n_runs / n) for i in range(n + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def can_fork(device: torch.device, dtype: str) -> bool:
    """May an ensemble on ``device`` in ``dtype`` be split across forked processes? Only runs
    that are bit-exact whatever their ensemble (CPU, float32), outside data parallelism."""
    return device.type == "cpu" and dtype == "float32" and _may_fork()


def _may_fork() -> bool:
    """Linux only (macOS forbids much after a fork: Python itself defaults to spawn there),
    and not inside a data-parallel job, whose ranks are processes of their own."""
    from clt_eval.training import distributed

    return sys.platform.startswith("linux") and distributed.world_size() == 1


def side_by_side(fns: list[Callable[[], object]]) -> list[object]:
    """``[fn() for fn in fns]``, in forked processes side by side when this job has more
    than one worker and this machine can fork; the results must be JSON values."""
    if _workers > 1 and _may_fork():
        return [meta for meta, _ in run_parts([lambda f=f: (f(), {}) for f in fns])]
    return [fn() for fn in fns]


def stop_event():
    """An event the processes of one ``run_parts`` share: set, it asks every part to stop at
    its next step boundary (``Checkpoint.part``). Create it before ``run_parts`` forks."""
    return multiprocessing.get_context("fork").Event()


def run_parts(fns: list[Callable[[], Result]], stop=None) -> list[Result]:
    """``[fn() for fn in fns]``, the first in this process and the others in forked
    children at the same time; results come back in order, through pipes. A result is
    ``(meta, tensors)``: a JSON value and a dict of tensors (sent as JSON and safetensors,
    so nothing is unpickled).

    A child's error is raised here (a ``CltEvalError`` as itself, anything else with the
    child's traceback), after every other process has finished. Children ignore Ctrl-C: this
    process decides. If it is stopped or fails, it sets ``stop`` (``stop_event``; the parts
    then save their checkpoints and stop at their next step) and waits for the children, or,
    without ``stop``, ends them with SIGTERM; then its error goes on."""
    if len(fns) == 1:
        return [fns[0]()]
    ctx = multiprocessing.get_context("fork")
    pipes = [ctx.Pipe(duplex=False) for _ in fns[1:]]
    procs = [ctx.Process(target=_child, args=(fn, send), daemon=True)
             for fn, (_, send) in zip(fns[1:], pipes, strict=True)]
    for proc, (_, send) in zip(procs, pipes, strict=True):
        proc.start()
        send.close()  # the child's copy stays open: its end-of-file means the child is gone
    try:
        first = fns[0]()
    except BaseException:
        _end(procs, pipes, stop)
        raise
    outcomes = _collect(procs, pipes)
    return [first] + [_result(p, o) for p, o in zip(procs, outcomes, strict=True)]


def _child(fn: Callable[[], object], send) -> None:
    """A forked worker: run ``fn`` and send its outcome (result, stop or error)."""
    from tqdm import tqdm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Another thread of the parent may have held tqdm's lock when it forked: a fresh one,
    # so that a warning written here cannot wait on it forever.
    tqdm.set_lock(threading.RLock())
    tensors: dict = {}
    try:
        meta, tensors = fn()
        outcome = {"result": meta}
    except KeyboardInterrupt:
        outcome = {"stopped": True}
    except CltEvalError as exc:
        outcome = {"error": str(exc), "user_error": True}
    except BaseException:
        outcome = {"error": traceback.format_exc(), "user_error": False}
    send.send_bytes(json.dumps(outcome).encode())
    send.send_bytes(safetensors_save({k: v.detach().clone()  # owns its memory
                                     for k, v in tensors.items()}))
    send.close()
    sys.stdout.flush()
    sys.stderr.flush()


def _collect(procs, pipes) -> list[dict | None]:
    """Every child's outcome (None for one that ended without sending), then every child
    waited for. Received before joining: a child blocks until its outcome is read."""
    outcomes = []
    for receive, _ in pipes:
        try:
            outcome = json.loads(receive.recv_bytes())
            outcome["tensors"] = safetensors_load(receive.recv_bytes())
            outcomes.append(outcome)
        except EOFError:
            outcomes.append(None)
        receive.close()
    for proc in procs:
        proc.join()
    return outcomes


def _result(proc, outcome: dict | None):
    if outcome is None:
        raise RuntimeError(f"ensemble worker {proc.pid} ended without a result "
                           f"(exit code {proc.exitcode})")
    if "result" in outcome:
        return outcome["result"], outcome["tensors"]
    if outcome.get("stopped"):
        raise KeyboardInterrupt("an ensemble worker was stopped")
    if outcome["user_error"]:
        raise CltEvalError(outcome["error"])
    raise RuntimeError(f"ensemble worker {proc.pid} failed:\n{outcome['error']}")


def _end(procs, pipes, stop) -> None:
    """Ask the children to stop (``stop``) or end them (SIGTERM), and wait for them."""
    if stop is not None:
        stop.set()
    else:
        for p in procs:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
    _collect(procs, pipes)
