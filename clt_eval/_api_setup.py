"""Set-up shared by the functions of ``clt_eval.api``: run grids from keyword values, sweep
specs with their overrides, and the device, dtype and thread settings of one call.

Kept apart so that ``clt_eval.api`` reads as one function per command. Importing this module
is cheap: torch and the training stack load inside the functions.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from clt_eval.errors import CltEvalError, require

T = TypeVar("T")
Threads = int | str  # a count, or "auto"
# RunSpec fields that `train` takes one value or several of, to train their product.
GRID_FIELDS = ("arch", "penalty", "decoder_norm", "n_features", "k", "cross_layer_coef",
               "sparsity_coef", "seed")
# Fields of LMDataConfig that `train` takes with ``model``; None keeps the config's default.
LM_FIELDS = ("n_tokens", "eval_tokens", "n_ctx", "model_batch", "cache_dir", "input_hook",
             "output_hook", "drop_first", "normalize", "cache")
# Grid keywords of `sweep`: together they replace the spec's grid blocks with one block.
SWEEP_GRID = ("arch", "penalty", "decoder_norm", "n_features", "k", "cross_layer_coef",
              "sparsity_coef")
TOPK_ACTIVATIONS = ("topk", "batchtopk")  # the activations that take k
UNPENALISED = ("topk", "batchtopk")  # penalties without a λ term: sparsity comes from k
def listed(value: T | Sequence[T]) -> list[T]:
    """One grid value or several: a str is one value, not a sequence of letters."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


def tiny_products(case_name: str, width: int, batch_size: int) -> bool:
    """Are the products of runs ``width`` features wide on this case study a few thousand
    multiply-adds (batch rows × d_model × features below LOOP_MIN_MACS)? Then a step is
    hundreds of small ops that a second thread only waits on: `reproduce` on the two-step
    toy took 117 s (208 s of CPU) with 2 threads and 111 s (110 s of CPU) with 1, on an idle
    2-core machine."""
    from clt_eval.case_study import load_case_study
    from clt_eval.transcoder import LOOP_MIN_MACS

    case = load_case_study(case_name)
    n = len(case.inputs())
    rows = min(batch_size, n) if batch_size > 0 else n
    return rows * case.d_model * width < LOOP_MIN_MACS


@contextlib.contextmanager
def compute(threads: Threads, device: str | None = None, dtype: str | None = None,
            tiny: bool = False) -> Iterator[None]:
    """Check the device (it may need a GPU) and dtype; run with torch's CPU threads set to
    ``threads``, and give the caller its own setting back afterwards. On the CPU, freed
    memory is kept for reuse from then on (``keep_freed_memory``). ``tiny`` (see
    ``tiny_products``): one torch thread in each of ``threads`` processes that share the
    large ensembles (training/workers.py; "auto": the idle physical cores)."""
    import torch

    from clt_eval.device import (
        auto_threads,
        auto_workers,
        keep_freed_memory,
        resolve_device,
        resolve_dtype,
    )
    from clt_eval.training.workers import use_workers

    require(threads == "auto" or (isinstance(threads, int) and not isinstance(threads, bool)
                                  and threads >= 1),
            f"threads={threads!r}: expected 'auto' or an integer >= 1")
    if device is None or resolve_device(device).type == "cpu":
        keep_freed_memory()  # large CPU tensors reuse memory instead of faulting in pages
    if dtype is not None:
        resolve_dtype(dtype)
    before = torch.get_num_threads()
    if tiny:
        n_workers = auto_workers() if threads == "auto" else threads
        torch.set_num_threads(1)
    else:
        n_workers = 1
        torch.set_num_threads(max(1, auto_threads() // _ranks_here()) if threads == "auto"
                              else threads)
    try:
        with use_workers(n_workers):
            yield
    finally:
        torch.set_num_threads(before)


def device_args(fn: Callable, command: str, device: str, dtype: str,
                 accepted: Sequence[str] = ()) -> dict[str, str]:
    """device=/dtype= for ``fn`` if it takes them. A job that cannot take them runs on the CPU
    in float32: asking it for anything else is refused rather than ignored."""
    params = set(inspect.signature(fn).parameters) | set(accepted)
    out = {}
    for name, value, plain in (("device", device, ("auto", "cpu")),
                               ("dtype", dtype, ("float32",))):
        if name in params:
            out[name] = value
        elif value not in plain:
            raise CltEvalError(f"--{name} {value}: `clt-eval {command}` computes on the CPU in "
                               f"float32 only; expected --{name} {plain[0]}")
    return out


def explicit_threads(threads: Threads) -> int | None:
    return None if threads == "auto" else threads


def train_specs(given: dict) -> list:
    """One RunSpec per combination of the grid keywords' values. A penalty without a
    decoder norm gets its own (concatenated for l1 and tanh, none for the others); in a grid
    mixing TopK with penalised runs, ``k`` applies to the TopK runs and ``sparsity_coef``
    and ``cross_layer_coef`` to the others, so ``penalty=["l1", "topk"], k=[2, 4]`` is
    three runs."""
    from clt_eval.config import DEFAULT_ACTIVATION, NORMED_PENALTIES
    from clt_eval.training import preflight
    from clt_eval.training.config import RunSpec

    base = {f: given[f] for f in RunSpec.__dataclass_fields__ if f not in GRID_FIELDS}
    grid = {name: listed(given[name]) for name in GRID_FIELDS}
    for name, values in grid.items():
        dup = sorted({repr(v) for v in values if values.count(v) > 1})
        if dup:
            raise CltEvalError(f"--{name.replace('_', '-')}: duplicated value(s) "
                               f"{', '.join(dup)}; expected each value once")
    preflight.check_run_count(math.prod(len(g) for g in grid.values()), "train")

    def takes_k(penalty: str) -> bool:
        return (base["activation"] or DEFAULT_ACTIVATION.get(penalty)) in TOPK_ACTIVATIONS

    # A grid of one kind keeps every value, so a k without TopK (or a λ with it) is
    # reported by the run spec as the mistake it is.
    some_take_k = any(takes_k(p) for p in grid["penalty"])
    some_take_lambda = any(p not in UNPENALISED for p in grid["penalty"])
    specs = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(GRID_FIELDS, combo, strict=True))
        if values["decoder_norm"] is None:
            normed = values["penalty"] in NORMED_PENALTIES
            values["decoder_norm"] = "concatenated" if normed else "none"
        if some_take_k and not takes_k(values["penalty"]):
            values["k"] = None
        if some_take_lambda and values["penalty"] in UNPENALISED:
            values["sparsity_coef"] = values["cross_layer_coef"] = 0.0
        specs.append(RunSpec(**base, **values))
    return list(dict.fromkeys(specs))


def sweep_data(given: dict) -> tuple[dict, Path, bool]:
    """The spec mapping with the grid keywords, steps, case study, device and dtype folded
    in; the spec's path; whether a grid came from the keywords."""
    from clt_eval.training.sweep_spec import DEFAULT_SPEC, read_spec_file

    path = Path(given["spec"]) if given["spec"] else DEFAULT_SPEC
    data = read_spec_file(path)
    block = {k: listed(given[k]) for k in SWEEP_GRID if given[k] is not None}
    if given["lambda_log"] is not None:
        lo, hi, n = given["lambda_log"]
        if n != int(n) or n < 1:
            raise CltEvalError(f"--lambda-log: N={n!r}; expected a whole number of points >= 1")
        block["sparsity_coef"] = {"log": [lo, hi, int(n)]}
    if given["seeds"] is not None:
        block["seeds"] = given["seeds"]
    if block:
        data = data | {"grid": [block | {"label": "command line"}]}
        if not given["matched_l0"]:
            data = data | {"matched_l0": None}
    train = {k: given[k] for k in ("steps", "device", "dtype") if given[k] is not None}
    if train:
        data = data | {"train": data.get("train", {}) | train}
    if given["case_study"] is not None:
        data = data | {"case_study": given["case_study"]}
    return data, path, bool(block)


def _ranks_here() -> int:
    """Processes of one data-parallel job on this machine: "auto" shares the cores among them
    rather than giving each all of them (oversubscribed cores slow every rank down)."""
    from clt_eval.training import distributed

    return distributed.local_world_size()


def check_toy_batch(case_study: str, batch_size: int) -> None:
    """One line unless the data-parallel ranks can split `train`'s global batch on
    ``case_study`` evenly: ``batch_size`` rows, or the whole data set when it is 0 or at
    least the data set's size (every step then trains on all of it)."""
    from clt_eval.case_study import load_case_study
    from clt_eval.training import distributed

    if distributed.world_size() == 1:
        return  # nothing to split: no need to load the case study here
    n = len(load_case_study(case_study).inputs())
    if 0 < batch_size < n:
        distributed.check_divisible(batch_size)
        return
    world = distributed.world_size()
    require(n % world == 0,
            f"batch_size={batch_size}: the whole data set of case study {case_study!r} "
            f"({n} rows) each step, not divisible by the world size {world} (ranks); "
            f"expected a batch_size below {n} that is a multiple of {world}")
