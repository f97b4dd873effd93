"""The training loop: step, log if due, checkpoint-free for toys (callers save at the end).

``train`` eats an iterator of (x_BLD, y_BLD) activation batches (or per-run [R,B,L,D] ones)
and trains every run of a ``Transcoder`` ensemble at once. Runs are independent: the loss is a
sum of per-run losses and Adam is elementwise, so an ensemble of R runs equals R separate
trainings, at a fraction of the cost -- bit for bit on CPU, whatever R and the run's place in
the ensemble (tests/test_run_independence.py). A run that diverges is stopped alone.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from clt_eval.training.config import TrainConfig

from clt_eval.config import LossConfig
from clt_eval.losses import LossPlan, row_mean, training_loss
from clt_eval.transcoder import Transcoder, row_sum

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
    ensemble it is in. ``exact=False`` is faster for large ensembles of small transcoders
    (on the toy, one CPU thread: 7 vs 10.5 ms a step at 30 runs, 23 vs 56 at 360; see
    benchmarks/bench_ensemble.py) but lets rounding depend on the ensemble: BLAS's batched
    matmuls instead of ``run_matmul``, and the fused Adam kernel, which rounds an element
    differently depending on where it lies in the flat parameter (max |Δ| 0.15 between a
    run in a 30-run ensemble and alone after 1,000 steps)."""
    loss_cfg = LossPlan.build(loss_cfg, tc.n_runs)
    kernel = {"foreach": True, "fused": None} if exact else {"foreach": None, "fused": True}
    opt = torch.optim.Adam(tc.parameters(), lr=cfg.lr, **kernel)
    since_fired = torch.zeros(tc.n_runs, tc.cfg.n_layers, tc.cfg.n_features, dtype=torch.long)
    start = 0
    restored = checkpoint.restore(tc, opt) if checkpoint is not None else None
    if restored is not None:
        start, since_fired = restored
        opt.param_groups[0].update(kernel)  # the checkpoint's choice of kernel is not ours
        for _ in range(start):
            next(batches)
        if progress is not None:
            progress.update(start)
    guard = DivergenceGuard(tc, opt, cfg.divergence_factor, run_names)
    was_exact, tc.exact = tc.exact, exact
    tc.train()
    try:
        last = _loop(tc, opt, guard, loss_cfg, coefs_R, batches, cfg, start, since_fired,
                     logger, progress, checkpoint)
    finally:
        tc.exact = was_exact
        tc.eval()
    return last | {"diverged": guard.report()}


def _loop(tc, opt, guard, loss_cfg, coefs_R, batches, cfg, start, since_fired, logger,
          progress, checkpoint) -> dict:
    """Step, log if due, checkpoint if due; returns the last logged values."""
    last: dict = {}
    for step in range(start, cfg.steps):
        parts, out = _step(tc, opt, loss_cfg, coefs_R, next(batches), since_fired, step, cfg,
                           guard)
        with torch.no_grad():
            fired = (out.acts_RBLF > 0).any(1)
            since_fired = torch.where(fired, 0, since_fired + 1)
        if progress is not None:
            progress.update(1)
        if _due(step, cfg.log_every, cfg.steps):
            R, B = out.acts_RBLF.shape[:2]
            l0 = row_sum((out.acts_RBLF > 0).float().reshape(R * B, -1)).view(R, B)
            last = {"loss": parts.total_R.detach(), "mse": parts.mse_R,
                    "sparsity": parts.sparsity_R, "l0": row_mean(l0)}
            if logger is not None:
                logger(step, last)
        if checkpoint is not None and checkpoint.stop_requested:
            checkpoint.save(step + 1, tc, opt, since_fired)
            raise KeyboardInterrupt(f"stopped after step {step + 1}; saved {checkpoint.path}")
        if checkpoint is not None and checkpoint.due(step, cfg.steps):
            checkpoint.save(step + 1, tc, opt, since_fired)
    return last


def _step(tc, opt, loss_cfg, coefs_R, batch, since_fired, step, cfg, guard):
    """One Adam step. The learning rate is set from the step number alone (warm-up, then
    cosine), so a resumed run needs no scheduler state."""
    x, y = batch
    out = tc(x)
    dead = since_fired > cfg.dead_window
    parts = training_loss(tc, out, y, loss_cfg, coefs_R * lambda_factor(step, cfg), dead)
    for group in opt.param_groups:
        group["lr"] = cfg.lr * lr_factor(step, cfg)
    opt.zero_grad(set_to_none=True)
    # Each run's loss depends on its own parameters only, so the gradient of the sum is
    # each run's own gradient, even when another run's loss is inf or NaN.
    parts.total_R.sum().backward()
    guard.check(step, parts.total_R.detach())
    opt.step()
    guard.hold()
    return parts, out


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
        self.idx = torch.tensor([int(r) for r in state["runs"]], dtype=torch.long)
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
                 for v in self.state["first_loss"]], dtype=loss_R.dtype)
        params = list(self.tc.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        if self.idx.numel():
            for g in grads:
                g[self.idx] = 0
        bad = ~(loss_R <= self.limit_R)  # NaN compares false: caught too
        # One sum of norms over every gradient and weight: finite in the common case, and
        # only then (or on a blow-up past ~1e19, which _finite_R tells apart) not. A few ops
        # for the whole ensemble, where a per-run check would cost several per tensor.
        norms = torch._foreach_norm(grads + params)
        tensors_ok = bool(torch.stack(norms).sum().isfinite())
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
        ok = torch.ones(R, dtype=torch.bool)
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
            print(f"clt-eval: warning: run {self.names[r]} diverged at step {step} "
                  f"({reason}); the other runs go on", file=sys.stderr)
        self._freeze(runs)

    def _freeze(self, runs: list[int]) -> None:
        """Add ``runs`` to the frozen set, zeroing any of their tensors that is not finite."""
        new = torch.tensor(runs, dtype=torch.long)
        finite = torch.ones(len(runs), dtype=torch.bool)
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
    order is then part of the run, the same whichever ensemble it trains in."""
    n = x_BLD.shape[0]
    if batch_size <= 0 or batch_size >= n:
        while True:
            yield x_BLD, y_BLD
    shared = isinstance(seed, int)
    gens = [torch.Generator().manual_seed(int(s)) for s in ([seed] if shared else seed)]
    while True:
        perm_RN = torch.stack([torch.randperm(n, generator=g) for g in gens])
        for i in range(0, n - batch_size + 1, batch_size):
            idx_RB = perm_RN[:, i:i + batch_size]
            if shared:
                yield x_BLD[idx_RB[0]], y_BLD[idx_RB[0]]
            else:
                yield x_BLD[idx_RB], y_BLD[idx_RB]
