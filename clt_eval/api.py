"""The Python API: one function per `clt-eval` command, with the command's option names and
defaults as typed keyword parameters, returning Python objects instead of printing.

The CLI is a thin layer over these functions (parse, call, print), so a script and a shell
command with the same options run the same checks and write the same files::

    import clt_eval

    res = clt_eval.train(arch=["plt", "clt"], sparsity_coef=[1e-3, 1e-2], steps=500,
                         out="runs/grid")
    tc, window = clt_eval.load(res["results"].parent / "transcoders" / res["runs"][0]["run_id"])

Like the commands, a function that writes an output folder first checks it (a file in the
way, another job's results, a second writer: one-line ``CltEvalError``, nothing written),
then holds the folder's job lock while it writes (``clt_eval.training.preflight``).
``threads`` sets torch's CPU threads for the call only (``"auto"``: the physical cores).

This module is the facade over the whole toolkit, so unlike the rest of the core it reaches
up into ``clt_eval.training``; every such import sits inside a function, which keeps
``import clt_eval`` free of torch and of the training stack until a function is called.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clt_eval._api_setup import (
    LM_FIELDS,
    Threads,
    compute,
    device_args,
    explicit_threads,
    sweep_data,
    tiny_products,
    train_specs,
)
from clt_eval.errors import CltEvalError

if TYPE_CHECKING:  # for annotations only: importing them loads torch
    from clt_eval.lm.graph import AttributionGraph
    from clt_eval.lm.window import LayerWindow
    from clt_eval.transcoder import Transcoder

__all__ = ["attribute", "case_studies", "compare", "convert", "evaluate", "graph", "load",
           "patch", "reproduce", "sweep", "train"]

EVALUATE_SHOWN = ("nmse", "l0_total", "skip_fraction", "middle_feature_recovery",
                  "intervention_agreement", "output_accuracy")  # what the CLI prints


def arguments_for(fn: Callable, namespace: Any) -> dict[str, Any]:
    """The attributes of ``namespace`` (an argparse result) that are parameters of ``fn``:
    how the CLI hands its parsed options to the API function of the same command."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in vars(namespace).items() if k in names}


# ---- commands ------------------------------------------------------------------------------
def train(case_study: str = "boolean_two_step", out: str | Path = "runs/train",
          wandb_mode: str = "offline", *,
          arch: str | Sequence[str] = "clt", penalty: str | Sequence[str] = "l1",
          decoder_norm: str | None | Sequence[str | None] = None,
          sparsity_coef: float | Sequence[float] = 0.0, seed: int | Sequence[int] = 0,
          n_features: int | Sequence[int] = 16, k: int | None | Sequence[int | None] = None,
          activation: str | None = None, topk_mode: str = "joint", tanh_scale: float = 1.0,
          preact_coef: float = 0.0, jumprelu_bandwidth: float = 1.0,
          jumprelu_threshold_init: float = 0.1, skip: bool = False,
          cross_layer_coef: float | Sequence[float] = 0.0,
          steps: int = 3000, lr: float = 1e-2, lr_warmup_steps: int = 100,
          lr_final_frac: float = 0.05, lambda_warmup_frac: float = 0.2, batch_size: int = 0,
          log_every: int = 100, dead_window: int = 200, divergence_factor: float = 1e4,
          device: str = "auto", dtype: str = "float32", threads: Threads = "auto",
          model: str | None = None, layers: Sequence[int] | None = None,
          corpus: str = "bible", n_tokens: int | None = None, eval_tokens: int | None = None,
          n_ctx: int | None = None, model_batch: int | None = None,
          cache_dir: str | None = None, input_hook: str | None = None,
          output_hook: str | None = None, drop_first: bool | None = None,
          normalize: bool | None = None, cache: bool | None = None) -> dict[str, Any]:
    """`clt-eval train`: train the product of the grid keywords (``arch``, ``penalty``,
    ``decoder_norm``, ``n_features``, ``k``, ``cross_layer_coef``, ``sparsity_coef``,
    ``seed``: each one value or a list) on a case study, or, with ``model`` and ``layers``,
    on a language model's activations (``corpus`` and the other LMDataConfig fields; None
    keeps their defaults). ``decoder_norm=None``: each penalty's own (concatenated for l1
    and tanh, none for the others).

    The other keywords are the fields of ``RunSpec`` shared by every run and those of
    ``TrainConfig``. Writes ``out/results.json`` and ``out/transcoders/<run_id>/``; returns
    ``{"results": path of results.json, "runs": its run records}``.

    Started by ``torchrun``, every process calls this: each trains on its rows of every
    global batch of ``batch_size`` (which the number of ranks must divide), rank 0 alone
    writes, and every rank returns rank 0's records (docs/scale.md).
    """
    given = dict(locals())
    import json

    from clt_eval.training import distributed, preflight
    from clt_eval.training.config import TrainConfig

    specs = train_specs(given)
    # Every TrainConfig field is a keyword here (tests/test_api.py checks the signature
    # against the command's options).
    train_cfg = TrainConfig(**{f: given[f] for f in TrainConfig.__dataclass_fields__})
    if not distributed.launched():  # under torchrun rank 0 alone checks it, when it locks it
        preflight.check_output(out, "train")
    # Under torchrun: join the other ranks (each trains on its rows of every global batch,
    # rank 0 alone writes); a no-op in a single process.
    distributed.init_from_env(device)
    try:
        if not distributed.is_main():
            given["wandb_mode"] = "disabled"  # one wandb run per job, logged by rank 0
        path = _train_lm(given, specs, train_cfg) if model is not None else \
            _train_toy(given, specs, train_cfg)
        records = json.loads(Path(path).read_text())["runs"]
    finally:
        distributed.shutdown()
    return {"results": path, "runs": records}


def _train_toy(given: dict, specs: list, train_cfg) -> Path:
    from clt_eval._api_setup import check_toy_batch
    from clt_eval.training import distributed, preflight
    from clt_eval.training.runs import train_grid

    def output():
        preflight.check_output(given["out"], "train")
        disk = preflight.check_grid_memory(given["case_study"], specs, train_cfg.batch_size,
                                           what="train", device=train_cfg.device)
        return preflight.job_output(given["out"], "train", disk)

    tiny = tiny_products(given["case_study"], max(s.n_features for s in specs),
                         train_cfg.batch_size)
    with compute(given["threads"], given["device"], given["dtype"], tiny):
        check_toy_batch(given["case_study"], train_cfg.batch_size)
        with distributed.main_opens(output) as folder:
            return train_grid(given["case_study"], specs, train_cfg, folder,
                              given["wandb_mode"])


def _train_lm(given: dict, specs: list, train_cfg) -> Path:
    from clt_eval.training import distributed, preflight
    from clt_eval.training.lm_train import DEFAULT_LM_BATCH, LMDataConfig, train_on_model

    if given["layers"] is None:
        raise CltEvalError("--layers: required with --model; expected model layer indices")
    extra = {k: given[k] for k in LM_FIELDS if given[k] is not None}
    data = LMDataConfig(model=given["model"], layers=tuple(given["layers"]),
                        corpus=given["corpus"], **extra)
    distributed.check_divisible(train_cfg.batch_size or DEFAULT_LM_BATCH)
    with compute(given["threads"], given["device"], given["dtype"]):
        with distributed.main_opens(lambda: preflight.job_output(given["out"], "train")) \
                as folder:
            return train_on_model(data, specs, train_cfg, folder, given["wandb_mode"])


def reproduce(case_study: str = "boolean_two_step", out: str | Path = "runs/reproduce",
              seeds: int | None = None, n_features: int | None = None,
              steps: int | None = None, quick: bool = False, all: bool = False,
              wandb_mode: str = "offline", save_transcoders: bool = True,
              threads: Threads = "auto", device: str = "auto",
              dtype: str = "float32") -> dict[str, Any]:
    """`clt-eval reproduce`: PLT vs CLT at matched total L0 on one case study (``all``: on
    every registered one, each into ``out/<name>``, plus a summary). ``seeds``,
    ``n_features`` and ``steps`` override the packaged spec (None: the spec's own);
    ``quick`` is a seconds-long smoke run of the same engine.

    Returns ``{"report": path of report.md, "headline": rows (with ``all``: rows per case
    study), ...}``; ``clt_eval.training.reproduce.format_headline`` prints rows as the CLI
    does.
    """
    given = dict(locals())
    from clt_eval.training import preflight
    from clt_eval.training.config import ReproduceConfig

    cfg_fields = ReproduceConfig.__dataclass_fields__
    cfg = ReproduceConfig(**{f: str(given[f]) if f == "out" else given[f] for f in cfg_fields})
    preflight.check_output(cfg.out, "reproduce")
    from clt_eval.training.reproduce import reproduce as run

    device_args(run, "reproduce", device, dtype, cfg_fields)
    with compute(threads, device, dtype, _reproduce_is_tiny(cfg)), \
            preflight.job_output(cfg.out, "reproduce"):
        return run(cfg)


def _reproduce_is_tiny(cfg) -> bool:
    """Are the products tiny in every case study this reproduce trains (``tiny_products``)?"""
    from clt_eval.case_study import case_study_targets
    from clt_eval.training.reproduce import reproduce_spec

    for name in list(case_study_targets()) if cfg.all else [cfg.case_study]:
        spec = reproduce_spec(cfg, name)
        if not tiny_products(name, _widest(spec), spec.train.batch_size):
            return False
    return True


def _widest(spec) -> int:
    """The most features of any run a sweep spec trains (grid or matched-L0 search)."""
    widths = [s.n_features for s in spec.runs()]
    return max(widths + ([spec.matched_l0.n_features] if spec.matched_l0 else []))


def sweep(spec: str | Path | None = None, out: str | Path = "runs/sweep",
          case_study: str | None = None, wandb_mode: str = "offline",
          no_save_transcoders: bool = False, *,
          arch: Sequence[str] | None = None, penalty: Sequence[str] | None = None,
          decoder_norm: Sequence[str] | None = None, n_features: Sequence[int] | None = None,
          k: Sequence[int] | None = None, cross_layer_coef: Sequence[float] | None = None,
          sparsity_coef: Sequence[float] | None = None,
          lambda_log: tuple[float, float, float] | None = None, seeds: int | None = None,
          matched_l0: bool = False, steps: int | None = None, threads: Threads = "auto",
          device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """`clt-eval sweep`: run a sweep spec (a TOML, YAML or JSON file; None: the packaged
    default) into ``out``, resuming from ``out/sweep.json`` when it exists.

    Grid keywords (``arch`` … ``sparsity_coef``, ``lambda_log`` = (lo, hi, n points on a log
    grid), ``seeds``) replace the spec's grid blocks with one block; ``matched_l0`` then also
    runs the spec's matched-L0 search. ``steps``, ``case_study``, ``device`` and ``dtype``
    override the spec's (None: keep them). Returns ``{"sweep": path, "report": path,
    "trained": runs trained by this call, "summary": …}``.
    """
    given = dict(locals())
    from clt_eval.training import preflight
    from clt_eval.training.sweep_spec import parse_spec

    data, path, from_grid = sweep_data(given)
    where = "command line" if from_grid else str(path)
    preflight.check_run_count(preflight.count_spec_runs(data), where)
    try:
        parsed = parse_spec(data, source=str(path))
    except CltEvalError as exc:
        raise CltEvalError(f"{where}: {exc}") from None
    preflight.check_output(out, "sweep")
    from clt_eval.training.sweep import MAX_ENSEMBLE, run_sweep

    tiny = tiny_products(parsed.case_study, _widest(parsed), parsed.train.batch_size)
    with compute(threads, parsed.train.device, parsed.train.dtype, tiny):
        disk = preflight.check_grid_memory(parsed.case_study, parsed.runs(),
                                           parsed.train.batch_size, MAX_ENSEMBLE, what=where,
                                           device=parsed.train.device)
        with preflight.job_output(out, "sweep", 0 if no_save_transcoders else disk) as folder:
            return run_sweep(parsed, folder, wandb_mode,
                             save_transcoders=not no_save_transcoders)


def evaluate(run_dir: str | Path, threads: Threads = "auto", device: str = "auto",
             dtype: str = "float32") -> dict[str, dict]:
    """`clt-eval evaluate`: evaluate every transcoder under ``run_dir`` (one transcoder folder
    or a folder holding ``transcoders/``) against its case study. Writes ``metrics.json``
    beside each and returns ``{run_id: metrics}``; the CLI prints ``EVALUATE_SHOWN`` of them.
    """
    from clt_eval.training import preflight
    from clt_eval.training.runs import evaluate_dir

    kwargs = device_args(evaluate_dir, "evaluate", device, dtype)
    # evaluate adds metrics.json beside transcoders another job wrote: it takes that job
    # folder's lock, so it never races the job, and notes itself in the folder's marker.
    home = preflight.marked_folder(Path(run_dir))
    lock = preflight.OutputLock(home, option="run_dir") if home else contextlib.nullcontext()
    with compute(threads, device, dtype), lock:
        results = evaluate_dir(Path(run_dir), **kwargs)
        if home:
            preflight.record_reader(home, "evaluate")
    return results


def load(path: str | Path, *, feature_input_hook: str | None = None,
         feature_output_hook: str | None = None,
         allow_external_paths: bool = False) -> tuple[Transcoder, LayerWindow | None]:
    """A transcoder in any format clt-eval reads (a clt-eval, circuit-tracer CLT or per-layer
    set, or sae_lens folder; ``hf://org/repo[/subfolder][@revision]``; ``sae_lens:RELEASE/ID``),
    checked file by file: ``(transcoder, window)``. The window, the model layers the
    transcoder replaces, is None only for clt-eval folders saved without one.

    The block-relative hooks (e.g. ``hook_resid_mid``, ``hook_mlp_out``) let a circuit-tracer
    folder without config.yaml load; ``allow_external_paths`` lets a config.yaml name files
    outside its folder.
    """
    from clt_eval.formats import load_any

    return load_any(path, feature_input_hook=feature_input_hook,
                    feature_output_hook=feature_output_hook,
                    allow_external_paths=allow_external_paths)


def convert(src: str | Path, dst: str | Path, to: str, *, n_model_layers: int | None = None,
            scan: str | None = None, feature_input_hook: str | None = None,
            feature_output_hook: str | None = None, allow_external_paths: bool = False) -> Path:
    """`clt-eval convert`: write the transcoder ``src`` (anything ``load`` reads) to the folder
    ``dst`` in format ``to`` (clt-eval, circuit-tracer or sae-lens); returns ``dst``. Every
    check runs before anything is written, and ``dst`` is replaced only if empty or a
    transcoder folder.

    ``n_model_layers``: the model's layer count, to pad a windowed transcoder for
    circuit-tracer (one transcoder per model layer); ``scan``: circuit-tracer's name for the
    transcoders; the hooks and ``allow_external_paths`` as in ``load``.
    """
    from clt_eval.training import preflight

    preflight.check_output(dst, "convert", option="dst")
    from clt_eval.formats.convert import convert as run

    with preflight.job_output(dst, "convert", option="dst") as folder:
        return run(src, folder, to, n_model_layers=n_model_layers, scan=scan,
                   feature_input_hook=feature_input_hook,
                   feature_output_hook=feature_output_hook,
                   allow_external_paths=allow_external_paths)


def attribute(transcoder: str | Path | Transcoder, model: Any, prompt: str | Sequence[int], *,
              target_token: Sequence[int] | None = None, max_logits: int = 10,
              batch_size: int = 16, include_first: bool = False,
              conventions: str = "circuit-tracer") -> AttributionGraph:
    """The full (unpruned) attribution graph of ``prompt``'s next-token prediction through
    ``transcoder`` spliced into ``model``; nothing is written (``graph`` prunes and writes).

    ``transcoder``: anything ``load`` reads, or a ``Transcoder``, which then replaces model
    layers 0..L-1. ``model``: ``tiny``, ``smollm2-135m``, a config .json or a loaded model.
    ``prompt``: text or token ids. ``target_token``: token ids whose logits to explain
    (default: the most probable, up to ``max_logits``); ``include_first`` gives position 0
    (BOS, the attention sink) features too; ``conventions``: whose graph conventions to
    follow (``clt_eval.lm.attribution``). Options as in ``clt-eval graph``.
    """
    from clt_eval.lm.graph import attribute as run

    if isinstance(model, Path):
        model = str(model)
    return run(transcoder, model, prompt, conventions=conventions,
               target_tokens=None if target_token is None else list(target_token),
               max_logits=max_logits, batch_size=batch_size, skip_first=not include_first)


def graph(transcoder: str | Path, model: str, prompt: str | None = None,
          out: str | Path = "runs/graph", *, prompts: str | Path | None = None,
          target_token: Sequence[int] | None = None, max_logits: int = 10,
          node_threshold: float = 0.8, edge_threshold: float = 0.98, batch_size: int = 16,
          include_first: bool = False, conventions: str | None = None,
          max_nodes: int | None = None, threads: Threads = "auto", device: str = "auto",
          dtype: str = "float32") -> dict[str, Any]:
    """`clt-eval graph`: attribute ``prompt``, prune the graph (``node_threshold`` and
    ``edge_threshold``: shares of influence kept; ``max_nodes``: feature and error nodes
    drawn, at most) and write ``graph.json``, ``graph.png`` and the viewer JSON into ``out``;
    returns their paths (``"json"``, ``"png"``, …). With ``prompts`` (a text file, one
    prompt per line) instead of ``prompt``: one graph folder per prompt plus ``graphs.json``
    (resumable); returns ``{"computed": n, "kept": n, "index": path, …}``. ``conventions``
    and ``max_nodes`` None keep the job's defaults."""
    from clt_eval.training import preflight

    if (prompt is None) == (prompts is None):
        raise CltEvalError("graph: expected one of --prompt TEXT or --prompts FILE")
    preflight.check_output(out, "graph")
    from clt_eval.training import graph_plot

    opts = {"target_tokens": None if target_token is None else list(target_token),
            "max_logits": max_logits, "node_threshold": node_threshold,
            "edge_threshold": edge_threshold, "batch_size": batch_size,
            "skip_first": not include_first}
    opts |= device_args(graph_plot.make_graph, "graph", device, dtype)
    opts |= {k: v for k, v in (("conventions", conventions), ("max_nodes", max_nodes))
             if v is not None}
    texts = graph_plot.read_prompts(prompts) if prompts is not None else None
    with compute(threads, device, dtype), preflight.job_output(out, "graph") as folder:
        if texts is not None:
            return graph_plot.make_graphs(transcoder, model, texts, folder, **opts)
        return graph_plot.make_graph(transcoder, model, prompt, folder, **opts)


def compare(plt: str | Path, clt: str | Path, model: str, prompts: str | Path | None = None,
            out: str | Path = "runs/compare", wandb_mode: str = "offline",
            max_prompts: int | None = None, threads: Threads = "auto", device: str = "auto",
            dtype: str = "float32") -> dict[str, Path]:
    """`clt-eval compare`: PLT vs CLT on a language model's prompts (attribution proxies,
    node overlap, agreement under interventions). ``prompts``: a prompt file (None: the
    packaged two-hop / memorized / novel set; format in docs/compare.md); ``max_prompts``:
    at most this many, taken from each group in turn. Returns the paths written,
    ``"report"`` among them."""
    from clt_eval.training import preflight

    preflight.check_output(out, "compare")
    from clt_eval.training.compare import compare as run

    kwargs = device_args(run, "compare", device, dtype)
    with compute(threads, device, dtype), preflight.job_output(out, "compare") as folder:
        return run(model, plt, clt, prompts, folder, wandb_mode=wandb_mode,
                   threads=explicit_threads(threads), max_prompts=max_prompts, **kwargs)


def patch(case_study: str = "mlp_in_the_middle", out: str | Path = "runs/patch",
          seeds: int = 5, steps: int = 500, wandb_mode: str = "offline",
          threads: Threads = "auto", device: str = "auto",
          dtype: str = "float32") -> dict[str, Any]:
    """`clt-eval patch`: subspace activation patching and the MLP-in-the-middle illusion
    check, on a case study and on its transcoders' features (``seeds`` per setting, ``steps``
    per transcoder). ``threads="auto"`` keeps the job's own measured setting. Returns
    ``{"paths": {..., "report": path}, "summary": ..., ...}``."""
    from clt_eval.training import preflight

    preflight.check_output(out, "patch")
    from clt_eval.training.patch_job import PatchConfig, run_patch

    kwargs = device_args(run_patch, "patch", device, dtype, PatchConfig.__dataclass_fields__)
    if explicit_threads(threads) is not None:
        kwargs["threads"] = threads
    with compute(threads, device, dtype), preflight.job_output(out, "patch") as folder:
        return run_patch(case_study, folder, wandb_mode=wandb_mode, seeds=seeds, steps=steps,
                         **kwargs)


def case_studies(action: str = "list", name: str | None = None,
                 out: str | Path | None = None) -> dict[str, dict[str, str]] | Path:
    """`clt-eval case-studies`: with ``action="list"``, every registered case study (built-in
    and installed plugins) as ``{name: {"description": ..., "target": "module:Factory"}}``;
    with ``action="new"``, scaffold a plugin package called ``name`` into ``out`` and return
    its path."""
    if action == "new":
        from clt_eval.training import preflight

        if not name or not out:
            raise CltEvalError("case-studies new: expected NAME and --out DIR")
        preflight.check_output(out, "scaffold")
        from clt_eval.training.scaffold import scaffold

        with preflight.job_output(out, "scaffold") as folder:
            return scaffold(name, folder)
    if action != "list":
        raise CltEvalError(f"case-studies {action!r}: expected list or new")
    from clt_eval.case_study import case_study_names, case_study_targets

    targets = case_study_targets()
    return {n: {"description": d, "target": targets[n]} for n, d in case_study_names().items()}
