"""The training loop: step, log if due, checkpoint if due (``training.checkpoint``).

``train`` eats an iterator of (x_BLD, y_BLD) activation batches (or per-run [R,B,L,D] ones)
and trains every run of a ``Transcoder`` ensemble at once. Runs are independent: the loss is a
sum of per-run losses and Adam is elementwise, so an ensemble of R runs equals R separate
trainings, at a fraction of the cost -- bit for bit on CPU, whatever R and the run's place in
the ensemble (tests/test_run_independence.py). A run that diverges is stopped alone.

A resumed run equals an uninterrupted one bit for bit on the CPU: the learning rate and λ
are functions of the step, the checkpoint holds everything else, and the batch order is a
function of the seed and the step alone (``full_batches``), replayed up to the saved step.
With ``torch.distributed`` initialised, gradients are averaged over ranks after each
backward pass (``training.distributed.sync_grads``) and only rank 0 writes checkpoints.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from clt_eval.config import LossConfig
from clt_eval.device import flushed_subnormals, keep_freed_memory
from clt_eval.losses import LossPlan, row_mean, training_loss
from clt_eval.training import distributed
from clt_eval.training.adam import RunwiseAdam
from clt_eval.training.config import TrainConfig
from clt_eval.transcoder import Transcoder

Logger = Callable[[int, dict], None]  # (step, {name: [R] tensor})


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``lr_final_frac``."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    t = (step - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
    return cfg.lr_final_frac + (1 - cfg.lr_final_frac) * 0.5 * (1 + math.cos(math.pi * t))


def lambda_factor(step: int, cfg: TrainConfig) -> float:
    warm = cfg.lambda_warmup_frac * cfg.steps
    return 1.0 if warm <= 0 else min(1.0, step / warm)


def init_b_dec(tc: Transcoder, y_BLD: torch.Tensor) -> None:
    """Start the decoder bias at the mean output, so features only model deviations."""
    with torch.no_grad():
        tc.b_dec.copy_(y_BLD.mean(0).expand_as(tc.b_dec))


def train(tc: Transcoder, loss_cfg: LossConfig | list[LossConfig], coefs_R: torch.Tensor,
          batches: Iterator[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig,
          logger: Logger | None = None, progress=None, checkpoint=None,
          run_names: list[str] | None = None, exact: bool = True) -> dict:
    """Train all runs of ``tc`` in place; returns the last logged values ([R] tensors) and,
    under ``"diverged"``, one entry per run: None or {"step": N, "reason": "..."}.

    ``loss_cfg`` is one config for every run or a list with one per run. With a
    ``training.checkpoint.Checkpoint``, training resumes from its saved state and saves
    when due; the batch iterator is advanced past the steps already done. A run that
    diverges is frozen and named on stderr (``run_names``, else its index); the others go on
    exactly as if it were not there.

    With ``exact`` (the default) every run trains bit for bit as it would alone, whatever
    ensemble it is in (Adam steps through ``training.adam.RunwiseAdam``). ``exact=False``
    is faster for small ensembles of small transcoders and no faster for large ones (on the
    toy's ReLU grid, one CPU thread: 7.6 vs 12.2 ms a step at 30 runs, 33.5 vs 32.6 ms at
    360; benchmarks/bench_ensemble.py, 300 steps, measured while the exact path still used
    torch's multi-tensor Adam) but lets rounding depend on the ensemble:
    BLAS's batched matmuls instead of ``run_matmul``, and torch's fused Adam as it is, which
    rounds an element differently depending on where it lies in the flat parameter (max
    |Δ| 0.15 between a run in a 30-run ensemble and alone after 1,000 steps).

    Training runs on ``cfg.device`` (the transcoder goes there for the loop and comes back
    after it; batches already there are not copied); on the CPU the loop treats subnormal
    floats as zero (``clt_eval.device.flushed_subnormals``). With ``cfg.dtype ==
    "bfloat16"`` the forward pass and loss run under autocast with float32 weights and Adam
    state, and the batched kernels are used (``exact`` is ignored)."""
    device = _resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()  # a step's large tensors reuse the last step's memory
    # In bfloat16 no run is bit-exact anyway, and autocast leaves the exact kernels' elementwise
    # products in float32: the batched kernels are the ones it speeds up.
    exact = exact and cfg.dtype == "float32"
    widths = [c.n_features for c in tc.cfgs] if tc.ragged else None
    loss_cfg = LossPlan.build(loss_cfg, tc.n_runs, widths).to(device)
    home = tc.W_enc.device  # the caller gets the transcoder back where it gave it
    tc.to(device)
    coefs_R = coefs_R.to(device)
    kernel = {"foreach": True, "fused": None} if exact else {"foreach": None, "fused": True}
    opt = (RunwiseAdam(tc.parameters(), lr=cfg.lr) if exact
           else torch.optim.Adam(tc.parameters(), lr=cfg.lr, **kernel))
    since_fired = torch.zeros(tc.n_runs, tc.cfg.n_layers, tc.cfg.n_features, dtype=torch.long,
                              device=device)
    start = 0
    restored = checkpoint.restore(tc, opt) if checkpoint is not None else None
    if restored is not None:
        start, since_fired = restored[0], restored[1].to(device)
        opt.param_groups[0].update(kernel)  # the checkpoint's choice of kernel is not ours
        for _ in range(start):
            next(batches)
        if progress is not None:
            progress.update(start)
    guard = DivergenceGuard(tc, opt, cfg.divergence_factor, run_names)
    was_exact, tc.exact = tc.exact, exact
    tc.train()
    step_fn = _Step(tc, opt, guard, loss_cfg, coefs_R, cfg, device)
    try:
        # Subnormal floats as zero while training on the CPU (much faster once Adam's moments
        # decay into them); evaluation afterwards computes with them as usual.
        with flushed_subnormals(device.type == "cpu"):
            last = _loop(step_fn, batches, start, since_fired, logger, progress, checkpoint)
    finally:
        tc.exact = was_exact
        tc.eval()
        tc.to(home)
    return {k: v.to(home) for k, v in last.items()} | {"diverged": guard.report()}


def _loop(step_fn, batches, start, since_fired, logger, progress, checkpoint) -> dict:
    """Step, log if due, checkpoint if due; returns the last logged values."""
    tc, opt, cfg = step_fn.tc, step_fn.opt, step_fn.cfg
    last: dict = {}
    for step in range(start, cfg.steps):
        parts, out = _step(step_fn, next(batches), since_fired, step)
        with torch.no_grad():
            # on the global batch: every replica must agree on which features are dead
            # (amax > 0: the same answer as (acts > 0).any(1), NaN included, in one pass)
            fired = out.active.fired() if out.active is not None else out.acts_RBLF.amax(1) > 0
            fired = distributed.any_over_ranks(fired)
            since_fired = torch.where(fired, 0, since_fired + 1)
        if progress is not None:
            progress.update(1)
        if _due(step, cfg.log_every, cfg.steps):
            last = {"loss": parts.total_R.detach().float(), "mse": parts.mse_R.float(),
                    "sparsity": parts.sparsity_R.float(), "l0": row_mean(out.l0_RB())}
            # data parallel: the values of the global batch, not of this rank's rows
            last = {k: distributed.mean_over_ranks(v) for k, v in last.items()}
            if logger is not None:
                logger(step, last)
        if checkpoint is not None and checkpoint.stop_requested:
            checkpoint.save(step + 1, tc, opt, since_fired)
            raise KeyboardInterrupt(f"stopped after step {step + 1}; saved {checkpoint.path}")
        if checkpoint is not None and checkpoint.due(step, cfg.steps):
            checkpoint.save(step + 1, tc, opt, since_fired)
    return last


class _Step:
    """What every step needs but the batch, the step number and the dead-feature clock."""

    def __init__(self, tc, opt, guard, loss_cfg, coefs_R, cfg: TrainConfig,
                 device: torch.device):
        self.tc, self.opt, self.guard, self.loss_cfg = tc, opt, guard, loss_cfg
        self.coefs_R, self.cfg, self.device = coefs_R, cfg, device
        # bfloat16 computes the forward pass and loss in bfloat16 where autocast deems it
        # safe; the weights, their gradients and Adam's moments stay float32.
        self.autocast = _resolve_dtype(cfg.dtype) == torch.bfloat16


def _step(s: _Step, batch, since_fired, step):
    """One Adam step. The learning rate is set from the step number alone (warm-up, then
    cosine), so a resumed run needs no scheduler state."""
    tc, opt, cfg = s.tc, s.opt, s.cfg
    # A no-op when the data already lives on the device (train_group moves it there once).
    x, y = (t.to(s.device, non_blocking=True) for t in batch)
    dead = since_fired > cfg.dead_window
    with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.autocast):
        out = tc(x)
        parts = training_loss(tc, out, y, s.loss_cfg, s.coefs_R * lambda_factor(step, cfg),
                              dead)
    for group in opt.param_groups:
        group["lr"] = cfg.lr * lr_factor(step, cfg)
    opt.zero_grad(set_to_none=True)
    # Each run's loss depends on its own parameters only, so the gradient of the sum is
    # each run's own gradient, even when another run's loss is inf or NaN.
    parts.total_R.sum().backward()
    distributed.sync_grads(tc)  # data-parallel: every replica steps with the mean gradient
    # The mean loss over replicas, so that every replica stops the same runs.
    s.guard.check(step, distributed.mean_over_ranks(parts.total_R.detach().float()))
    opt.step()
    s.guard.hold()
    return parts, out


def _resolve_device(name: str) -> torch.device:
    from clt_eval.device import resolve_device

    return resolve_device(name, "device")


def _resolve_dtype(name: str) -> torch.dtype:
    from clt_eval.device import resolve_dtype

    return resolve_dtype(name, "dtype")


class DivergenceGuard:
    """Stops runs whose loss, gradients or weights stop being finite, or whose loss grows
    past ``factor`` times its first value, without disturbing the other runs. The check runs
    before Adam's step, so a run never takes a non-finite update.

    A stopped run is frozen: its gradients are zeroed before every Adam step (so nothing
    non-finite enters Adam's moments) and its tensors are written back after it, at the
    state in which it was caught if that is finite, else at zero. Its record (step, reason)
    and every run's first loss live in the optimiser's param group, which a checkpoint
    saves, so a resumed ensemble remembers them.
    """

    KEY = "divergence"

    def __init__(self, tc: Transcoder, opt, factor: float, names: list[str] | None = None):
        self.tc, self.opt, self.factor = tc, opt, factor
        self.names = names or [str(r) for r in range(tc.n_runs)]
        state = opt.param_groups[0].setdefault(self.KEY, {"first_loss": None, "runs": {}})
        self.state = state
        self.frozen: dict[str, torch.Tensor] = {}
        self.limit_R: torch.Tensor | None = None  # set at the first check
        self.device = tc.W_enc.device
        self.idx = torch.tensor([int(r) for r in state["runs"]], dtype=torch.long,
                                device=self.device)
        if len(self.idx):  # resumed: the checkpoint holds the frozen values
            self._snapshot()

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every trained or running-estimate tensor of the ensemble ([R, ...] each)."""
        named = dict(self.tc.named_parameters())
        named["batchtopk_threshold"] = self.tc.batchtopk_threshold
        return named

    def _snapshot(self) -> None:
        self.frozen = {n: t.detach()[self.idx].clone() for n, t in self._tensors().items()}

    @torch.no_grad()
    def check(self, step: int, loss_R: torch.Tensor) -> None:
        """Catch new divergences from this step's loss, gradients and weights (before Adam
        uses them); stopped runs get zero gradients."""
        if self.state["first_loss"] is None:
            self.state["first_loss"] = [float(v) if math.isfinite(v) else None
                                        for v in loss_R.tolist()]
        if self.limit_R is None:  # factor x first loss, else the largest finite loss
            big = torch.finfo(loss_R.dtype).max
            self.limit_R = torch.tensor(
                [big if v is None or self.factor == 0 else min(big, self.factor * v)
                 for v in self.state["first_loss"]], dtype=loss_R.dtype, device=loss_R.device)
        params = list(self.tc.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        if self.idx.numel():
            for g in grads:
                g[self.idx] = 0
        bad = ~(loss_R <= self.limit_R)  # NaN compares false: caught too
        # One sum over every gradient and weight: finite when they all are, and only then
        # (or on a blow-up past ~1e38, which _finite_R tells apart) not. A few ops for the
        # whole ensemble, where a per-run check would cost several per tensor. Plain sums,
        # not norms: on the CPU torch's norm kernels took 3 times as long (8.0 vs 2.6 ms
        # over a TopK transcoder's 8,192 x 512 weights and gradients).
        tensors_ok = bool(torch.stack([t.sum() for t in grads + params]).sum().isfinite())
        finite_R = torch.ones_like(bad) if tensors_ok else self._finite_R(grads + params)
        bad |= ~finite_R
        if self.idx.numel():
            bad[self.idx] = False
        if bool(bad.any()):
            self._stop(step, bad.nonzero().flatten().tolist(), loss_R, finite_R)
            for g in grads:
                g[self.idx] = 0

    def _finite_R(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """[R] bool: are all of a run's values finite?"""
        R = self.tc.n_runs
        ok = torch.ones(R, dtype=torch.bool, device=tensors[0].device)
        for t in tensors:
            ok &= t.detach().isfinite().view(R, -1).all(1)
        return ok

    def _stop(self, step: int, runs: list[int], loss_R, finite_R) -> None:
        for r in runs:
            loss = float(loss_R[r])
            reason = (f"loss {loss:g}" if not math.isfinite(loss) else
                      "non-finite gradient or weight" if not bool(finite_R[r]) else
                      f"loss {loss:.4g} > {self.factor:g} x first loss "
                      f"{self.state['first_loss'][r]:.4g}")
            self.state["runs"][str(r)] = {"step": step, "reason": reason}
            # tqdm.write: on a line of its own, above a progress bar if one is drawn.
            tqdm.write(f"clt-eval: warning: run {self.names[r]} diverged at step {step} "
                       f"({reason}); the other runs go on", file=sys.stderr)
        self._freeze(runs)

    def _freeze(self, runs: list[int]) -> None:
        """Add ``runs`` to the frozen set, zeroing any of their tensors that is not finite."""
        new = torch.tensor(runs, dtype=torch.long, device=self.device)
        finite = torch.ones(len(runs), dtype=torch.bool, device=self.device)
        for t in self._tensors().values():
            finite &= t.detach()[new].isfinite().view(len(runs), -1).all(1)
        for t in self._tensors().values():
            t.data[new[~finite]] = 0
        self.idx = torch.cat([self.idx, new]).sort().values
        self._snapshot()

    @torch.no_grad()
    def hold(self) -> None:
        """Write the frozen runs' tensors back after the optimiser (and BatchTopK's running
        threshold) moved them."""
        if not self.idx.numel():
            return
        for n, t in self._tensors().items():
            t.data[self.idx] = self.frozen[n]

    def report(self) -> list[dict | None]:
        runs = self.state["runs"]
        return [dict(runs[str(r)]) if str(r) in runs else None for r in range(self.tc.n_runs)]


def _due(step: int, every: int, total: int) -> bool:
    return step == total - 1 or (every > 0 and step % every == 0)


def full_batches(x_BLD: torch.Tensor, y_BLD: torch.Tensor, batch_size: int = 0,
                 seed: int | Sequence[int] = 0):
    """Endless batches from a fixed data set: the whole set, or shuffled minibatches.

    With one ``seed`` every run sees the same minibatches, [B,L,D]. With one seed per run,
    each run shuffles with its own seed and gets its own minibatches, [R,B,L,D]: a run's batch
    order is then part of the run, the same whichever ensemble it trains in. Either way the
    n-th batch depends on the seed(s) and n alone, so a resumed run that draws and drops the
    batches of the steps it has done gets the very batches of an uninterrupted one. Batches
    are indexed on the data's device: give it the data set there once."""
    n = x_BLD.shape[0]
    if batch_size <= 0 or batch_size >= n:
        while True:
            yield x_BLD, y_BLD
    shared = isinstance(seed, int)
    gens = [torch.Generator().manual_seed(int(s)) for s in ([seed] if shared else seed)]
    while True:
        # Drawn on the CPU (the generators live there), moved once per epoch.
        perm_RN = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(x_BLD.device)
        for i in range(0, n - batch_size + 1, batch_size):
            idx_RB = perm_RN[:, i:i + batch_size]
            if shared:
                yield x_BLD[idx_RB[0]], y_BLD[idx_RB[0]]
            else:
                yield x_BLD[idx_RB], y_BLD[idx_RB]
