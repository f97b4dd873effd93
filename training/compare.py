"""`clt-eval compare`: a PLT and a CLT on the same language model, window and prompts.

For every prompt both transcoders get an attribution graph of the model's answer (its own top
prediction unless the prompt names a target), and from each graph the proxies of docs/concepts.md §5
(``clt_eval.lm.graph_metrics``): the share of the answer's attribution from early-layer
features, L0 per layer and its spread, the mean path length, replacement and completeness
scores. The two pruned graphs are compared node by node after matching PLT to CLT features by
activation correlation. Then both replacements are set against the real model under
interventions at middle window layers (``training.compare_interventions``). Writes
``compare.json``, ``report.md`` and PNG plots under ``out``, and logs to wandb.

Everything is loaded and checked before anything is computed or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from clt_eval.errors import CltEvalError, check_choice, require
from clt_eval.training.config import WANDB_MODES

DEFAULT_PROMPTS = Path(__file__).parent / "specs" / "compare_prompts.json"
NAMES = ("plt", "clt")  # the two transcoders, in the order compare() takes them
PROMPT_KEYS = ("text", "answer", "target", "patch_from")
# Finished prompts, one JSON line each, so a rerun into the same folder skips them; and the
# graphs drawn for the first prompt of each group (graph JSON: they are only redrawn).
RECORDS = "prompt_records.jsonl"
# Pruning ranks only feature and error nodes for the node threshold, so the inputs
# (embeddings, and the out-of-window error nodes window_prune counts as inputs) always stay.
PRUNE = "clt-eval"
GRAPHS = "prompt_graphs"


@dataclass(frozen=True)
class PromptSpec:
    group: str
    text: str
    answer: str | None = None  # the expected answer, for the report only
    target: str | None = None  # the token to explain; default: the model's top prediction
    patch_from: str | None = None  # a prompt of the same length to patch activations from


def load_prompts(path: str | Path = DEFAULT_PROMPTS) -> list[PromptSpec]:
    """A JSON file ``{"groups": {name: [text | {text, answer?, target?, patch_from?}]}}``
    (docs/compare.md). A malformed file fails with one line naming the place: JSON's own
    line and column, or ``groups.<name>[<i>].<field>``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CltEvalError(f"{path}: not a readable JSON file ({exc})") from None
    groups = data.get("groups") if isinstance(data, dict) else None
    require(isinstance(groups, dict) and groups, f"{path}: expected an object with a non-empty "
            "'groups' object mapping group names to lists of prompts")
    out = []
    for name, items in groups.items():
        require(isinstance(items, list) and items, f"{path}: groups.{name}: expected a "
                "non-empty list of prompts")
        for i, item in enumerate(items):
            where = f"{path}: groups.{name}[{i}]"
            item = {"text": item} if isinstance(item, str) else item
            require(isinstance(item, dict), f"{where}: expected a string or an object")
            bad = sorted(set(item) - set(PROMPT_KEYS))
            require(not bad, f"{where}: unknown key(s) {bad}; allowed: {list(PROMPT_KEYS)}")
            for k, v in item.items():
                require(isinstance(v, str) and v.strip(), f"{where}.{k}: expected a "
                        "non-empty string")
            require("text" in item, f"{where}: missing field 'text'")
            out.append(PromptSpec(group=name, **item))
    return out


def first_prompts(specs: list[PromptSpec], n: int | None) -> list[PromptSpec]:
    """At most ``n`` prompts, taken from the groups in turn (the first of each group, then the
    second, ...) so that a small ``n`` still covers every group; kept in file order."""
    if n is None or n >= len(specs):
        return list(specs)
    rank: dict[str, int] = {}
    keyed = []
    for i, s in enumerate(specs):
        rank[s.group] = rank.get(s.group, -1) + 1
        keyed.append((rank[s.group], i))
    chosen = sorted(i for _, i in sorted(keyed)[:n])
    return [specs[i] for i in chosen]


def load_pair(plt_path, clt_path):
    """({"plt": tc, "clt": tc}, window): both one-run transcoders on the same window."""
    from clt_eval.training.graph_plot import load_windowed_transcoder

    tcs, windows = {}, {}
    for name, path in zip(NAMES, (plt_path, clt_path), strict=True):
        require(Path(path).is_dir(), f"{name}={str(path)!r}: no such folder")
        tc, windows[name] = load_windowed_transcoder(path)
        require(tc.n_runs == 1, f"{path}: expected one transcoder run, got {tc.n_runs}")
        tcs[name] = tc.eval()
    a, b = windows["plt"], windows["clt"]
    for field in ("layers", "input_hook", "output_hook"):
        require(getattr(a, field) == getattr(b, field),
                f"{clt_path}: window {field}={getattr(b, field)!r} but {plt_path} has "
                f"{getattr(a, field)!r}; expected the same window")
    return tcs, a


@dataclass
class Prepared:
    spec: PromptSpec
    tokens: object  # [P] token ids
    patch_tokens: object | None  # [P] or None
    patch_note: str | None  # why there is no patch, if there is none


def prepare_prompts(model, prompts: list[PromptSpec], max_tokens: int) -> list[Prepared]:
    from clt_eval.lm.attribution import tokenize_prompt

    out = []
    for i, p in enumerate(prompts):
        toks = tokenize_prompt(model, p.text)
        require(len(toks) <= min(max_tokens, model.cfg.n_ctx), f"prompt {i} ({p.group}): "
                f"{len(toks)} tokens; expected at most {min(max_tokens, model.cfg.n_ctx)}")
        if p.target is not None:
            require(len(_ids(model, p.target)) == 1, f"prompt {i} ({p.group}): target "
                    f"{p.target!r} is not a single token")
        patch, note = None, None
        if p.patch_from is not None:
            patch = tokenize_prompt(model, p.patch_from)
            if len(patch) != len(toks):
                patch, note = None, f"patch_from has {len(patch)} tokens, prompt {len(toks)}"
        out.append(Prepared(p, toks, patch, note))
    return out


def _ids(model, text: str) -> list[int]:
    from clt_eval.lm.corpus import byte_ids

    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return byte_ids(text, model.cfg.d_vocab)
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- matching PLT to CLT features ---------------------------------------------------------------
def matching_acts(model, tcs: dict, window, token_rows: list, skip_first: bool) -> dict:
    """{name: [N, L, F]} activations on every token of ``token_rows`` (1-D tensors), BOS left
    out when ``skip_first``."""
    import torch

    names = set(window.input_hooks())
    acts = {n: [] for n in tcs}
    with torch.no_grad():
        for row in token_rows:
            _, cache = model.run_with_cache(row[None], names_filter=lambda n: n in names)
            x = torch.stack([cache[h][0] for h in window.input_hooks()], 1)[int(skip_first):]
            for n, tc in tcs.items():
                acts[n].append(tc(x).acts_RBLF[0])
    return {n: torch.cat(v) for n, v in acts.items()}


def match_rows(model, prepared: list[Prepared], corpus: str | None, n_tokens: int) -> list:
    """The token rows features are matched on: the prompts, and ``n_tokens`` of ``corpus``."""
    from clt_eval.lm.corpus import corpus_windows

    rows = [p.tokens for p in prepared]
    if corpus is not None and n_tokens > 0:
        n_ctx = min(64, model.cfg.n_ctx)
        w = corpus_windows(corpus, getattr(model, "tokenizer", None), model.cfg.d_vocab,
                           n_ctx, max(n_tokens, n_ctx))
        rows += list(w)
    return rows


# ---- one prompt ---------------------------------------------------------------------------------
def graph_summary(g, n_layers: int, n_features: int, first: int, node_threshold: float,
                  edge_threshold: float) -> tuple[dict, set, object]:
    """(metrics, pruned feature nodes {(ℓ, p, f)}, (pruned graph, its influence)) of ``g``."""
    import torch

    from clt_eval.lm import graph_metrics as GM
    from clt_eval.lm.graph import influence, normalize_rows, prune

    An, w = normalize_rows(g.A_NN), g.logit_weights()
    inf = influence(An, w)
    is_f, tcl = g.mask("feature"), torch.tensor(g.tc_layer)
    share = GM.influence_by_layer(inf, tcl, is_f, n_layers)
    direct = GM.direct_logit_share(g.A_NN, w, tcl, is_f, n_layers)
    acts = torch.zeros(len(g.prompt_tokens), n_layers, n_features)
    idx = is_f.nonzero()[:, 0]
    act_N = torch.tensor(g.activation)
    acts[torch.tensor(g.position)[idx], tcl[idx], torch.tensor(g.feature)[idx]] = act_N[idx]
    l0 = GM.l0_per_layer(acts, first)
    spread = GM.l0_spread(l0)
    emb = g.mask("embedding")
    hops = GM.path_mass(An, w, emb | g.mask("error"))
    node_mask, edge_mask = window_prune(g, node_threshold, edge_threshold)
    kept = (node_mask & is_f).nonzero()[:, 0].tolist()
    nodes = {(g.tc_layer[i], g.position[i], g.feature[i]) for i in kept}
    n_all = int((prune(g.A_NN, w, g.kind, node_threshold, edge_threshold, PRUNE)[0]
                 & is_f).sum())
    metrics = {
        "early_share": GM.early_share(share), "influence_by_layer": share.tolist(),
        "direct_early_share": GM.early_share(direct), "direct_by_layer": direct.tolist(),
        "l0_per_layer": l0.tolist(), "l0_total": float(l0.sum()),
        "l0_cv": spread["cv"], "l0_entropy": spread["entropy"],
        "l0_late_minus_early": spread["late_minus_early"],
        "mean_path_length": GM.mean_path_length(GM.path_mass(An, w, emb)),
        "mean_feature_hops": GM.mean_path_length(hops[1:]) if hops.numel() > 1
        else float("nan"),
        **{k: float(v) for k, v in g.scores.items()},
        "n_features_active": int(is_f.sum()), "n_features_pruned": len(nodes),
        "n_features_pruned_all_errors": n_all}
    from clt_eval.training.compare_plots import top_features_graph

    return metrics, nodes, top_features_graph(g, inf + w)


def window_prune(g, node_threshold: float, edge_threshold: float):
    """``clt_eval.lm.graph.prune`` with the error nodes of MLPs outside the transcoder's window
    counted as inputs, like the embeddings (as the ``window_`` scores count them): ranked
    among the nodes, the 26 out-of-window layers' error nodes of a 4-layer window on a
    30-layer model would carry most of the influence and leave one or two features. Those
    error nodes are kept only where a kept edge touches them. (node_mask, edge_mask)."""
    import torch

    from clt_eval.lm.graph import prune

    layers = set(g.meta["window"]["layers"])
    outside = torch.tensor([k == "error" and ly not in layers
                            for k, ly in zip(g.kind, g.layer, strict=True)])
    kinds = ["embedding" if o else k for k, o in zip(g.kind, outside.tolist(), strict=True)]
    node_mask, edge_mask, _ = prune(g.A_NN, g.logit_weights(), kinds, node_threshold,
                                    edge_threshold, PRUNE)
    node_mask &= ~outside | edge_mask.any(0) | edge_mask.any(1)
    return node_mask, edge_mask & node_mask[:, None] & node_mask[None, :]


def prompt_record(model, tcs, window, prep: Prepared, partner, corr, settings: dict) -> dict:
    """Graphs, metrics, overlap and interventions of one prompt, for both transcoders."""
    from clt_eval.lm import graph_metrics as GM
    from clt_eval.lm.attribution import attribute
    from clt_eval.training import compare_interventions as CI

    skip_first = settings["skip_first"]
    clean = CI.clean_run(model, tcs, window, prep.tokens, skip_first)
    probs = clean.logits_PV[-1].softmax(-1)
    target = (int(probs.argmax()) if prep.spec.target is None
              else _ids(model, prep.spec.target)[0])
    rec = {"group": prep.spec.group, "text": prep.spec.text, "n_tokens": len(prep.tokens),
           "target": target, "target_str": _decode(model, target),
           "target_prob": float(probs[target]), "answer": prep.spec.answer,
           "answer_correct": None if prep.spec.answer is None
           else _ids(model, prep.spec.answer)[0] == target,
           "patch_from": prep.spec.patch_from if prep.patch_tokens is not None else None,
           "patch_note": prep.patch_note}
    nodes, drawn = {}, {}
    for name, tc in tcs.items():
        t0 = time.perf_counter()
        g = attribute(model, tc, window, prep.tokens, target_tokens=[target],
                      batch_size=settings["batch_size"], skip_first=skip_first)
        m, nodes[name], drawn[name] = graph_summary(
            g, window.n_layers, tc.cfg.n_features, int(skip_first),
            settings["node_threshold"], settings["edge_threshold"])
        rec[name] = m | {"seconds": time.perf_counter() - t0}
    rec["overlap"] = GM.matched_node_jaccard(nodes["plt"], nodes["clt"], partner, corr,
                                             settings["corr_threshold"])
    other = None if prep.patch_tokens is None else \
        CI.clean_run(model, tcs, window, prep.patch_tokens, skip_first)
    t0 = time.perf_counter()
    rec["interventions"] = CI.intervention_cases(
        model, tcs, window, clean, target, GM.middle_layers(window.n_layers), skip_first, other)
    rec["intervention_seconds"] = time.perf_counter() - t0
    return rec, drawn


def _decode(model, token: int) -> str:
    tok = getattr(model, "tokenizer", None)
    return str(token) if tok is None else tok.decode([token])


# ---- the job ------------------------------------------------------------------------------------
def compare(model_name: str, plt_path, clt_path, prompts=None, out="runs/compare", *,
            wandb_mode: str = "offline", match_corpus: str | None = "bible",
            match_tokens: int = 4096, corr_threshold: float = 0.5,
            node_threshold: float = 0.8, edge_threshold: float = 0.98, batch_size: int = 16,
            skip_first: bool = True, max_tokens: int = 32, min_effect: float = 0.05,
            threads: int | None = None, max_prompts: int | None = None, model=None,
            progress: bool = True) -> dict[str, Path]:
    """PLT (``plt_path``) vs CLT (``clt_path``) on ``model_name`` (module docstring).

    ``prompts``: a prompt file (default: the packaged two-hop / memorized / novel set) or a
    list of ``PromptSpec``. ``match_corpus``/``match_tokens``: the text PLT and CLT features
    are matched on, besides the prompts (None: the prompts only). ``corr_threshold``: the
    correlation a matched pair needs to count as the same node. ``min_effect``: the smallest
    real-model change of the answer's log-prob (nats) that the sign-and-size agreement counts.
    ``threads``: torch threads while it runs (1 is fastest on 2 shared cores: OpenMP's
    spin-waits cost the attribution's many small products up to 10×); None leaves torch's
    setting. ``max_prompts``: use at most this many prompts, spread over the groups
    (``first_prompts``). ``model``: an already loaded model (tests). ``progress``: a progress
    bar on stderr. Each finished prompt is appended to ``out/prompt_records.jsonl``; a
    rerun with the same inputs and settings into the same ``out`` keeps those and computes
    only the rest. Returns the paths written.
    """
    import torch

    settings = {"skip_first": skip_first, "batch_size": batch_size,
                "node_threshold": node_threshold, "edge_threshold": edge_threshold,
                "corr_threshold": corr_threshold, "min_effect": min_effect,
                "match_corpus": match_corpus, "match_tokens": match_tokens,
                "max_tokens": max_tokens}
    out = Path(out)
    _check_settings(settings, out, wandb_mode, threads)
    require(max_prompts is None or (isinstance(max_prompts, int) and max_prompts > 0),
            f"max_prompts={max_prompts!r}: expected a positive integer")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        specs = load_prompts(DEFAULT_PROMPTS if prompts is None else prompts) \
            if not isinstance(prompts, list) else prompts
        require(len(specs) > 0, "prompts: expected at least one prompt")
        specs = first_prompts(specs, max_prompts)
        tcs, window, model, prepared = _load_all(model_name, plt_path, clt_path, specs,
                                                 settings, model)
        store = PromptStore(out, _run_key(model_name, plt_path, clt_path, specs, settings))
        result, drawn = _run(model, tcs, window, prepared, settings, progress, store)
        result |= {"model": model_name, "plt": str(plt_path), "clt": str(clt_path)}
        return write_outputs(out, result, drawn, wandb_mode)
    finally:
        torch.set_num_threads(before)


def _check_settings(settings: dict, out: Path, wandb_mode: str, threads) -> None:
    check_choice("wandb_mode", wandb_mode, WANDB_MODES)
    for name in ("node_threshold", "edge_threshold", "corr_threshold"):
        v = settings[name]
        require(0 <= v <= 1, f"{name}={v!r}: expected a number in [0, 1]")
    for name, low in (("batch_size", 1), ("max_tokens", 2), ("match_tokens", 0)):
        v = settings[name]
        require(isinstance(v, int) and v >= low, f"{name}={v!r}: expected an integer >= {low}")
    require(settings["min_effect"] >= 0, f"min_effect={settings['min_effect']!r}: expected a "
            "number >= 0")
    require(threads is None or threads > 0, f"threads={threads!r}: expected a positive integer")
    require(not out.exists() or out.is_dir(), f"out={str(out)!r}: exists and is not a folder")


def _load_all(model_name, plt_path, clt_path, specs, settings: dict, model):
    """Transcoders, window, model and tokenised prompts, every one checked."""
    from clt_eval.lm.models import load_model
    from clt_eval.lm.splice import check_compatible, is_joint_topk

    tcs, window = load_pair(plt_path, clt_path)
    model = load_model(model_name) if model is None else model
    for name, tc in tcs.items():
        check_compatible(tc, window, model)
        require(not is_joint_topk(tc), f"{name}: TopK selected jointly across layers cannot "
                "be spliced in layer by layer")
    if settings["match_corpus"] is not None:
        from clt_eval.lm.corpus import check_corpus

        check_corpus(settings["match_corpus"])
    return tcs, window, model, prepare_prompts(model, specs, settings["max_tokens"])


def _run_key(model_name, plt_path, clt_path, specs, settings: dict) -> str:
    """What a finished prompt's record depends on besides the prompt itself: the model, both
    transcoders (their files' sizes and times), the settings, and every prompt (features are
    matched on all of them)."""
    stamps = [[str(f), f.stat().st_size, f.stat().st_mtime_ns]
              for d in (plt_path, clt_path) for f in sorted(Path(d).iterdir()) if f.is_file()]
    key = json.dumps([model_name, stamps, settings, [asdict(s) for s in specs]],
                     sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


class PromptStore:
    """Finished prompts of one compare job: ``out/prompt_records.jsonl``, one line per prompt
    ({key, index, record}), appended and fsynced as each prompt finishes; a line from another
    job (other key) or cut short by a kill is ignored. Drawn graphs go to
    ``out/prompt_graphs/<key>-<index>.json`` (written atomically, before the line that names
    them)."""

    def __init__(self, out: Path, key: str):
        self.out, self.key = out, key
        self.done: dict[int, dict] = {}
        path = out / RECORDS
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if isinstance(row, dict) and row.get("key") == key:
                    self.done[int(row["index"])] = row

    def get(self, index: int):
        """(record, drawn graphs or None) of a finished prompt, or None."""
        row = self.done.get(index)
        if row is None:
            return None
        graphs = None
        if row.get("graphs"):
            try:
                graphs = _read_drawn(self.out / row["graphs"])
            except (OSError, ValueError, KeyError, CltEvalError):
                return None  # its graphs are gone or damaged: compute the prompt again
        return row["record"], graphs

    def add(self, index: int, record: dict, graphs=None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        # NaN stays NaN (Python's json reads back what it writes), as in a fresh record.
        row = {"key": self.key, "index": index, "record": record, "graphs": None}
        if graphs is not None:
            row["graphs"] = f"{GRAPHS}/{self.key}-{index}.json"
            _write_drawn(graphs, self.out / row["graphs"])
        with open(self.out / RECORDS, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[index] = row


def _write_drawn(drawn: dict, path: Path) -> None:
    """{name: (graph, influence)} as clt-eval graph JSON (a file of ours, never unpickled)."""
    from clt_eval.atomic import write_json_atomic
    from clt_eval.lm.graph import to_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {name: to_json(g, inf) for name, (g, inf) in drawn.items()})


def _read_drawn(path: Path) -> dict:
    import torch

    from clt_eval.lm.graph import from_json

    data = json.loads(path.read_text())
    return {name: (from_json(d, str(path)),
                   torch.tensor([n["influence"] for n in d["nodes"]]))
            for name, d in data.items()}


def _run(model, tcs, window, prepared: list[Prepared], settings: dict, progress: bool,
         store: PromptStore):
    """(result without the file names, {group: graphs to draw}): matching, then each prompt
    not already finished."""
    import torch
    from tqdm.auto import tqdm

    from clt_eval.lm import graph_metrics as GM

    t0 = time.perf_counter()
    rows = match_rows(model, prepared, settings["match_corpus"], settings["match_tokens"])
    acts = matching_acts(model, tcs, window, rows, settings["skip_first"])
    partner, corr = GM.match_layers(acts["plt"], acts["clt"])
    matching = _matching_summary(acts, corr, settings["corr_threshold"],
                                 time.perf_counter() - t0)
    records, drawn = [], {}
    bar = tqdm(prepared, desc="compare", unit="prompt", file=sys.stderr, disable=not progress)
    for i, prep in enumerate(bar):
        bar.set_postfix_str(prep.spec.group)
        first_of_group = prep.spec.group not in drawn
        done = store.get(i)
        if done is None or (first_of_group and done[1] is None):
            rec, graphs = prompt_record(model, tcs, window, prep, partner, corr, settings)
            store.add(i, rec, graphs if first_of_group else None)
        else:
            rec, graphs = done
        records.append(rec)
        if first_of_group:
            drawn[prep.spec.group] = (rec, graphs)
    return {"window": window.to_dict(),
            "transcoders": {n: tc.cfg.to_dict() for n, tc in tcs.items()},
            "settings": settings, "matching": matching, "prompts": records,
            "threads": torch.get_num_threads()}, drawn


def _matching_summary(acts, corr, threshold: float, seconds: float) -> dict:
    L = corr.shape[0]
    alive = {n: (a != 0).any(0) for n, a in acts.items()}  # [L, F]
    return {"n_tokens": int(acts["plt"].shape[0]), "threshold": threshold, "seconds": seconds,
            "per_layer": [{"matched": int((corr[ell] >= threshold).sum()),
                           "plt_alive": int(alive["plt"][ell].sum()),
                           "clt_alive": int(alive["clt"][ell].sum()),
                           "mean_corr_alive": float(corr[ell][alive["plt"][ell]].mean())
                           if bool(alive["plt"][ell].any()) else float("nan")}
                          for ell in range(L)]}


def write_outputs(out: Path, result: dict, drawn: dict, wandb_mode: str) -> dict[str, Path]:
    """Summaries, plots, compare.json, report.md (written last), then wandb."""
    from clt_eval.atomic import nan_to_none, write_json_atomic, write_text_atomic
    from clt_eval.training import compare_plots, compare_report
    from clt_eval.training.wandb_logger import WandbLogger

    out.mkdir(parents=True, exist_ok=True)
    result["summary"] = compare_report.summarize(result["prompts"],
                                                 result["settings"]["min_effect"])
    plots = compare_plots.write_plots(out, result, drawn)
    paths = {"json": write_json_atomic(out / "compare.json", nan_to_none(result))}
    paths["report"] = write_text_atomic(out / "report.md",
                                        compare_report.render(result, [p.name for p in plots]))
    logger = WandbLogger(wandb_mode, group=f"compare-{out.name}", root=out)
    logger.start("compare", {k: result[k] for k in ("model", "plt", "clt", "window",
                                                      "settings", "transcoders")},
                 job_type="compare")
    logger.table("prompts", compare_report.flat_rows(result["prompts"]))
    logger.table("groups", compare_report.group_rows(result["summary"]))
    logger.images(plots)
    logger.summary(compare_report.headline(result["summary"]))
    logger.finish()
    return paths | {p.stem: p for p in plots}
