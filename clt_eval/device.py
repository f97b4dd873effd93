"""Which device and dtype a job computes on, and how many CPU threads it uses.

Names are checked without importing torch (``check_device_name``, ``check_dtype_name``), so
the command line can refuse a misspelt ``--device`` before any heavy import; ``resolve_*``
turn a checked name into the torch object and check that the device exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
import re
import time
from pathlib import Path

from clt_eval.errors import CltEvalError

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # plus cuda:N
DTYPE_CHOICES = ("float32", "bfloat16")
# More threads than this rarely helps these workloads and makes OpenMP's spin-waits costly
# on shared machines.
MAX_AUTO_THREADS = 32
_CUDA_INDEX = re.compile(r"cuda:(\d+)")
# glibc's mallopt parameters (malloc.h), the values keep_freed_memory gives them, the same
# as GLIBC_TUNABLES for another process, and the opt-out variable.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEPT_TRIM_THRESHOLD, _KEPT_MMAP_MAX = 2 ** 31 - 1, 0
KEPT_MEMORY_TUNABLES = (f"glibc.malloc.mmap_max={_KEPT_MMAP_MAX}:"
                        f"glibc.malloc.trim_threshold={_KEPT_TRIM_THRESHOLD}")
KEEP_MEMORY_ENV = "CLT_EVAL_KEEP_FREED_MEMORY"
_kept_freed_memory: bool | None = None
_flushing = False  # what flushed_subnormals last set everywhere (torch has no getter)


def check_device_name(name: str, option: str = "--device") -> str:
    """``name`` if it is auto, cpu, cuda or cuda:N; else a one-line error."""
    if name in DEVICE_CHOICES or _CUDA_INDEX.fullmatch(str(name)):
        return name
    raise CltEvalError(f"{option} {name!r}: unknown device; expected auto, cpu, cuda or cuda:N")


def check_dtype_name(name: str, option: str = "--dtype") -> str:
    if name in DTYPE_CHOICES:
        return name
    raise CltEvalError(f"{option} {name!r}: unknown dtype; expected "
                       + " or ".join(DTYPE_CHOICES))


def resolve_device(name: str = "auto", option: str = "--device"):
    """The torch device for ``name``: auto picks cuda when a GPU is visible, else cpu."""
    import torch

    check_device_name(name, option)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CltEvalError(f"{option} {name}: no CUDA device is available; expected cpu or auto")
    index = _CUDA_INDEX.fullmatch(name)
    if index is not None and int(index.group(1)) >= torch.cuda.device_count():
        raise CltEvalError(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) "
                           f"are visible; expected an index below that")
    return torch.device(name)


def resolve_dtype(name: str = "float32", option: str = "--dtype"):
    import torch

    check_dtype_name(name, option)
    return getattr(torch, name)


def physical_cores() -> int | None:
    """Physical cores of this machine from /proc/cpuinfo (None where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    pairs, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            pairs.add((phys, value.strip()))
    return len(pairs) or None


def auto_threads() -> int:
    """CPU threads for torch: the CPUs this process may run on, counted as physical cores
    (hyper-threads share one core's arithmetic units), at most MAX_AUTO_THREADS, less the
    cores other work keeps busy (``busy_cores``, at least the 1-minute load average).

    On a shared machine, torch's threads spin-wait for each other at every op; a thread
    that competes with another job for its core stalls all of them. Measured on 2 cores
    with another 2-thread job running: `reproduce` took 17 min 47 s with 2 threads and
    3 min 45 s with 1."""
    return _idle_cores(busy_cores(average=True))


def _idle_cores(busy: int) -> int:
    """The CPUs this process may run on, as physical cores, at most MAX_AUTO_THREADS, less
    ``busy`` (at least 1)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    logical, physical = os.cpu_count() or allowed, physical_cores()
    per_core = max(1, logical // physical) if physical else 1
    cores = max(1, min(MAX_AUTO_THREADS, allowed // per_core))
    return max(1, min(cores, logical - busy) if busy else cores)


def busy_cores(average: bool = False, looks: int = 5) -> int:
    """Cores other work keeps busy now: the tasks running besides this one
    (``procs_running`` in /proc/stat, the median of a few looks 10 ms apart); with
    ``average``, at least the 1-minute load average (rounded). The average lags: it follows
    the running tasks with a one-minute time constant, so ten seconds after another 2-thread
    job starts it reads about 0.3, and it stays up for minutes after one ends. Where
    /proc/stat cannot be read, the average alone."""
    average_busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    counts = []
    for i in range(looks):
        try:
            text = Path("/proc/stat").read_text()
        except OSError:
            return average_busy
        running = next((int(line.split()[1]) for line in text.splitlines()
                        if line.startswith("procs_running ")), None)
        if running is None:
            return average_busy
        counts.append(max(0, running - 1))  # this process is running while it reads
        if i + 1 < looks:
            time.sleep(0.01)
    now = sorted(counts)[len(counts) // 2]
    return max(now, average_busy) if average else now


def auto_workers() -> int:
    """Single-threaded processes for toy ensembles (training/workers.py): the physical cores
    idle right now (``busy_cores`` without the lagging average: processes do not spin-wait
    for each other as threads do, so a wrong guess costs little). On an idle 2-core machine
    two processes ran `reproduce` 1.35 times as fast as one (72.8 vs 98.1 s); beside another
    2-thread job they ran it 12% slower (142.7 vs 125.3 s, mean of two runs each): a
    second process then only adds its own fixed cost."""
    return _idle_cores(busy_cores())


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the
    kernel; True if it now does. Once per process; ``CLT_EVAL_KEEP_FREED_MEMORY=0`` opts out.

    glibc serves every block over 32 MB with its own mmap and unmaps it on free, so each
    large CPU tensor (a CLT's [B,L,F] activations are 0.5 GB) is a fresh mapping that the
    kernel zero-fills page by page on first touch: that costs more than the op that writes
    it. Measured on 2 cores, one ReLU over a [4096, 8, 4096] float32 tensor: 0.22 s with
    glibc's defaults, 0.06 s with freed memory kept. Serving large blocks from the heap
    (no per-block mmap) and never trimming it is what jemalloc or tcmalloc would give; a
    training step allocates the same sizes each time, so the kept memory is reused, and
    the process holds its peak until it exits."""
    global _kept_freed_memory
    if _kept_freed_memory is None:
        _kept_freed_memory = os.environ.get(KEEP_MEMORY_ENV, "1") != "0" and _set_mallopt()
    return _kept_freed_memory


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a glibc system
        return False


def _set_mallopt() -> bool:
    if platform.system() != "Linux" or not _glibc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # M_MMAP_MAX = 0: no block gets its own mapping (glibc still maps when the heap cannot
    # grow). M_TRIM_THRESHOLD at its largest: the heap's top is never given back.
    return (bool(libc.mallopt(_M_MMAP_MAX, _KEPT_MMAP_MAX))
            and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_TRIM_THRESHOLD)))


# ---- subnormal floats ---------------------------------------------------------------------
def subnormals_flushed() -> bool:
    """Is CPU arithmetic flushing subnormal floats to zero right now (``flushed_subnormals``)?
    Threads of our own that compute for torch (``clt_eval.topk``) follow this."""
    return _flushing


@contextlib.contextmanager
def flushed_subnormals(on: bool = True):
    """Within: CPU float arithmetic reads and writes subnormal numbers (below 1.2e-38 in
    float32) as zero, in this thread and in torch's worker threads; yields whether it does.

    Why: Adam's first moment of a weight whose gradient has stopped decays by 0.9 a step
    into the subnormal range and sticks at its smallest value, and x86 CPUs are far slower
    on subnormals (Adam's ``addcdiv_`` ran 8 times as slow at step 1,000 of a toy sweep
    ensemble as at step 5; figures in docs/scale.md). The mode is per thread, so it is also
    set in each of torch's OpenMP threads; where those cannot be reached (another parallel
    backend) and torch uses more than one thread, nothing is flushed, so that no result
    depends on which thread computed it."""
    global _flushing
    was = _flushing
    now = bool(on) and _flush_everywhere(True)
    if not now and was:
        _flush_everywhere(False)
    _flushing = now
    try:
        yield now
    finally:
        if _flushing != was:
            _flush_everywhere(was)
        _flushing = was


def _flush_everywhere(on: bool) -> bool:
    import torch

    if not torch.set_flush_denormal(on):  # this CPU cannot
        return False
    team = _openmp_team()
    if team is None:  # torch's worker threads cannot be reached: flush only if there are none
        if torch.get_num_threads() > 1:
            torch.set_flush_denormal(False)
            return False
        return True
    team(lambda: torch.set_flush_denormal(on), torch.get_num_threads())
    return True


_TEAM_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@functools.cache  # one libgomp for the life of the process (a fork keeps its mapping)
def _openmp_team():
    """``run(fn, n)``: calls ``fn`` once on each of n threads of the OpenMP team that torch's
    parallel regions use (libgomp's ``GOMP_parallel``, the entry point of ``#pragma omp
    parallel``); None where torch does not run on libgomp. The team's threads persist between
    regions, so what ``fn`` sets in them holds for torch's later work."""
    import torch

    maps = Path("/proc/self/maps")
    if "OpenMP" not in torch.__config__.parallel_info() or not maps.exists():
        return None
    # torch's own copy (other packages bring theirs: sentencepiece does), in torch/lib or
    # in the wheel's torch.libs
    home = str(Path(torch.__file__).parent)
    mapped = {line.split()[-1] for line in maps.read_text().splitlines()}
    paths = [p for p in mapped if p.startswith((home + "/", home + ".libs/"))
             and Path(p).name.startswith("libgomp")]
    if len(paths) != 1:
        return None
    try:
        parallel = ctypes.CDLL(paths[0]).GOMP_parallel
    except (OSError, AttributeError):
        return None
    parallel.argtypes = [_TEAM_FN, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None

    def run(fn, n: int) -> None:
        # ctypes releases the GIL for the call; each thread takes it back to run fn
        parallel(_TEAM_FN(lambda _: fn()), None, n, 0)

    return run
