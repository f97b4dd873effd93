"""Mid-training checkpoints for one ensemble, so an interrupted sweep repeats no step.

The whole training state goes into one safetensors file, written atomically: the
transcoder's tensors, Adam's moments, and the steps since each feature last fired (AuxK's
dead-feature clock). The step and Adam's hyper-parameters go into the file's string
metadata. The learning rate is a pure function of the step (``lr_factor``), so nothing else
is needed to continue exactly where training stopped: a resumed run equals an uninterrupted
one bit for bit (tests/test_sweep.py checks this).

Batches are global and every data-parallel replica holds the same state, so a checkpoint
resumes on any number of ranks that divides the batch (tests/test_distributed.py: saved by 2
ranks, resumed by 1, and the other way round); the file records the world size it was saved
under (``dist.world_size`` in its metadata).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import tempfile
import threading
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from clt_eval.errors import CltEvalError


class Checkpoint:
    def __init__(self, path: str | Path, every: int, whole: Checkpoint | None = None,
                 stop_event=None):
        """``whole`` and ``stop_event``: for one part's checkpoint (``part``)."""
        self.path, self.every, self.whole, self.stop_event = Path(path), every, whole, stop_event
        self._stop = False

    @property
    def stop_requested(self) -> bool:
        return (self._stop or (self.whole is not None and self.whole.stop_requested)
                or (self.stop_event is not None and self.stop_event.is_set()))

    def request_stop(self) -> None:
        """Ask the trainer to save at the end of the current step and stop (Ctrl-C, SIGTERM):
        the state is saved between steps, never halfway through an optimiser update."""
        self._stop = True

    def part(self, i: int, n: int, stop_event=None) -> Checkpoint:
        """The checkpoint of part ``i`` (0-based) of ``n`` of this ensemble, trained by a
        process of its own (training/workers.py). It stops when this one is asked to (in
        the process that holds this one) or when ``stop_event`` (shared by the processes) is
        set; a resumed sweep cut into the same number of parts finds it."""
        name = f"{self.path.stem}.part{i + 1}of{n}{self.path.suffix}"
        return Checkpoint(self.path.with_name(name), self.every, whole=self,
                          stop_event=stop_event)

    def due(self, step: int, total: int) -> bool:
        """Save after ``step`` (0-based) every ``every`` steps, never after the last one."""
        return self.every > 0 and (step + 1) % self.every == 0 and step + 1 < total

    def save(self, next_step: int, tc: torch.nn.Module, opt, since_fired_RLF) -> None:
        if not is_main():
            return  # data-parallel replicas hold the same state: rank 0 writes it
        tensors = {f"model.{k}": _host(v) for k, v in tc.state_dict().items()}
        opt_state = opt.state_dict()
        for i, st in opt_state["state"].items():
            for key, v in st.items():
                tensors[f"opt.{i}.{key}"] = _host(torch.as_tensor(v))
        tensors["since_fired"] = _host(since_fired_RLF)
        from clt_eval.training.distributed import META_WORLD_SIZE, world_size

        meta = {"next_step": str(next_step), "param_groups": json.dumps(opt_state["param_groups"]),
                META_WORLD_SIZE: str(world_size())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        os.close(fd)
        try:
            safetensors.torch.save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def restore(self, tc: torch.nn.Module, opt) -> tuple[int, torch.Tensor] | None:
        """Load the saved state into ``tc`` and ``opt``; (next step, since_fired) or None."""
        if not self.path.exists():
            return None
        try:
            with safetensors.safe_open(str(self.path), "pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, safetensors.SafetensorError) as exc:
            raise CltEvalError(f"{self.path}: unreadable checkpoint ({exc}); delete it to "
                               "restart this ensemble from step 0") from None
        # Checked before anything is loaded, so a refused checkpoint leaves tc and opt as
        # they were.
        if "model.W_dec" in tensors:
            raise CltEvalError(f"{self.path}: checkpoint written before decoders were stored "
                               "per source layer (one dense 'model.W_dec'); its optimiser state "
                               "does not fit the current parameters. Delete it to restart this "
                               "ensemble from step 0")
        try:
            tc.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            opt.load_state_dict(_opt_state(tensors, meta))
        except (KeyError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CltEvalError(f"{self.path}: checkpoint does not fit this ensemble ({first}); "
                               "delete it to restart this ensemble from step 0") from None
        return int(meta["next_step"]), tensors["since_fired"]

    def remove(self) -> None:
        """Delete this checkpoint and those of its parts, however many there were."""
        if is_main():
            self.path.unlink(missing_ok=True)
            stem = glob.escape(self.path.stem)
            for part in self.path.parent.glob(f"{stem}.part*of*{self.path.suffix}"):
                part.unlink(missing_ok=True)


def _opt_state(tensors: dict, meta: dict) -> dict:
    """The optimiser's state dict from the checkpoint's ``opt.{param}.{key}`` tensors."""
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}


def _host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy that owns its memory (safetensors writes host tensors)."""
    return t.detach().to("cpu").contiguous().clone()


def is_main() -> bool:
    """Does this process write files? Only rank 0 of a data-parallel job; always without one."""
    try:
        from clt_eval.training import distributed
    except ModuleNotFoundError as exc:
        if exc.name != "clt_eval.training.distributed":
            raise
        return True
    return distributed.is_main()


@contextlib.contextmanager
def stop_gracefully(get_checkpoint):
    """While active, SIGINT and SIGTERM ask the current checkpoint (``get_checkpoint()``) to
    save and stop at the next step boundary instead of killing the process mid-step. A second
    signal, or one with no training under way, interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        ckpt = get_checkpoint()
        if ckpt is None or ckpt.stop_requested:
            raise KeyboardInterrupt
        ckpt.request_stop()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
