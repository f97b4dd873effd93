"""`clt-eval` command line. Options are generated from the config dataclasses, so the CLI
and the configs cannot drift apart. Heavy libraries load inside the commands only."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from clt_eval.training.config import WANDB_MODES, ReproduceConfig, RunSpec, TrainConfig

from clt_eval.errors import CltEvalError

# RunSpec fields that `train` accepts several values of, to train their product as a grid.
GRID_FIELDS = ("arch", "sparsity_coef", "k", "seed")
_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}


def add_dataclass_options(parser, cls, grid=(), skip=()) -> None:
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            continue
        kind = _TYPES[str(f.type)]
        if f.name in grid:
            parser.add_argument(flag, type=kind, nargs="+", default=[default],
                                help=f"one or more values (default {default})")
        else:
            parser.add_argument(flag, type=kind, default=default, help=f"default {default}")


def _values(args, cls, skip=()) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in skip}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a hint, not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="clt-eval", description="Train or load per-layer and "
                                "cross-layer transcoders and measure their faithfulness.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reproduce", help="PLT vs CLT at matched L0 on a case study (main job; "
                       "default: the Boolean two-step toy)")
    add_dataclass_options(r, ReproduceConfig)
    t = sub.add_parser("train", help="train a grid of runs on a case study")
    t.add_argument("--case-study", default="boolean_two_step")
    t.add_argument("--out", default="runs/train")
    t.add_argument("--wandb-mode", default="offline", choices=WANDB_MODES)
    add_dataclass_options(t, RunSpec, grid=GRID_FIELDS)
    add_dataclass_options(t, TrainConfig)
    _add_lm_options(t)
    _add_sweep_parser(sub)
    _add_graph_parser(sub)
    _add_compare_parser(sub)
    pt = sub.add_parser("patch", help="subspace activation patching and the MLP-in-the-middle "
                        "illusion check, on a case study and its transcoder features")
    pt.add_argument("--case-study", default="mlp_in_the_middle",
                    help="a registered name or module.path:Factory")
    pt.add_argument("--out", default="runs/patch")
    pt.add_argument("--seeds", type=int, default=5, help="seeds per transcoder setting")
    pt.add_argument("--steps", type=int, default=500, help="training steps per transcoder")
    pt.add_argument("--wandb-mode", default="offline", choices=WANDB_MODES)
    e = sub.add_parser("evaluate", help="evaluate saved transcoder(s) against their case study")
    e.add_argument("run_dir", help="a transcoder folder, or a folder holding transcoders/")
    cs = sub.add_parser("case-studies", help="list case studies (built-in and installed "
                        "plugins), or scaffold a new one: case-studies new NAME --out DIR")
    cs.add_argument("action", nargs="?", default="list", choices=("list", "new"))
    cs.add_argument("name", nargs="?", help="with new: the case study's name (a Python "
                    "identifier)")
    cs.add_argument("--out", help="with new: the folder to write the package into")
    c = sub.add_parser("convert", help="convert a transcoder folder between on-disk formats")
    c.add_argument("src", help="a clt-eval, circuit-tracer (CLT or per-layer) or sae_lens folder")
    c.add_argument("dst", help="folder to write; replaced only if empty or a transcoder folder")
    # Not argparse `choices`: convert() checks it, with the same one-line error as the API.
    c.add_argument("--to", required=True, metavar="FORMAT",
                   help="clt-eval, circuit-tracer or sae-lens")
    return p


# Grid options of `clt-eval sweep`: each replaces the spec's grid blocks with one block.
SWEEP_GRID = {"arch": str, "penalty": str, "decoder_norm": str, "n_features": int, "k": int,
              "cross_layer_coef": float, "sparsity_coef": float}


def _add_sweep_parser(sub) -> None:
    s = sub.add_parser("sweep", help="sparsity sweeps: phase diagrams, matched-L0 comparison, "
                       "width, mitigations (resumable)")
    s.add_argument("spec", nargs="?", default=None,
                   help="a TOML, YAML or JSON sweep spec (default: the packaged default spec)")
    s.add_argument("--out", default="runs/sweep", help="output folder; rerun to resume")
    s.add_argument("--case-study", default=None, help="replaces the spec's case study: a "
                   "registered name or module.path:Factory")
    s.add_argument("--wandb-mode", default="offline", choices=WANDB_MODES)
    s.add_argument("--no-save-transcoders", action="store_true",
                   help="keep only metrics (feature tracking needs the transcoders)")
    g = s.add_argument_group("grid from the command line (replaces the spec's grid blocks)")
    for name, kind in SWEEP_GRID.items():
        g.add_argument("--" + name.replace("_", "-"), type=kind, nargs="+", default=None)
    g.add_argument("--lambda-log", type=float, nargs=3, metavar=("LO", "HI", "N"),
                   help="λ on a log grid: N points from LO to HI")
    g.add_argument("--seeds", type=int, default=None, help="seeds per grid point")
    g.add_argument("--matched-l0", action="store_true",
                   help="with a grid from flags, also run the spec's matched-L0 search "
                   "(without it, flags train exactly the grid they describe)")
    s.add_argument("--steps", type=int, default=None, help="training steps per run")


def _add_lm_options(t) -> None:
    """`train --model`: train on a language model's activations (training.lm_train)."""
    g = t.add_argument_group("language model (replaces --case-study; fields of LMDataConfig)")
    g.add_argument("--model", default=None,
                   help="tiny, smollm2-135m (make smollm2) or a HookedTransformerConfig .json")
    g.add_argument("--layers", type=int, nargs="+", default=None,
                   help="model layers to replace, e.g. 10 11 12 13")
    g.add_argument("--corpus", default="bible",
                   help="bible, fortunes, a .txt file or folder; join several with '+'")
    for name, kind in (("n_tokens", int), ("eval_tokens", int), ("n_ctx", int),
                       ("model_batch", int), ("cache_dir", str), ("input_hook", str),
                       ("output_hook", str)):
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    for name in ("drop_first", "normalize"):
        g.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                       default=None)


def _add_graph_parser(sub) -> None:
    g = sub.add_parser("graph", help="attribution graph of a prompt through a transcoder "
                       "spliced into a language model (JSON + PNG)")
    g.add_argument("transcoder", help="a transcoder folder (clt-eval, circuit-tracer, sae_lens)")
    g.add_argument("--model", required=True, help="tiny, smollm2-135m or a config .json")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", default="runs/graph")
    g.add_argument("--target-token", type=int, nargs="+", default=None,
                   help="token ids whose logits to explain (default: the most probable)")
    g.add_argument("--max-logits", type=int, default=10)
    g.add_argument("--node-threshold", type=float, default=0.8)
    g.add_argument("--edge-threshold", type=float, default=0.98)
    g.add_argument("--batch-size", type=int, default=16, help="targets per backward pass")
    g.add_argument("--include-first", action="store_true",
                   help="give position 0 (BOS, the attention sink) features too")


def _add_compare_parser(sub) -> None:
    c = sub.add_parser("compare", help="PLT vs CLT on a language model's prompts: attribution "
                       "proxies, node overlap, agreement under interventions")
    c.add_argument("plt", help="the per-layer transcoder folder")
    c.add_argument("clt", help="the cross-layer transcoder folder (same window)")
    c.add_argument("--model", required=True, help="tiny, smollm2-135m or a config .json")
    c.add_argument("--prompts", default=None,
                   help="prompt file (default: the packaged two-hop / memorized / novel set)")
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--wandb-mode", default="offline", choices=WANDB_MODES)
    c.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest for attribution on 2 shared cores)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"reproduce": _reproduce, "train": _train, "evaluate": _evaluate,
                "case-studies": _case_studies, "sweep": _sweep,
                "convert": _convert, "graph": _graph, "compare": _compare,
                "patch": _patch}[args.command](args)
    except CltEvalError as exc:
        print(f"clt-eval: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Everything finished is on disk; a sweep also keeps its checkpoint.
        print("clt-eval: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _reproduce(args) -> int:
    from clt_eval.training.reproduce import format_headline, reproduce

    cfg = ReproduceConfig(**_values(args, ReproduceConfig))
    result = reproduce(cfg)
    for name, rows in (result["headline"].items() if cfg.all else
                       [(cfg.case_study, result["headline"])]):
        print(f"\n{name}: share of seeds that skip at matched total L0, PLT vs CLT\n"
              + format_headline(rows))
    print(f"\nwrote {result['report']}")
    return 0


def _train(args) -> int:
    from clt_eval.training.runs import train_grid

    base = _values(args, RunSpec, skip=GRID_FIELDS)
    grid = [getattr(args, name) for name in GRID_FIELDS]
    specs = [RunSpec(**base, **dict(zip(GRID_FIELDS, combo, strict=True)))
             for combo in itertools.product(*grid)]
    train_cfg = TrainConfig(**_values(args, TrainConfig))
    if args.model is not None:
        return _train_lm(args, specs, train_cfg)
    out = train_grid(args.case_study, specs, train_cfg, Path(args.out), args.wandb_mode)
    print(f"trained {len(specs)} runs; wrote {out}")
    return 0


def _train_lm(args, specs, train_cfg) -> int:
    from clt_eval.training.lm_train import LMDataConfig, train_on_model

    if args.layers is None:
        raise CltEvalError("--layers: required with --model; expected model layer indices")
    extra = {k: getattr(args, k) for k in ("n_tokens", "eval_tokens", "n_ctx", "model_batch",
                                           "cache_dir", "input_hook", "output_hook",
                                           "drop_first", "normalize")
             if getattr(args, k) is not None}
    data = LMDataConfig(model=args.model, layers=tuple(args.layers), corpus=args.corpus, **extra)
    out = train_on_model(data, specs, train_cfg, Path(args.out), args.wandb_mode)
    print(f"trained {len(specs)} runs on {args.model} layers {list(args.layers)}; wrote {out}")
    return 0


def _sweep(args) -> int:
    from clt_eval.training.sweep_spec import DEFAULT_SPEC, parse_spec, read_spec_file

    path = Path(args.spec) if args.spec else DEFAULT_SPEC
    data = read_spec_file(path)
    block = {k: getattr(args, k) for k in SWEEP_GRID if getattr(args, k) is not None}
    if args.lambda_log is not None:
        lo, hi, n = args.lambda_log
        if n != int(n):
            raise CltEvalError(f"--lambda-log: N={n!r}; expected a whole number of points")
        block["sparsity_coef"] = {"log": [lo, hi, int(n)]}
    if args.seeds is not None:
        block["seeds"] = args.seeds
    if block:
        data = data | {"grid": [block | {"label": "command line"}]}
        if not args.matched_l0:
            data = data | {"matched_l0": None}
    if args.steps is not None:
        data = data | {"train": data.get("train", {}) | {"steps": args.steps}}
    if args.case_study is not None:
        data = data | {"case_study": args.case_study}
    try:
        spec = parse_spec(data, source=str(path))
    except CltEvalError as exc:
        raise CltEvalError(f"{path if not block else 'command line'}: {exc}") from None
    from clt_eval.training.sweep import run_sweep

    result = run_sweep(spec, Path(args.out), args.wandb_mode,
                       save_transcoders=not args.no_save_transcoders)
    print(f"{result['trained']} runs trained; wrote {result['sweep']}, {result['report']}")
    return 0


def _graph(args) -> int:
    from clt_eval.training.graph_plot import make_graph

    paths = make_graph(args.transcoder, args.model, args.prompt, args.out,
                       target_tokens=args.target_token, max_logits=args.max_logits,
                       node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
                       batch_size=args.batch_size, skip_first=not args.include_first)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


def _compare(args) -> int:
    from clt_eval.training.compare import compare

    paths = compare(args.model, args.plt, args.clt, args.prompts, args.out,
                    wandb_mode=args.wandb_mode, threads=args.threads)
    print(f"wrote {paths.get('report', args.out)}")
    return 0


def _patch(args) -> int:
    from clt_eval.training.patch_job import run_patch

    res = run_patch(args.case_study, Path(args.out), wandb_mode=args.wandb_mode,
                    seeds=args.seeds, steps=args.steps)
    print(f"wrote {res['paths']['report']}")
    return 0


def _convert(args) -> int:
    from clt_eval.formats.convert import convert

    print(f"wrote {convert(args.src, args.dst, args.to)}")
    return 0


def _evaluate(args) -> int:
    from clt_eval.training.runs import evaluate_dir

    for rid, metrics in evaluate_dir(Path(args.run_dir)).items():
        keep = ("nmse", "l0_total", "skip_fraction", "middle_feature_recovery",
                "intervention_agreement", "output_accuracy")
        print(rid, json.dumps({k: metrics[k] for k in keep}))
    return 0


def _case_studies(args) -> int:
    from clt_eval.case_study import case_study_names, case_study_targets

    if args.action == "new":
        from clt_eval.training.scaffold import scaffold

        if not args.name or not args.out:
            raise CltEvalError("case-studies new: expected NAME and --out DIR")
        path = scaffold(args.name, Path(args.out))
        print(f"wrote {path}; install it with: pip install -e {path}")
        return 0
    targets = case_study_targets()
    for name, desc in case_study_names().items():
        print(f"{name:<24}{desc}  [{targets[name]}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
