"""Train transcoders on a real (or tiny random) language model: `clt-eval train --model ...`.

The model, its layer window, the hook names and the corpus are all checked before anything is
written. Then the corpus is tokenised into windows; the last ``eval_tokens`` worth are held out;
an ``ActivationSource`` streams (MLP input, MLP output) pairs of the rest into the existing
trainer, one vectorised ensemble per ensemble key (PLT and CLT, λ and seed vary inside one),
on activations rescaled by one scalar per layer (folded back into the weights afterwards, so
saved transcoders act on the model's raw activations). Each run is evaluated on the held-out
tokens (NMSE, L0 and dead features per layer) and saved with its window, model and corpus in
``config.json``'s ``extra``.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clt_eval.training.config import WANDB_MODES, RunSpec, TrainConfig

from clt_eval.errors import check_choice, require
from clt_eval.lm.window import DEFAULT_INPUT_HOOK, DEFAULT_OUTPUT_HOOK, LayerWindow

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
    cache_dir: str | None = None  # activation cache (safetensors shards); None: stream
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
    cache = None if data.cache_dir is None else Path(data.cache_dir)
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


def layer_scales(batches: list, d_model: int):
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

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    mx, my = x.pow(2).sum(-1).mean(0), y.pow(2).sum(-1).mean(0)
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
        tc.W_dec.div_(s_y[None, None, :, None, None])  # [R, S, T, F, D]: scaled by target T
        tc.b_dec.div_(s_y[None, :, None])
        if tc.W_skip is not None:
            tc.W_skip.mul_((s_x / s_y)[None, :, None, None])


def train_group(specs: list[RunSpec], lm: LMData, train_cfg: TrainConfig, logger=None,
                progress=None, normalize: bool = True) -> tuple[Transcoder, list[dict]]:
    """Train one ensemble of compatible runs on streamed activations; evaluate every member.

    With ``normalize``, training sees per-layer rescaled activations (``layer_scales``) and
    the scales are folded back into the weights afterwards, so the saved transcoders read and
    write the model's raw activations."""
    import torch
    from clt_eval.training.experiment import record
    from clt_eval.training.trainer import init_b_dec, train

    from clt_eval.transcoder import Transcoder

    cfgs = [s.transcoder_config(lm.train.d_model, lm.window.n_layers) for s in specs]
    tc = Transcoder(cfgs, seeds=[s.seed for s in specs])
    batches = lm.train.batches(seed=specs[0].seed)
    first = [next(batches) for _ in range(4)]
    L = lm.window.n_layers
    s_x, s_y = layer_scales(first, lm.train.d_model) if normalize else (torch.ones(L),) * 2
    scaled = ((x * s_x[:, None], y * s_y[:, None])
              for x, y in itertools.chain(first, batches))
    first_y = torch.cat([b[1] for b in first]) * s_y[:, None]
    init_b_dec(tc, first_y)  # the mean of a few batches is close enough to start from
    coefs = torch.tensor([s.sparsity_coef for s in specs])
    final = train(tc, [s.loss_config() for s in specs], coefs, scaled, train_cfg, logger,
                  progress)
    fold_scales(tc, s_x, s_y)
    metrics = evaluate_lm(tc, lm.eval)
    for i, m in enumerate(metrics):
        m["final_loss"] = float(final["loss"][i])
        m["final_train_mse"] = float(final["mse"][i])  # in the scaled units training saw
        m["scale_x"], m["scale_y"] = s_x.tolist(), s_y.tolist()
    return tc, [record(s, m) for s, m in zip(specs, metrics, strict=True)]


def train_on_model(data: LMDataConfig, specs: list[RunSpec], train_cfg: TrainConfig,
                   out: str | Path, wandb_mode: str = "offline", model=None) -> Path:
    """Train ``specs`` on ``data``'s model and corpus; save each transcoder under
    ``out/transcoders/<run_id>`` and every run's metrics in ``out/results.json``."""
    from clt_eval.training.experiment import check_unique, group_specs
    from clt_eval.training.wandb_logger import WandbLogger
    from tqdm.auto import tqdm

    from clt_eval.atomic import write_json_atomic

    out = Path(out)
    check_choice("wandb_mode", wandb_mode, WANDB_MODES)
    check_unique(specs)
    require(not out.exists() or out.is_dir(), f"out={str(out)!r}: exists and is not a folder")
    lm = prepare(data, train_cfg.batch_size or DEFAULT_LM_BATCH, model)  # fails before writing
    logger = WandbLogger(wandb_mode, group=f"lm-{out.name}", root=out)
    groups = group_specs(specs)
    records = []
    with tqdm(total=len(groups) * train_cfg.steps, desc="training", unit="step") as bar:
        for group in groups:
            records += _train_log_save(group, lm, data, train_cfg, logger, bar, out)
    return write_json_atomic(out / "results.json", {
        "model": data.model, "window": lm.window.to_dict(), "data": data.to_dict(),
        "n_train_tokens": lm.train.n_tokens, "n_eval_tokens": lm.eval.n_tokens,
        "train": asdict(train_cfg), "runs": records})


def _train_log_save(group, lm: LMData, data: LMDataConfig, train_cfg, logger, bar, out: Path):
    """One ensemble as one wandb run; then each member saved with its window and metadata."""
    from clt_eval.training.experiment import flat_record, run_id

    from clt_eval.io import save_transcoder

    ids = [run_id(s) for s in group]
    runs = {i: s.to_dict() for i, s in zip(ids, group, strict=True)}
    logger.start(f"{data.model}-{ids[0]}",
                 {"data": data.to_dict(), "train": asdict(train_cfg), "runs": runs})
    tc, records = train_group(group, lm, train_cfg, logger.ensemble_logger(ids), bar,
                              normalize=data.normalize)
    logger.table("runs", [flat_record(r) for r in records])
    logger.finish()
    for i, (spec, rid) in enumerate(zip(group, ids, strict=True)):
        m = records[i]["metrics"]
        save_transcoder(tc.select([i]), out / "transcoders" / rid,
                        extra={"window": lm.window.to_dict(), "model": data.model,
                               "corpus": data.corpus, "run": spec.to_dict(),
                               "data": data.to_dict(), "train": asdict(train_cfg),
                               "training_scales": {"x": m["scale_x"], "y": m["scale_y"]}})
    return records
