"""Train transcoders on a real (or tiny random) language model: `clt-eval train --model ...`.

The model, its layer window, the hook names and the corpus are all checked before anything is
written. Then the corpus is tokenised into windows; the last ``eval_tokens`` worth are held out;
an ``ActivationSource`` collects (MLP input, MLP output) pairs of the rest, cached on disk by
default (``LMDataConfig.cache``; a second run on the same model, layers, hooks and corpus
reads the cache instead of running the model). The existing trainer trains one vectorised
ensemble per ensemble key (PLT and CLT, λ and seed vary inside one) on activations rescaled
by one scalar per layer (folded back into the weights afterwards, so saved transcoders act on
the model's raw activations); each run draws its own minibatches, a pure function of its seed
and the step (``StepBatches``). The training activations are held in memory for that:
n_tokens × layers × d_model × 8 bytes (x and y in float32), 0.28 GB for 20,000 tokens of three
SmolLM2 layers. Each run that did not diverge is evaluated on the held-out tokens (NMSE, L0
and dead features per layer) and saved with its window, model and corpus in
``config.json``'s ``extra``; a diverged run is recorded (step and reason, every metric None)
and not saved. Interrupted training resumes: see ``train_on_model``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clt_eval.errors import check_choice, require
from clt_eval.lm.window import DEFAULT_INPUT_HOOK, DEFAULT_OUTPUT_HOOK, LayerWindow
from clt_eval.training.config import WANDB_MODES, RunSpec, TrainConfig

if TYPE_CHECKING:
    from clt_eval.transcoder import Transcoder

# torch and everything built on it is imported inside the functions: the CLI imports this
# module for LMDataConfig, and `clt-eval --help` must stay fast (docs/concepts.md §7).

# TrainConfig.batch_size = 0 means "the whole data set" for the toy; a language model's data
# set does not fit one step, so 0 means this many tokens per step here.
DEFAULT_LM_BATCH = 1024


@dataclass(frozen=True)
class LMDataConfig:
    """Where training activations come from. The CLI mirrors these fields."""

    model: str = "tiny"
    layers: tuple[int, ...] = (0,)
    corpus: str = "bible"
    n_tokens: int = 20_000  # training tokens (windows × n_ctx, BOS included)
    eval_tokens: int = 4096  # held-out tokens after the training ones
    n_ctx: int = 128
    input_hook: str = DEFAULT_INPUT_HOOK
    output_hook: str = DEFAULT_OUTPUT_HOOK
    # Activations are cached (safetensors shards) by default, so a second run on the same
    # model, layers, hooks and corpus skips the forward passes: under ``cache_dir`` if given,
    # else under ``default_cache_dir()``. ``cache=False`` (--no-cache) streams instead.
    cache_dir: str | None = None
    cache: bool = True
    model_batch: int = 8  # windows per forward pass
    drop_first: bool = True  # drop position 0 (BOS, the attention sink's outliers)
    # Train on per-layer rescaled activations (λ then applies in those units); the scales are
    # folded back into the saved weights. See lm_train.layer_scales.
    normalize: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        self.window()  # checks layers and hook templates
        for name in ("n_tokens", "eval_tokens", "n_ctx", "model_batch"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                    f"{name}={v!r}: expected an integer > 0")
        require(self.n_ctx >= 2, f"n_ctx={self.n_ctx}: expected at least 2")
        require(self.n_tokens >= self.n_ctx and self.eval_tokens >= self.n_ctx,
                f"n_tokens={self.n_tokens}, eval_tokens={self.eval_tokens}: expected each at "
                f"least n_ctx={self.n_ctx}")

    def window(self) -> LayerWindow:
        return LayerWindow(self.layers, self.input_hook, self.output_hook, self.model)

    def to_dict(self) -> dict:
        return asdict(self) | {"layers": list(self.layers)}

    def resolved_cache_dir(self) -> Path | None:
        """The activation cache folder this run uses, or None when it streams."""
        if not self.cache:
            return None
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir(self)


def default_cache_dir(data: LMDataConfig) -> Path:
    """``$CLT_EVAL_CACHE/activations/<model>-<key>`` (``~/.cache/clt-eval`` without the
    variable), the key a hash of everything that decides the activations: the model (and,
    for a file or folder, its size and modification time), layers, hooks, corpus (likewise),
    token counts, context length and whether the first position is dropped."""
    from clt_eval.lm.models import cache_root

    ident = {"model": _stamp(data.model), "corpus": _stamp(data.corpus),
             "layers": list(data.layers), "input_hook": data.input_hook,
             "output_hook": data.output_hook, "n_tokens": data.n_tokens,
             "eval_tokens": data.eval_tokens, "n_ctx": data.n_ctx,
             "drop_first": data.drop_first}
    key = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(data.model).name)
    return cache_root() / "activations" / f"{name[:40]}-{key}"


def _stamp(name: str):
    """A model or corpus name, or for an existing path: the path, size and mtime (a rewritten
    file gets a new cache instead of a mismatch error)."""
    path = Path(name)
    if not path.exists():
        return name
    files = [path / "config.json", *sorted(path.glob("*.safetensors"))] if path.is_dir() \
        else [path]
    return [str(path.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                    for f in files if f.is_file()]


@dataclass
class LMData:
    model: object
    window: LayerWindow
    train: object  # ActivationSource
    eval: object  # ActivationSource


def prepare(data: LMDataConfig, batch_size: int, model=None, progress: bool = True) -> LMData:
    """Load and check everything; tokenise; build the train and eval sources. Writes nothing
    (caches are built on first use)."""
    from clt_eval.lm.activations import ActivationSource, check_window
    from clt_eval.lm.corpus import check_corpus, corpus_windows
    from clt_eval.lm.models import load_model

    window = data.window()
    check_corpus(data.corpus)
    model = load_model(data.model) if model is None else model
    check_window(model, window)
    require(data.n_ctx <= model.cfg.n_ctx,
            f"n_ctx={data.n_ctx}: longer than the model's context of {model.cfg.n_ctx}")
    tokens = corpus_windows(data.corpus, getattr(model, "tokenizer", None), model.cfg.d_vocab,
                            data.n_ctx, data.n_tokens + data.eval_tokens)
    n_eval = max(1, data.eval_tokens // data.n_ctx)
    require(len(tokens) > n_eval, f"corpus={data.corpus!r}: only {len(tokens)} windows of "
            f"{data.n_ctx} tokens; expected more than the {n_eval} held out for evaluation")
    cache = data.resolved_cache_dir()
    meta = {"model": data.model, "corpus": data.corpus}

    def source(toks, sub, bs):
        return ActivationSource(model, window, toks, batch_size=bs, drop_first=data.drop_first,
                                model_batch=data.model_batch, meta=meta, progress=progress,
                                cache_dir=None if cache is None else cache / sub)

    return LMData(model, window, source(tokens[:-n_eval], "train", batch_size),
                  source(tokens[-n_eval:], "eval", 1024))


def evaluate_lm(tc: Transcoder, eval_source) -> list[dict]:
    """Per-run NMSE, L0 and dead fraction per layer on held-out tokens (clt_eval.metrics)."""
    import torch

    from clt_eval.metrics import dead_fraction, l0_per_layer, nmse_per_layer

    tc.eval()
    x, y = eval_source.collect()
    with torch.no_grad():
        outs = [tc(x[i:i + 1024]) for i in range(0, len(x), 1024)]
    recon = torch.cat([o.recon_RBLD for o in outs], 1)
    acts = torch.cat([o.acts_RBLF for o in outs], 1)
    nmse, l0, dead = nmse_per_layer(recon, y), l0_per_layer(acts), dead_fraction(acts)
    return [{"nmse": float(nmse[r].nanmean()), "nmse_per_layer": nmse[r].tolist(),
             "l0_per_layer": l0[r].tolist(), "l0_total": float(l0[r].sum()),
             "dead_fraction_per_layer": dead[r].tolist(), "n_eval_tokens": len(x)}
            for r in range(tc.n_runs)]


def layer_scales(x_NLD, y_NLD, d_model: int):
    """Per-layer scalars (s_x [L], s_y [L]) that bring E‖x_ℓ‖² to d_model and E‖y_ℓ‖² to 1.

    The transcoder's initialisation (encoder rows ~ U(±1/√D), decoder vectors of norm 0.1)
    gives pre-activations of order 1 for inputs of norm √D and outputs of order 1, which is
    where Adam with the trainer's learning rates converges well; SmolLM2's MLP outputs have
    norms of 30-40 instead (measured), and training on them raw needs many more steps. One
    scalar per layer also stops the layer with the largest outputs from dominating the loss.
    Scalars, not per-dimension standardisation, so no dimension is ever divided by a
    near-zero std (docs/concepts.md §4); a layer that is all zeros keeps the scale 1.
    """
    import torch

    mx, my = x_NLD.pow(2).sum(-1).mean(0), y_NLD.pow(2).sum(-1).mean(0)
    s_x = torch.where(mx > 0, (d_model / mx.clamp_min(1e-30)).sqrt(), torch.ones_like(mx))
    s_y = torch.where(my > 0, my.clamp_min(1e-30).rsqrt(), torch.ones_like(my))
    return s_x, s_y


def fold_scales(tc: Transcoder, s_x, s_y) -> None:
    """Rewrite ``tc``, trained on (s_x·x, s_y·y), to act on raw x and y: the same features
    and activations, outputs divided by s_y. Thresholds compare pre-activations, which do not
    change, so they stay."""
    import torch

    with torch.no_grad():
        tc.W_enc.mul_(s_x[None, :, None, None])
        for s, W in enumerate(tc.decoder_params()):  # [R, F, T_s, D]: scaled by target t
            W.div_(s_y[s:s + W.shape[2], None])
        tc.b_dec.div_(s_y[None, :, None])
        if tc.W_skip is not None:
            tc.W_skip.mul_((s_x / s_y)[None, :, None, None])


CHECKPOINT_EVERY = 250  # steps between checkpoints (a few seconds of SmolLM2 training)


class StepBatches:
    """Endless minibatches where the batch at step t is a pure function of (seed, t).

    Each run draws from its own seed, so a run sees the same batches whichever ensemble it
    trains in and whether or not training was interrupted and resumed. Epoch e is a random
    permutation of the samples drawn from a generator seeded by (seed, e); step t takes the
    slice t mod (N // B) of epoch t div (N // B), so the few samples past the last full
    batch of an epoch are skipped (different ones each epoch). One seed for every run gives
    [B, L, D] batches; otherwise [R, B, L, D]."""

    def __init__(self, x_NLD, y_NLD, batch_size: int, seeds: list[int]):
        self.x, self.y, self.seeds = x_NLD, y_NLD, list(seeds)
        self.n = len(x_NLD)
        self.batch = min(batch_size, self.n)
        self.per_epoch = self.n // self.batch
        self.step = 0
        self._perms: dict[tuple[int, int], object] = {}

    def __iter__(self):
        return self

    def indices(self, seed: int, step: int):
        import torch

        epoch, i = divmod(step, self.per_epoch)
        key = (seed, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[1] == epoch}  # keep one
            mixed = int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:7],
                                   "big")
            self._perms[key] = torch.randperm(self.n,
                                              generator=torch.Generator().manual_seed(mixed))
        return self._perms[key][i * self.batch:(i + 1) * self.batch]

    def __next__(self):
        import torch

        step, self.step = self.step, self.step + 1
        if len(set(self.seeds)) == 1:
            idx = self.indices(self.seeds[0], step)
            return self.x[idx], self.y[idx]
        idx = torch.stack([self.indices(s, step) for s in self.seeds])
        return self.x[idx], self.y[idx]


def train_group(specs: list[RunSpec], lm: LMData, train_cfg: TrainConfig, logger=None,
                progress=None, normalize: bool = True,
                checkpoint=None) -> tuple[Transcoder, list[dict]]:
    """Train one ensemble of compatible runs on the model's activations; evaluate the runs
    that did not diverge (a diverged run's metrics are None but for ``diverged``).

    The training activations are held in memory (read once from the cache, or from the
    model when streaming), so any step's batch can be drawn directly (``StepBatches``).
    With ``normalize``, training sees per-layer rescaled activations (``layer_scales``) and
    the scales are folded back into the weights afterwards, so the saved transcoders read and
    write the model's raw activations."""
    import torch

    from clt_eval.training import distributed
    from clt_eval.training.experiment import record, run_id
    from clt_eval.training.trainer import init_b_dec, train
    from clt_eval.transcoder import Transcoder

    cfgs = [s.transcoder_config(lm.train.d_model, lm.window.n_layers) for s in specs]
    tc = Transcoder(cfgs, seeds=[s.seed for s in specs])
    x, y = lm.train.collect()
    L = lm.window.n_layers
    s_x, s_y = layer_scales(x, y, lm.train.d_model) if normalize else (torch.ones(L),) * 2
    x.mul_(s_x[:, None])  # in place: collect() returned fresh tensors, and a copy would
    y.mul_(s_y[:, None])  # double the memory the training set takes
    init_b_dec(tc, y)
    # Scales and b_dec above read the whole training set, the same on every rank; each rank
    # of a data-parallel job then trains on its own rows of every global batch.
    batches = distributed.local_batches(
        StepBatches(x, y, lm.train.batch_size, [s.seed for s in specs]))
    coefs = torch.tensor([s.sparsity_coef for s in specs])
    final = train(tc, [s.loss_config() for s in specs], coefs, batches, train_cfg, logger,
                  progress, checkpoint, run_names=[run_id(s) for s in specs])
    for key in ("loss", "mse"):  # each rank's are its own rows': their mean is the batch's
        final[key] = distributed.mean_over_ranks(final[key])
    fold_scales(tc, s_x, s_y)
    metrics = _evaluate_finite(tc, lm, final, s_x, s_y)
    return tc, [record(s, m) for s, m in zip(specs, metrics, strict=True)]


def _evaluate_finite(tc, lm: LMData, final: dict, s_x, s_y) -> list[dict]:
    """Metrics of the runs that trained to the end; None-valued ones for diverged runs."""
    diverged = final["diverged"]
    ok = [i for i, d in enumerate(diverged) if d is None]
    metrics: list[dict] = [{} for _ in diverged]
    if ok:
        sub = tc if len(ok) == len(diverged) else tc.select(ok)
        for i, m in zip(ok, evaluate_lm(sub, lm.eval), strict=True):
            m["final_loss"] = float(final["loss"][i])
            m["final_train_mse"] = float(final["mse"][i])  # in the scaled units training saw
            m["scale_x"], m["scale_y"] = s_x.tolist(), s_y.tolist()
            metrics[i] = m
    keys = list(metrics[ok[0]]) if ok else ["final_loss", "final_train_mse"]
    return [m | {"diverged": None} if d is None else dict.fromkeys(keys) | {"diverged": d}
            for m, d in zip(metrics, diverged, strict=True)]


def train_on_model(data: LMDataConfig, specs: list[RunSpec], train_cfg: TrainConfig,
                   out: str | Path, wandb_mode: str = "offline", model=None) -> Path:
    """Train ``specs`` on ``data``'s model and corpus; save each transcoder under
    ``out/transcoders/<run_id>`` and every run's metrics in ``out/results.json``.

    Rerunning the same command into the same ``out`` resumes: finished ensembles (their
    records under ``out/groups``) are not trained again, and an interrupted one continues
    from its last checkpoint (``out/checkpoints``, every CHECKPOINT_EVERY steps, and on
    Ctrl-C or SIGTERM at the end of the current step)."""
    from tqdm.auto import tqdm

    from clt_eval.atomic import nan_to_none, write_json_atomic
    from clt_eval.training import distributed
    from clt_eval.training.checkpoint import is_main, stop_gracefully
    from clt_eval.training.experiment import check_unique, group_specs
    from clt_eval.training.wandb_logger import WandbLogger

    out = Path(out)
    check_choice("wandb_mode", wandb_mode, WANDB_MODES)
    check_unique(specs)
    require(not out.exists() or out.is_dir(), f"out={str(out)!r}: exists and is not a folder")
    # Fails before writing. Data-parallel ranks read the activation caches rank 0 has filled.
    lm = distributed.main_first(lambda: _prepare_shared(data, train_cfg, model))
    logger = WandbLogger(wandb_mode, group=f"lm-{out.name}", root=out)
    groups = group_specs(specs)
    records: list[dict] = []
    active: list = [None]
    with tqdm(total=len(groups) * train_cfg.steps, desc="training", unit="step",
              disable=not is_main()) as bar, stop_gracefully(lambda: active[0]):
        for group in groups:
            records += _group_records(group, lm, data, train_cfg, logger, bar, out, active)
    if not is_main():  # data-parallel replicas hold the same records: rank 0 writes them
        return out / "results.json"
    return write_json_atomic(out / "results.json", nan_to_none({
        "model": data.model, "window": lm.window.to_dict(), "data": data.to_dict(),
        "n_train_tokens": lm.train.n_tokens, "n_eval_tokens": lm.eval.n_tokens,
        "train": asdict(train_cfg), "runs": records}))


def _prepare_shared(data: LMDataConfig, train_cfg: TrainConfig, model) -> LMData:
    """``prepare``; with data-parallel ranks, also the train and eval activation caches
    built at once (on rank 0, by ``main_first``): built on first use instead, the ranks would
    all write the same cache folders at the same time."""
    from clt_eval.training import distributed

    lm = prepare(data, train_cfg.batch_size or DEFAULT_LM_BATCH, model)
    if distributed.world_size() > 1:
        for source in (lm.train, lm.eval):
            if source.cache_dir is not None:
                source.ensure_cache()
    return lm


def _group_key(group: list[RunSpec], data: LMDataConfig, train_cfg: TrainConfig) -> str:
    """Names an ensemble's checkpoint and finished-records file: its runs, training settings
    and data (not where activations are cached, which changes nothing trained)."""
    from clt_eval.training.experiment import run_id

    d = {k: v for k, v in data.to_dict().items() if k not in ("cache", "cache_dir")}
    key = json.dumps([[run_id(s) for s in group], asdict(train_cfg), d], sort_keys=True,
                     default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _group_records(group, lm, data, train_cfg, logger, bar, out: Path, active: list):
    """The records of one ensemble: read back if it finished before, else trained (resuming
    from its checkpoint), saved and written to ``out/groups/<key>.json``."""
    from clt_eval.atomic import nan_to_none, write_json_atomic
    from clt_eval.training.checkpoint import Checkpoint, is_main

    key = _group_key(group, data, train_cfg)
    done = out / "groups" / f"{key}.json"
    if done.is_file():
        bar.update(train_cfg.steps)
        return json.loads(done.read_text())["runs"]
    active[0] = Checkpoint(out / "checkpoints" / f"{key}.safetensors", CHECKPOINT_EVERY)
    records = _train_log_save(group, lm, data, train_cfg, logger, bar, out, active[0])
    if is_main():
        write_json_atomic(done, nan_to_none({"runs": records}))
    active[0].remove()
    stop = active[0].stop_requested
    active[0] = None
    if stop:  # a signal that came during evaluation or saving: the ensemble is kept
        raise KeyboardInterrupt("stopped between ensembles")
    return records


def _train_log_save(group, lm: LMData, data: LMDataConfig, train_cfg, logger, bar, out: Path,
                    checkpoint=None):
    """One ensemble, one wandb run per member transcoder (flat config, history of its loss,
    MSE, sparsity and L0); then each member that did not diverge saved with its window and
    metadata."""
    from clt_eval.io import save_transcoder
    from clt_eval.training.checkpoint import is_main
    from clt_eval.training.experiment import flat_record, run_id

    ids = [run_id(s) for s in group]
    common = {"model": data.model, "layers": list(data.layers), "corpus": data.corpus,
              "n_tokens": data.n_tokens, "n_ctx": data.n_ctx, "input_hook": data.input_hook,
              "output_hook": data.output_hook, "steps": train_cfg.steps, "lr": train_cfg.lr,
              "batch_size": lm.train.batch_size}
    logger.start_runs(ids, [common | s.to_dict() | {"run_id": i}
                            for i, s in zip(ids, group, strict=True)])
    try:
        tc, records = train_group(group, lm, train_cfg, logger.runs_logger(), bar,
                                  normalize=data.normalize, checkpoint=checkpoint)
    except BaseException:
        logger.finish()  # close the wandb runs cleanly; the checkpoint holds the state
        raise
    logger.finish_runs([flat_record(r) for r in records])
    for i, (spec, rid) in enumerate(zip(group, ids, strict=True)):
        m = records[i]["metrics"]
        if not is_main():
            continue  # data-parallel replicas hold the same weights: rank 0 saves them
        if m["diverged"] is not None:
            continue  # a diverged run's weights are no result: nothing is saved for it
        save_transcoder(tc.select([i]), out / "transcoders" / rid,
                        extra={"window": lm.window.to_dict(), "model": data.model,
                               "corpus": data.corpus, "run": spec.to_dict(),
                               "data": data.to_dict(), "train": asdict(train_cfg),
                               "training_scales": {"x": m["scale_x"], "y": m["scale_y"]}})
    return records
