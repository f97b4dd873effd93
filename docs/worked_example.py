"""Compute the worked example of docs/concepts.md §5.1 on the Boolean two-step toy.

    python docs/worked_example.py   # prints the numbers the page quotes, as Markdown rows

Three hand-built transcoders (weights written down, not trained):

- ``faithful``: the four half-XORs at layer 0 and the AND-of-XORs at layer 1 (the true
  circuit, from ``boolean_two_step_costs``);
- ``half_skip``: the same half-XORs, but y is written half by a layer-1 AND feature (y/2 = 1)
  and half by four layer-0 "corner" features, one per input where y = 2, through their
  cross-layer decoders (y/2 each);
- ``no_output``: the half-XORs alone; nothing writes layer 1.

tests/test_docs.py recomputes every number and checks that the page quotes it.
"""

from __future__ import annotations

import torch

NAMES = ("faithful", "half_skip", "no_output")


def transcoders() -> dict:
    from clt_eval.case_studies.boolean_two_step import D_MODEL, Y, all_inputs
    from clt_eval.case_studies.boolean_two_step_costs import (
        WIDTH,
        _and_of_xors,
        _half_xor,
        _point,
        decompositions,
    )
    from clt_eval.costs import hand_built

    half_xors = [(0, *_half_xor(i)) for i in range(4)]
    and_enc, _ = _and_of_xors()
    e_y = torch.eye(D_MODEL)[Y]
    corners = [p for p in all_inputs() if p[0] != p[1] and p[2] != p[3]]
    half = half_xors + [(1, and_enc, {1: e_y})]
    half += [(0, _point(p, True)[0], {1: e_y}) for p in corners]
    return {"faithful": decompositions()["faithful"],
            "half_skip": hand_built("clt", D_MODEL, 2, WIDTH, half),
            "no_output": hand_built("plt", D_MODEL, 2, WIDTH, half_xors)}


def numbers() -> dict[str, dict]:
    """{decomposition: {metric: value}} for the metrics the page works through."""
    from clt_eval.case_study import load_case_study
    from clt_eval.costs import sparsity_costs
    from clt_eval.evaluate import evaluate
    from clt_eval.replacement import collect_mlp_io

    case = load_case_study("boolean_two_step")
    model = case.model()
    x, _, _ = collect_mlp_io(model, case.inputs(), case.input_hooks, case.output_hooks, [])
    out = {}
    for name, tc in transcoders().items():
        m = evaluate(case, tc, model)[0]
        costs = sparsity_costs(tc, x)
        out[name] = {
            "nmse_per_layer": m["nmse_per_layer"], "l0_per_layer": m["l0_per_layer"],
            "l0_total": m["l0_total"], "skip_fraction": m["skip_fraction"],
            "cross_layer_share": m["cross_layer_share"],
            "middle_feature_recovery": m["middle_feature_recovery"],
            "output_accuracy": m["output_accuracy"],
            "intervention_agreement": m["intervention_agreement"],
            "circuit_edge_precision": m["circuit_edge_precision"],
            "circuit_edge_recall": m["circuit_edge_recall"],
            "shortcut_edges": m["shortcut_edges"], "path_depth": m["path_depth"],
            "l1_concatenated": float(costs["l1/concatenated"][0]),
            "l1_summed": float(costs["l1/summed"][0]),
            "tanh_concatenated": float(costs["tanh/concatenated"][0]),
        }
    return out


def fmt(v) -> str:
    """How the page writes a number: up to 3 decimals, trailing zeros dropped; – for None."""
    if v is None:
        return "–"
    if isinstance(v, list):
        return "(" + ", ".join(fmt(x) for x in v) + ")"
    if isinstance(v, bool):
        return str(v)
    text = f"{float(v):.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


ROWS = (("NMSE per layer", "nmse_per_layer"), ("L0 per layer", "l0_per_layer"),
        ("total L0", "l0_total"), ("skip fraction", "skip_fraction"),
        ("cross-layer share", "cross_layer_share"),
        ("middle recovery", "middle_feature_recovery"), ("output accuracy", "output_accuracy"),
        ("intervention agreement", "intervention_agreement"),
        ("edge precision", "circuit_edge_precision"), ("edge recall", "circuit_edge_recall"),
        ("shortcut edges", "shortcut_edges"), ("path depth", "path_depth"),
        ("l1 cost, concatenated", "l1_concatenated"), ("l1 cost, summed", "l1_summed"),
        ("tanh cost, concatenated", "tanh_concatenated"))


def table(values: dict[str, dict]) -> str:
    lines = ["| metric | " + " | ".join(f"`{n}`" for n in NAMES) + " |",
             "|---|" + "---|" * len(NAMES)]
    for label, key in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt(values[n][key]) for n in NAMES) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(numbers()))
