"""Summaries and report.md for `clt-eval compare`. Every number comes from
``clt_eval.lm.graph_metrics`` (through the prompt records); this module only averages and
arranges them."""

from __future__ import annotations

import math

import numpy as np
import torch

from clt_eval.lm.graph_metrics import effect_agreement, n_early_layers

NAMES = ("plt", "clt")
VARIANTS = ("frozen", "whole")
PRIMARY = ("zero", "all")  # the intervention the headline numbers use: kind, scope
SCALARS = ("early_share", "direct_early_share", "l0_total", "l0_cv", "l0_entropy",
           "l0_late_minus_early", "mean_path_length", "mean_feature_hops", "window_replacement",
           "window_completeness", "replacement", "completeness", "n_features_active",
           "n_features_pruned", "n_features_pruned_all_errors", "seconds")
VECTORS = ("influence_by_layer", "direct_by_layer", "l0_per_layer")
LABELS = {
    "early_share": "early-layer share of influence",
    "direct_early_share": "early-layer share of direct logit edges",
    "l0_total": "L0 per token (sum over layers)", "l0_cv": "L0 spread: CV across layers",
    "l0_entropy": "L0 spread: normalised entropy", "l0_late_minus_early":
    "L0 (late − early half) / mean", "mean_path_length": "mean path length (edges)",
    "mean_feature_hops": "mean feature hops (paths via features)",
    "window_replacement": "replacement score (window)",
    "window_completeness": "completeness score (window)",
    "replacement": "replacement score (all MLPs)", "completeness": "completeness (all MLPs)",
    "n_features_active": "active feature nodes", "n_features_pruned": "feature nodes after "
    "pruning (window)", "n_features_pruned_all_errors": "feature nodes after pruning (all "
    "errors ranked)", "seconds": "attribution seconds"}


def _mean(values) -> float:
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    return float(np.mean(v)) if v else float("nan")


def _above(a, b) -> bool:
    """a > b, False when either is undefined (NaN, or None as compare.json stores NaN)."""
    return a is not None and b is not None and float(a) > float(b)


def _groups(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["group"] for r in records))


def agreement(records: list[dict], kind: str, scope: str, min_effect: float,
              layer: int | None = None) -> dict:
    """{name_variant: effect_agreement} over every (prompt, layer) case of kind and scope (and
    model ``layer``, if given), on the answer's log-prob; plus the mean |Δ| of the real model
    and of each replacement."""
    cases = [c for r in records for c in r["interventions"]
             if c["kind"] == kind and c["scope"] == scope and layer in (None, c["model_layer"])]
    if not cases:
        return {}
    true = torch.tensor([c["true"]["dlogprob"] for c in cases])
    out = {"true_mean_abs": float(true.abs().mean()), "n": len(cases)}
    if all("no_response" in c for c in cases):
        base = torch.tensor([c["no_response"]["dlogprob"] for c in cases])
        out["no_response"] = effect_agreement(true, base, min_effect) | {
            "pred_mean_abs": float(base.abs().mean())}
    for name in NAMES:
        for v in VARIANTS:
            pred = torch.tensor([c[f"{name}_{v}"]["dlogprob"] for c in cases])
            out[f"{name}_{v}"] = effect_agreement(true, pred, min_effect) | {
                "pred_mean_abs": float(pred.abs().mean())}
    return out


def summarize(records: list[dict], min_effect: float) -> dict:
    """Per group (and "all"): means of every scalar and per-layer metric for PLT and CLT, the
    paired CLT−PLT differences, graph overlap, and intervention agreement."""
    out = {}
    for group in [*_groups(records), "all"]:
        rs = [r for r in records if group in ("all", r["group"])]
        s = {"n_prompts": len(rs), "target_prob": _mean(r["target_prob"] for r in rs),
             "answer_correct": _mean(float(r["answer_correct"]) for r in rs
                                     if r["answer_correct"] is not None)}
        for name in NAMES:
            s[name] = {k: _mean(r[name].get(k) for r in rs) for k in SCALARS}
            for k in VECTORS:
                s[name][k] = np.nanmean([r[name][k] for r in rs], 0).tolist()
        s["clt_above_plt"] = {k: int(sum(_above(r["clt"][k], r["plt"][k]) for r in rs))
                              for k in SCALARS}
        s["overlap"] = {k: _mean(r["overlap"][k] for r in rs)
                        for k in ("jaccard", "cell_jaccard", "n_a_mappable", "n_shared")}
        s["agreement"] = agreement(rs, *PRIMARY, min_effect)
        layers = sorted({c["model_layer"] for r in rs for c in r["interventions"]})
        s["agreement_by_layer"] = {f"layer {m}": agreement(rs, *PRIMARY, min_effect, m)
                                   for m in layers}
        kinds = sorted({(c["kind"], c["scope"]) for r in rs for c in r["interventions"]})
        s["agreement_by_kind"] = {f"{k}/{sc}": agreement(rs, k, sc, min_effect)
                                  for k, sc in kinds}
        out[group] = s
    return out


# ---- tables -------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows])


def _group_table(summary: dict) -> str:
    groups = list(summary)
    header = ["metric"] + [f"{g} {n.upper()}" for g in groups for n in NAMES]
    rows = [[LABELS[k]] + [summary[g][n][k] for g in groups for n in NAMES] for k in SCALARS]
    rows.append(["matched-node Jaccard (PLT vs CLT)"]
                + [summary[g]["overlap"]["jaccard"] for g in groups for _ in NAMES])
    rows.append(["(layer, position) Jaccard"]
                + [summary[g]["overlap"]["cell_jaccard"] for g in groups for _ in NAMES])
    return _table(header, rows)


def _layer_table(summary: dict, key: str) -> str:
    groups = list(summary)
    L = len(summary["all"]["plt"][key])
    header = ["group", "transcoder"] + [f"layer {i}" for i in range(L)]
    return _table(header, [[g, n.upper(), *summary[g][n][key]] for g in groups for n in NAMES])


def _agreement_table(blocks: dict[str, dict]) -> str:
    header = ["cases", "replacement", "n", "mean abs Δ true", "mean abs Δ pred", "corr",
              "rank corr", "mean abs diff", "slope", "sign & ≥ half", "n counted"]
    rows = []
    keys = [(f"{n}_{v}", f"{n.upper()} {v}") for n in NAMES for v in VARIANTS]
    keys.append(("no_response", "control: later window MLPs frozen"))
    for label, a in blocks.items():
        for key, name in keys:
            if key not in a:
                continue
            m = a[key]
            rows.append([label, name, a["n"], a["true_mean_abs"], m["pred_mean_abs"],
                         m["corr"], m["spearman"], m["mad"], m["slope"], m["sign_and_half"],
                         m["n_moved"]])
    return _table(header, rows)


def _prompt_table(records: list[dict]) -> str:
    header = ["group", "prompt", "answer (p)", "correct", "early PLT", "early CLT", "L0 PLT",
              "L0 CLT", "path PLT", "path CLT", "repl PLT", "repl CLT", "compl PLT",
              "compl CLT", "Jaccard"]
    rows = [[r["group"], _short(r["text"]), f"{r['target_str']!r} ({r['target_prob']:.2f})",
             r["answer_correct"], r["plt"]["early_share"], r["clt"]["early_share"],
             r["plt"]["l0_total"], r["clt"]["l0_total"], r["plt"]["mean_path_length"],
             r["clt"]["mean_path_length"], r["plt"]["window_replacement"],
             r["clt"]["window_replacement"], r["plt"]["window_completeness"],
             r["clt"]["window_completeness"], r["overlap"]["jaccard"]] for r in records]
    return _table(header, rows)


def _intervention_table(records: list[dict]) -> str:
    header = ["prompt", "model layer", "Δ true", "Δ PLT frozen", "Δ PLT whole", "Δ CLT frozen",
              "Δ CLT whole"]
    rows = [[_short(r["text"], 40), c["model_layer"], c["true"]["dlogprob"],
             *[c[f"{n}_{v}"]["dlogprob"] for n in NAMES for v in VARIANTS]]
            for r in records for c in r["interventions"] if (c["kind"], c["scope"]) == PRIMARY]
    return _table(header, rows)


def _short(text: str, n: int = 48) -> str:
    t = text.replace("|", "/").replace("\n", " ")
    return t if len(t) <= n else t[:n - 1] + "…"


# ---- report.md ----------------------------------------------------------------------------------
def render(result: dict, plots: list[str]) -> str:
    s, records = result["summary"], result["prompts"]
    L = len(result["window"]["layers"])
    k = n_early_layers(L)
    early = result["window"]["layers"][:k]
    st = result["settings"]
    parts = [
        f"# PLT vs CLT on {result['model']}\n",
        f"- PLT: `{result['plt']}` ({_arch(result, 'plt')})\n- CLT: `{result['clt']}` "
        f"({_arch(result, 'clt')})\n- window: model layers {result['window']['layers']}; "
        f"\"early\" = window layers 0..{k - 1} (model layers {early})\n"
        f"- {len(records)} prompts in groups {', '.join(_groups(records))}; BOS given no "
        f"features: {st['skip_first']}; pruning thresholds: nodes {st['node_threshold']}, "
        f"edges {st['edge_threshold']}; torch threads: {result.get('threads')}\n",
        DEFINITIONS.replace("{thr}", str(st["corr_threshold"]))
        .replace("{min_effect}", str(st["min_effect"])),
        "## Means per prompt group\n", _group_table(s),
        "\nHow many prompts have CLT > PLT, per metric (paired, all prompts): "
        + ", ".join(f"{LABELS[m]} {s['all']['clt_above_plt'][m]}/{s['all']['n_prompts']}"
                    for m in ("early_share", "l0_cv", "mean_path_length", "mean_feature_hops",
                              "window_replacement", "window_completeness")) + ".\n",
        "### Share of the feature nodes' influence on the answer, by window layer\n",
        _layer_table(s, "influence_by_layer"),
        "\n### L0 per token, by window layer\n", _layer_table(s, "l0_per_layer"),
        "\n## Interventions at middle window layers\n",
        "Change of the answer's log-prob (nats), real model vs replacement; zero-ablation of "
        "the MLP output at every position after BOS, per prompt group:\n",
        _agreement_table({g: s[g]["agreement"] for g in s if s[g]["agreement"]}),
        "\nThe same, all prompts, per ablated layer:\n",
        _agreement_table(s["all"]["agreement_by_layer"]),
        "\nEvery kind of intervention (all prompts; `patch` = the MLP output taken from the "
        "prompt's `patch_from`, where the two have the same length):\n",
        _agreement_table(s["all"]["agreement_by_kind"]),
        "\n" + _findings(s),
        "## Feature matching (PLT → CLT)\n", _matching_table(result["matching"]),
        "\n## Per prompt\n", _prompt_table(records),
        "\n### Interventions per prompt (zero-ablation, all positions after BOS)\n",
        _intervention_table(records),
        "\n## Plots\n", "\n".join(f"![{p.rsplit('.', 1)[0]}]({p})" for p in plots), ""]
    return "\n".join(parts)


DEFINITIONS = """## What is measured (`clt_eval.lm.graph_metrics`)

- **early-layer share**: of the feature nodes' influence on the answer's logit (influence
  I = w(Â + Â² + …) with Â the row-normalised |A|, Ameisen et al. 2025), the share carried by
  features in the window's first half. The direct variant counts only one-edge paths.
- **L0 per token** by window layer, and its spread across layers (coefficient of variation;
  normalised entropy, 1 = even; late-minus-early over the mean).
- **mean path length**: Σ_k k·m_k / Σ_k m_k with m_k = Σ_{embeddings} (wÂᵏ), the mass of
  k-edge paths from the embeddings to the answer. **Feature hops**: the mean number of
  features on the paths that pass through at least one, from embeddings or error nodes.
- **replacement / completeness** (window): the graph scores with out-of-window MLPs counted
  as inputs, so only the transcoder's own error lowers them.
- **matched-node Jaccard**: PLT features are matched one-to-one to CLT features per layer
  by activation correlation (Hungarian); a PLT node (layer, position, feature) of the pruned
  graph becomes its partner's node if their correlation is ≥ {thr}; Jaccard of the two
  pruned graphs' feature-node sets. Pruning (Ameisen et al. 2025) ranks features and the
  window's error nodes; the error nodes of MLPs outside the window count as inputs, as in
  the window scores (ranked too, they leave only a feature or two per graph).
- **interventions**: zero (or patch) the MLP output of a middle window layer in the real
  model, and the same place in each replacement — the spliced model with error terms frozen at
  their clean values (attention, norms and MLPs outside the window live). `frozen`: only the
  transcoder's ŷ is changed, its error node stays; `whole`: the whole output, error included,
  so only the later window layers' response can differ. Agreement: Pearson correlation, mean
  absolute difference, slope through 0 (Σ pred·true / Σ true²; < 1 under-predicts), and the
  fraction of cases with |Δ true| ≥ {min_effect} where the prediction has the right sign and at
  least half the size.
"""


def _findings(s: dict) -> str:
    a = s["all"]
    lines = ["### What the numbers say\n"]
    for key, label in (("early_share", "early-layer share"),
                       ("mean_path_length", "mean path length"),
                       ("mean_feature_hops", "feature hops"),
                       ("window_replacement", "replacement score"),
                       ("window_completeness", "completeness score")):
        p, c = a["plt"][key], a["clt"][key]
        lines.append(f"- {label}: PLT {_fmt(p)}, CLT {_fmt(c)} (CLT higher in "
                     f"{a['clt_above_plt'][key]}/{a['n_prompts']} prompts).")
    ag = a["agreement"]
    for v in VARIANTS if ag else ():
        p, c = ag[f"plt_{v}"], ag[f"clt_{v}"]
        lines.append(f"- interventions ({v}): slope PLT {_fmt(p['slope'])}, CLT "
                     f"{_fmt(c['slope'])}; correlation PLT {_fmt(p['corr'])}, CLT "
                     f"{_fmt(c['corr'])}; rank correlation PLT {_fmt(p['spearman'])}, CLT "
                     f"{_fmt(c['spearman'])}; right sign and ≥ half the size PLT "
                     f"{_fmt(p['sign_and_half'])}, CLT {_fmt(c['sign_and_half'])}.")
    if ag and "no_response" in ag:
        b = ag["no_response"]
        lines.append(f"- control (later window MLPs frozen, what a replacement whose later "
                     f"layers do not respond predicts): slope {_fmt(b['slope'])}, correlation "
                     f"{_fmt(b['corr'])}, rank correlation {_fmt(b['spearman'])}.")
    if ag:
        under = ag["clt_whole"]["slope"] < ag["plt_whole"]["slope"]
        lines.append("- " + ("The CLT predicts smaller effects of middle-layer ablations than "
                             "the PLT (lower slope, whole variant), as a CLT that writes later "
                             "layers from early features would." if under else
                             "The CLT does not under-predict middle-layer ablations relative "
                             "to the PLT (slope, whole variant)."))
    return "\n".join(lines) + "\n"


def _matching_table(m: dict) -> str:
    rows = [[i, r["plt_alive"], r["clt_alive"], r["matched"], r["mean_corr_alive"]]
            for i, r in enumerate(m["per_layer"])]
    return (f"On {m['n_tokens']} tokens; a pair counts as the same feature at correlation ≥ "
            f"{m['threshold']}.\n\n" + _table(["window layer", "PLT alive", "CLT alive",
                                               "pairs ≥ threshold",
                                               "mean corr (alive PLT)"], rows))


def _arch(result: dict, name: str) -> str:
    c = result["transcoders"][name]
    return f"arch {c['arch']}, {c['n_features']} features/layer, {c['activation']}"


# ---- wandb rows ---------------------------------------------------------------------------------
def flat_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        row = {"group": r["group"], "text": r["text"], "target": r["target_str"],
               "target_prob": r["target_prob"], "jaccard": r["overlap"]["jaccard"]}
        for n in NAMES:
            row |= {f"{n}/{k}": r[n][k] for k in SCALARS}
        rows.append(row)
    return rows


def group_rows(summary: dict) -> list[dict]:
    return [{"group": g, "transcoder": n, **{k: s[n][k] for k in SCALARS},
             "jaccard": s["overlap"]["jaccard"],
             **{f"{v}/{m}": s["agreement"].get(f"{n}_{v}", {}).get(m)
                for v in VARIANTS for m in ("corr", "spearman", "mad", "slope",
                                              "sign_and_half")}}
            for g, s in summary.items() for n in NAMES]


def headline(summary: dict) -> dict:
    a = summary["all"]
    out = {f"{n}/{k}": a[n][k] for n in NAMES for k in SCALARS}
    out["jaccard"] = a["overlap"]["jaccard"]
    for key, m in a["agreement"].items():
        if isinstance(m, dict):
            out |= {f"{key}/{k}": v for k, v in m.items()}
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, float)
                                                                    and math.isnan(v))}
