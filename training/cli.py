"""`clt-eval` command line. Options are generated from the config dataclasses, so the CLI
and the configs cannot drift apart. Heavy libraries load inside the commands only, after the
output folder, the numbers and the grid size have been checked."""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import MISSING, fields

from clt_eval.config import ACTIVATIONS, ARCHS, DECODER_NORMS, PENALTIES, TOPK_MODES
from clt_eval.device import (
    DTYPE_CHOICES,
    check_device_name,
)
from clt_eval.errors import CltEvalError
from clt_eval.training import preflight
from clt_eval.training.config import WANDB_MODES, ReproduceConfig, RunSpec, TrainConfig

INT_MAX = 2**63 - 1  # the largest seed torch and numpy accept; a bound for every count
FORMATS = ("clt-eval", "circuit-tracer", "sae-lens")  # clt_eval.formats.FORMATS (imports torch)
GRAPH_CONVENTIONS = ("circuit-tracer", "clt-eval")  # clt_eval.lm.attribution.CONVENTIONS
# The case studies clt-eval's own package registers (a test keeps this in step with its entry
# points; reading them here would cost every command a metadata scan).
BUILTIN_CASE_STUDIES = ("boolean_two_step", "boolean_chain", "boolean_superposition",
                        "continuous_two_step", "mlp_in_the_middle", "two_hop_transformer")
# Option values from a known set: argparse refuses anything else in one line.
CHOICES = {"arch": ARCHS, "penalty": PENALTIES, "decoder_norm": DECODER_NORMS,
           "activation": ACTIVATIONS, "topk_mode": TOPK_MODES, "wandb_mode": WANDB_MODES,
           "dtype": DTYPE_CHOICES}
# Lowest value of each integer option (any other integer option: 0); all are <= INT_MAX.
INT_LOW = {"n_features": 1, "k": 1, "steps": 1, "seeds": 1, "das_steps": 1, "max_logits": 1,
           "batch_size": 0, "n_tokens": 1, "eval_tokens": 1, "n_ctx": 2, "model_batch": 1}
# Range of each float option (any other: finite). (low, high); None: unbounded.
FLOAT_RANGE = {"lambda_warmup_frac": (0, 1), "node_threshold": (0, 1),
               "edge_threshold": (0, 1)}
HELP = {
    "arch": "architecture: plt (per-layer) or clt (cross-layer)",
    "penalty": "sparsity penalty",
    "decoder_norm": "decoder norm that weights the penalty (l1 and tanh only; default: "
                    "concatenated, or none for penalties without one)",
    "sparsity_coef": "λ, the weight of the sparsity penalty",
    "seed": "random seed, an integer in [0, 2**63-1]",
    "n_features": "features per layer",
    "k": "active features per row for topk/batchtopk",
    "activation": "feature activation (default: the penalty's own)",
    "topk_mode": "TopK over each layer (per_layer) or all layers at once (joint)",
    "tanh_scale": "c in the tanh penalty tanh(c·|f|·||W_dec||)",
    "preact_coef": "weight of the pre-activation penalty on dead JumpReLU features",
    "jumprelu_bandwidth": "kernel bandwidth ε of the JumpReLU threshold gradient",
    "jumprelu_threshold_init": "initial JumpReLU threshold θ",
    "skip": "skip transcoder: add a learned linear map of the input to each output",
    "cross_layer_coef": "κ: extra λ-scaled price on cross-layer decoder blocks",
    "steps": "training steps",
    "lr": "Adam learning rate",
    "lr_warmup_steps": "steps of linear learning-rate warm-up",
    "lr_final_frac": "cosine decay to this fraction of lr",
    "lambda_warmup_frac": "λ rises linearly from 0 over this share of the steps, in [0, 1]",
    "batch_size": "rows per step (0: the whole data set)",
    "log_every": "steps between logged losses",
    "dead_window": "steps without firing after which a feature counts as dead",
    "divergence_factor": "stop a run whose loss exceeds this multiple of its first "
                         "(0: only non-finite losses stop it)",
    "device": "where to compute: auto (a GPU when visible), cpu, cuda or cuda:N",
    "dtype": "compute precision",
    "case_study": "case study: a registered name (built in: " + ", ".join(BUILTIN_CASE_STUDIES)
                  + "; installed plugins: `clt-eval case-studies`) or module.path:Factory",
    "out": "output folder: new, empty, or one this command wrote before (where sweep and "
           "reproduce resume)",
    "seeds": "seeds per setting (default: the spec's)",
    "quick": "a seconds-long smoke run of the same engine",
    "all": "every registered case study, each into OUT/<name>, plus a summary",
    "wandb_mode": "Weights & Biases logging",
    "save_transcoders": "save every trained transcoder (feature tracking needs them)",
    "threads": "CPU threads: auto or a number (default auto). Toy transcoders, whose tiny "
               "products a second torch thread only waits on, get one thread in each of N "
               "processes that train parts of every large ensemble side by side; other jobs get "
               "N torch threads. auto: the physical cores this process may use, less those "
               "other jobs keep busy, at most 32",
}
# RunSpec fields that `train` takes several values of, to train their product as a grid
# (the same ones `sweep` takes on the command line).
GRID_FIELDS = ("arch", "penalty", "decoder_norm", "n_features", "k", "cross_layer_coef",
               "sparsity_coef", "seed")
_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}


# ---- option types: each bad value is one line naming the option -------------------------
def int_type(name: str, low: int | None = None, high: int = INT_MAX):
    low = INT_LOW.get(name, 0) if low is None else low
    span = f">= {low}" if high == INT_MAX else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={text!r}: expected an integer "
                                             f"{span}") from None
        if v > high:
            most = "2**63-1" if high == INT_MAX else str(high)
            raise argparse.ArgumentTypeError(f"{name}={v}: expected an integer <= {most}")
        if v < low:
            raise argparse.ArgumentTypeError(f"{name}={v}: expected an integer {span}")
        return v
    return parse


def float_type(name: str):
    low, high = FLOAT_RANGE.get(name, (None, None))

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not math.isfinite(v) or (low is not None and v < low) or \
                (high is not None and v > high):
            span = "" if low is None else f" in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{name}={text}: expected a finite number{span}")
        return v
    return parse


def device_type(text: str) -> str:
    try:
        return check_device_name(text)
    except CltEvalError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def threads_type(text: str) -> int | str:
    return text if text == "auto" else int_type("threads", 1, 4096)(text)


def _kind(name: str, kind):
    if name == "device":
        return device_type
    if kind is int:
        return int_type(name)
    if kind is float:
        return float_type(name)
    return kind


def _help(name: str, default) -> str:
    text = HELP.get(name, name.replace("_", " "))
    if name in CHOICES:
        text += ": " + ", ".join(CHOICES[name])
    return text if default is None else f"{text} (default {default})"


def add_dataclass_options(parser, cls, grid=(), skip=(), defaults=None) -> None:
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        default = (defaults or {}).get(f.name, default)
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=_help(f.name, default))
            continue
        kind = _kind(f.name, _TYPES.get(str(f.type), str))
        many = {"nargs": "+", "default": [default]} if f.name in grid else {"default": default}
        parser.add_argument(flag, type=kind, choices=CHOICES.get(f.name),
                            metavar=f.name.upper() if f.name in CHOICES and f.name in grid
                            else None,
                            help=_help(f.name, default) + (", one or more values" if
                                                           f.name in grid else ""), **many)


def _values(args, cls, skip=()) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in skip}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a hint, not the whole usage text."""

    def error(self, message: str):
        # "clt-eval: error:" like every other error, whichever subcommand's parser failed.
        self.exit(2, f"clt-eval: error: {message}; see `{self.prog} --help`\n")


def _add_compute_options(parser, present=(), device="auto", dtype="float32") -> None:
    """--threads, and --device/--dtype unless the command's config already has them."""
    parser.add_argument("--threads", type=threads_type, default="auto", help=HELP["threads"])
    if "device" not in present:
        parser.add_argument("--device", type=device_type, default=device,
                            help=_help("device", device or "the spec's"))
    if "dtype" not in present:
        parser.add_argument("--dtype", default=dtype, choices=DTYPE_CHOICES,
                            help=_help("dtype", dtype or "the spec's"))


def _add_wandb(parser) -> None:
    parser.add_argument("--wandb-mode", default="offline", choices=WANDB_MODES,
                        help=_help("wandb_mode", "offline"))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="clt-eval", description="Train or load per-layer and "
                                "cross-layer transcoders and measure their faithfulness.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reproduce", help="PLT vs CLT at matched L0 on a case study (main job; "
                       "default: the Boolean two-step toy)")
    add_dataclass_options(r, ReproduceConfig)
    _add_compute_options(r, {f.name for f in fields(ReproduceConfig)})
    _add_train_parser(sub)
    _add_sweep_parser(sub)
    _add_graph_parser(sub)
    _add_compare_parser(sub)
    _add_patch_parser(sub)
    e = sub.add_parser("evaluate", help="evaluate saved transcoder(s) against their case study")
    e.add_argument("run_dir", help="a transcoder folder, or a folder holding transcoders/")
    _add_compute_options(e)
    cs = sub.add_parser("case-studies", help="list case studies (built-in and installed "
                        "plugins), or scaffold a new one: case-studies new NAME --out DIR")
    cs.add_argument("action", nargs="?", default="list", choices=("list", "new"),
                    help="list (default) or new")
    cs.add_argument("name", nargs="?", help="with new: the case study's name (a Python "
                    "identifier)")
    cs.add_argument("--out", help="with new: the folder to write the package into (new or "
                    "empty)")
    c = sub.add_parser("convert", help="convert a transcoder folder between on-disk formats")
    c.add_argument("src", help="a clt-eval, circuit-tracer (CLT or per-layer) or sae_lens folder")
    c.add_argument("dst", help="folder to write; replaced only if empty or a transcoder folder")
    # Not argparse `choices`: convert() checks it, with the same one-line error as the API.
    c.add_argument("--to", required=True, metavar="FORMAT",
                   help="the format to write: " + ", ".join(FORMATS))
    c.add_argument("--n-model-layers", type=int_type("n_model_layers", 1), default=None,
                   help="the model's layer count: circuit-tracer needs one transcoder per "
                   "model layer, so a window not starting at 0 is padded with zero layers")
    c.add_argument("--scan", default=None,
                   help="circuit-tracer's name for the transcoders in its graphs")
    c.add_argument("--feature-input-hook", default=None,
                   help="block-relative input hook (e.g. hook_resid_mid): reads a "
                   "circuit-tracer folder without config.yaml")
    c.add_argument("--feature-output-hook", default=None,
                   help="block-relative output hook (e.g. hook_mlp_out), with "
                   "--feature-input-hook")
    c.add_argument("--allow-external-paths", action="store_true",
                   help="let a circuit-tracer config.yaml name files outside its folder")
    return p


def _add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a grid of runs on a case study (lists of values "
                       "train their product)")
    t.add_argument("--case-study", default="boolean_two_step",
                   help=_help("case_study", "boolean_two_step"))
    t.add_argument("--out", default="runs/train", help=_help("out", "runs/train"))
    _add_wandb(t)
    add_dataclass_options(t, RunSpec, grid=GRID_FIELDS, defaults={"decoder_norm": None})
    add_dataclass_options(t, TrainConfig)
    _add_compute_options(t, {f.name for f in fields(TrainConfig)})
    _add_lm_options(t)


# Grid options of `clt-eval sweep`: each replaces the spec's grid blocks with one block.
SWEEP_GRID = {"arch": str, "penalty": str, "decoder_norm": str, "n_features": int, "k": int,
              "cross_layer_coef": float, "sparsity_coef": float}


def _add_sweep_parser(sub) -> None:
    s = sub.add_parser("sweep", help="sparsity sweeps: phase diagrams, matched-L0 comparison, "
                       "width, mitigations (resumable)")
    s.add_argument("spec", nargs="?", default=None,
                   help="a TOML, YAML or JSON sweep spec (default: the packaged default spec)")
    s.add_argument("--out", default="runs/sweep", help=_help("out", "runs/sweep"))
    s.add_argument("--case-study", default=None,
                   help=HELP["case_study"] + "; replaces the spec's")
    _add_wandb(s)
    s.add_argument("--no-save-transcoders", action="store_true",
                   help="keep only metrics (feature tracking needs the transcoders)")
    g = s.add_argument_group("grid from the command line (replaces the spec's grid blocks)")
    for name, kind in SWEEP_GRID.items():
        text = HELP[name] + (": " + ", ".join(CHOICES[name]) if name in CHOICES else "")
        g.add_argument("--" + name.replace("_", "-"), type=_kind(name, kind), nargs="+",
                       default=None, choices=CHOICES.get(name),
                       metavar=name.upper() if name in CHOICES else None,
                       help=f"{text}; one or more values")
    g.add_argument("--lambda-log", type=float_type("lambda_log"), nargs=3,
                   metavar=("LO", "HI", "N"), help="λ on a log grid: N points from LO to HI")
    g.add_argument("--seeds", type=int_type("seeds"), default=None,
                   help="seeds per grid point")
    g.add_argument("--matched-l0", action="store_true",
                   help="with a grid from flags, also run the spec's matched-L0 search "
                   "(without it, flags train exactly the grid they describe)")
    s.add_argument("--steps", type=int_type("steps"), default=None,
                   help="training steps per run (default: the spec's)")
    # None: the spec's own train.device / train.dtype.
    _add_compute_options(s, device=None, dtype=None)


def _add_lm_options(t) -> None:
    """`train --model`: train on a language model's activations (training.lm_train)."""
    g = t.add_argument_group("language model (replaces --case-study; fields of LMDataConfig)")
    g.add_argument("--model", default=None,
                   help="tiny, smollm2-135m (make smollm2) or a HookedTransformerConfig .json")
    g.add_argument("--layers", type=int_type("layers"), nargs="+", default=None,
                   help="model layers to replace, e.g. 10 11 12 13")
    g.add_argument("--corpus", default="bible",
                   help="bible, fortunes, a .txt file or folder; join several with '+'")
    lm_help = {"n_tokens": "training tokens", "eval_tokens": "held-out evaluation tokens",
               "n_ctx": "tokens per window", "model_batch": "windows per forward pass",
               "cache_dir": "activation cache folder (default: $CLT_EVAL_CACHE/activations/"
                            "<model>-<key>, else ~/.cache/clt-eval/activations/...)",
               "input_hook": "hook template of each layer's MLP input, e.g. "
                             "blocks.{layer}.ln2.hook_normalized",
               "output_hook": "hook template of each layer's MLP output, e.g. "
                              "blocks.{layer}.hook_mlp_out"}
    for name, kind in (("n_tokens", int), ("eval_tokens", int), ("n_ctx", int),
                       ("model_batch", int), ("cache_dir", str), ("input_hook", str),
                       ("output_hook", str)):
        g.add_argument("--" + name.replace("_", "-"), type=_kind(name, kind), default=None,
                       help=lm_help[name])
    g.add_argument("--drop-first", action=argparse.BooleanOptionalAction, default=None,
                   help="drop position 0 (BOS, the attention sink) from the data (default on)")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="train on per-layer rescaled activations (default on)")
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="cache the model's activations on disk and reuse them (default on; "
                        "--no-cache recomputes them with the model on every pass)")


def _add_graph_parser(sub) -> None:
    g = sub.add_parser("graph", help="attribution graph of a prompt through a transcoder "
                       "spliced into a language model (JSON + PNG)")
    g.add_argument("transcoder", help="a transcoder folder (clt-eval, circuit-tracer, sae_lens)")
    g.add_argument("--model", required=True, help="tiny, smollm2-135m or a config .json")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="the text to attribute")
    which.add_argument("--prompts", default=None, metavar="FILE",
                       help="a text file with one prompt per line: one graph folder per "
                       "prompt plus graphs.json (resumable)")
    g.add_argument("--out", default="runs/graph", help=_help("out", "runs/graph"))
    g.add_argument("--target-token", type=int_type("target_token"), nargs="+", default=None,
                   help="token ids whose logits to explain (default: the most probable)")
    g.add_argument("--max-logits", type=int_type("max_logits"), default=10,
                   help="most probable logits explained when no --target-token (default 10)")
    g.add_argument("--node-threshold", type=float_type("node_threshold"), default=0.8,
                   help="keep the nodes holding this share of the influence, in [0, 1] "
                   "(default 0.8)")
    g.add_argument("--edge-threshold", type=float_type("edge_threshold"), default=0.98,
                   help="keep the edges holding this share of the influence, in [0, 1] "
                   "(default 0.98)")
    g.add_argument("--batch-size", type=int_type("batch_size", 1), default=16,
                   help="targets per backward pass (default 16)")
    g.add_argument("--include-first", action="store_true",
                   help="give position 0 (BOS, the attention sink) features too")
    g.add_argument("--conventions", default=None, choices=GRAPH_CONVENTIONS,
                   help="whose graph conventions to follow: " + ", ".join(GRAPH_CONVENTIONS)
                   + " (default: the job's, circuit-tracer)")
    g.add_argument("--max-nodes", type=int_type("max_nodes", 1), default=None,
                   help="feature and error nodes drawn, at most (default: the job's)")
    _add_compute_options(g)


def _add_compare_parser(sub) -> None:
    c = sub.add_parser("compare", help="PLT vs CLT on a language model's prompts: attribution "
                       "proxies, node overlap, agreement under interventions")
    c.add_argument("plt", help="the per-layer transcoder folder")
    c.add_argument("clt", help="the cross-layer transcoder folder (same window)")
    c.add_argument("--model", required=True, help="tiny, smollm2-135m or a config .json")
    c.add_argument("--prompts", default=None,
                   help="prompt file, format in docs/compare.md (default: the packaged "
                        "two-hop / memorized / novel set)")
    c.add_argument("--max-prompts", type=int_type("max_prompts", 1), default=None,
                   help="at most this many prompts, taken from each group in turn (default: "
                        "all)")
    c.add_argument("--out", default="runs/compare", help=_help("out", "runs/compare"))
    _add_wandb(c)
    _add_compute_options(c)


def _add_patch_parser(sub) -> None:
    pt = sub.add_parser("patch", help="subspace activation patching and the MLP-in-the-middle "
                        "illusion check, on a case study and its transcoder features")
    pt.add_argument("--case-study", default="mlp_in_the_middle",
                    help=_help("case_study", "mlp_in_the_middle"))
    pt.add_argument("--out", default="runs/patch", help=_help("out", "runs/patch"))
    pt.add_argument("--seeds", type=int_type("seeds"), default=5,
                    help="seeds per transcoder setting (default 5)")
    pt.add_argument("--steps", type=int_type("steps"), default=500,
                    help="training steps per transcoder (default 500)")
    _add_wandb(pt)
    _add_compute_options(pt)


# ---- running a command ---------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"reproduce": _reproduce, "train": _train, "evaluate": _evaluate,
               "case-studies": _case_studies, "sweep": _sweep, "convert": _convert,
               "graph": _graph, "compare": _compare, "patch": _patch}[args.command]
    try:
        with _restore_threads():
            return handler(args)
    except CltEvalError as exc:
        print(f"clt-eval: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk that fills or a folder that turns read-only mid-job
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"clt-eval: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Everything finished is on disk; a sweep also keeps its checkpoint.
        print("clt-eval: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


@contextmanager
def _restore_threads():
    """main() may run inside another program (the tests): give torch its thread count back."""
    before = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    try:
        yield
    finally:
        if before is not None:
            sys.modules["torch"].set_num_threads(before)


def _reproduce(args) -> int:
    from clt_eval import api

    result = api.reproduce(**api.arguments_for(api.reproduce, args))
    from clt_eval.training.reproduce import format_headline

    for name, rows in (result["headline"].items() if args.all else
                       [(args.case_study, result["headline"])]):
        print(f"\n{name}: share of seeds that skip at matched total L0, PLT vs CLT (L0: mean "
              "total L0 reached over the seeds)\n"
              + format_headline(rows))
    print(f"\nwrote {result['report']}")
    return 0


def _train(args) -> int:
    from clt_eval import api

    res = api.train(**api.arguments_for(api.train, args))
    from clt_eval.training import distributed

    if distributed.is_main():  # under torchrun, one line for the job, not one per rank
        on = "" if args.model is None else f" on {args.model} layers {list(args.layers)}"
        print(f"trained {len(res['runs'])} runs{on}; wrote {res['results']}")
    return 0


def _sweep(args) -> int:
    from clt_eval import api

    result = api.sweep(**api.arguments_for(api.sweep, args))
    print(f"{result['trained']} runs trained; wrote {result['sweep']}, {result['report']}")
    return 0


def _graph(args) -> int:
    from clt_eval import api

    res = api.graph(**api.arguments_for(api.graph, args))
    if args.prompts is not None:
        print(f"{res['computed']} graphs computed, {res['kept']} kept; wrote {res['index']}")
    else:
        print(f"wrote {res['json']} and {res['png']}")
    return 0


def _compare(args) -> int:
    from clt_eval import api

    paths = api.compare(**api.arguments_for(api.compare, args))
    print(f"wrote {paths.get('report', args.out)}")
    return 0


def _patch(args) -> int:
    from clt_eval import api

    res = api.patch(**api.arguments_for(api.patch, args))
    print(f"wrote {res['paths']['report']}")
    return 0




def _convert(args) -> int:
    from clt_eval import api

    print(f"wrote {api.convert(**api.arguments_for(api.convert, args))}")
    return 0


def _evaluate(args) -> int:
    from clt_eval import api

    for rid, metrics in api.evaluate(**api.arguments_for(api.evaluate, args)).items():
        print(rid, json.dumps({k: metrics[k] for k in api.EVALUATE_SHOWN}))
    return 0


def _case_studies(args) -> int:
    if args.action == "new":
        if not args.name or not args.out:
            raise CltEvalError("case-studies new: expected NAME and --out DIR")
        preflight.check_output(args.out, "scaffold")
        from clt_eval.training.scaffold import scaffold

        with preflight.job_output(args.out, "scaffold") as out:
            path = scaffold(args.name, out)
        print(f"wrote {path}; install it with: pip install -e {path}")
        return 0
    from clt_eval.case_study import case_study_names, case_study_targets

    targets = case_study_targets()
    for name, desc in case_study_names().items():
        print(f"{name:<24}{desc}  [{targets[name]}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
