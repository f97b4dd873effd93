"""Check a case study against the contract, with one-line errors naming the field.

Run when a command loads a case study (before anything is written) and by the shared
contract test over every registered case study. It builds the true model and runs the data
through it once, so it catches what a plugin author most often gets wrong: a hook the model
does not have, a tensor of the wrong shape, a circuit that names nodes nobody declared.
"""

from __future__ import annotations

import torch

from clt_eval.case_study import middle_layers, output_layer, steps
from clt_eval.errors import CltEvalError, require

FIELDS = ("name", "description", "n_layers", "d_model", "input_hooks", "output_hooks")
METHODS = ("model", "inputs", "off_distribution_inputs", "output_value", "ground_truth",
           "input_directions", "circuit")


def check_interface(case, label: str | None = None) -> None:
    """The checks that need no model: the object has the contract's fields and methods, and
    its sizes are positive integers. Cheap, so every load makes them."""
    label = label or getattr(case, "name", type(case).__name__)

    def need(cond: bool, what: str) -> None:
        require(cond, f"case study {label!r}: {what}")

    need(case is not None, "the factory returned None; expected a case-study object")
    for f in FIELDS:
        need(hasattr(case, f), f"field {f!r} missing; expected it on the case-study object")
    for m in METHODS:
        need(callable(getattr(case, m, None)), f"method {m}() missing")
    L, D = case.n_layers, case.d_model
    need(isinstance(L, int) and L > 0, f"n_layers={L!r}; expected an integer > 0")
    need(isinstance(D, int) and D > 0, f"d_model={D!r}; expected an integer > 0")
    for f in ("input_hooks", "output_hooks"):
        hooks = getattr(case, f)
        need(isinstance(hooks, tuple | list) and len(hooks) == L,
             f"{f} has {len(hooks) if hasattr(hooks, '__len__') else '?'} entries; expected "
             f"one hook name per layer ({L})")


def check_case_study(case, label: str | None = None) -> None:
    """Raise ``CltEvalError`` naming the case study, the field and what was expected."""
    label = label or getattr(case, "name", type(case).__name__)

    def need(cond: bool, what: str) -> None:
        require(cond, f"case study {label!r}: {what}")

    check_interface(case, label)
    L, D = case.n_layers, case.d_model
    model = _call(case, "model", label)
    hook_dict = getattr(model, "hook_dict", None)
    need(isinstance(hook_dict, dict), "model() returned no hook_dict; expected a "
         "TransformerLens HookedRootModule (call self.setup() in its __init__)")
    for f in ("input_hooks", "output_hooks"):
        for h in getattr(case, f):
            need(h in hook_dict, f"{f}: hook {h!r} is not a hook point of the model")
    gt = _check_steps(case, need, hook_dict, L, D)
    _check_run(case, model, gt, need, label)
    _check_circuit(case, gt, need, L)


def _call(case, method: str, label: str, *args):
    try:
        return getattr(case, method)(*args)
    except CltEvalError:
        raise
    except Exception as exc:
        raise CltEvalError(f"case study {label!r}: {method}() raised "
                           f"{type(exc).__name__}: {exc}") from None


def _check_steps(case, need, hook_dict, L, D):
    gt = _call(case, "ground_truth", getattr(case, "name", "?"))
    need(isinstance(gt, list | tuple) and len(gt) >= 2,
         f"ground_truth() returned {len(gt) if hasattr(gt, '__len__') else gt!r} steps; "
         "expected a list of at least 2 GroundTruthLayer (a middle step and the output)")
    for i, g in enumerate(gt):  # a plugin's own objects: their fields are checked, not trusted
        need(all(hasattr(g, f) for f in ("layer", "hook", "names", "directions_GD")),
             f"ground_truth()[{i}] is {type(g).__name__}; expected a GroundTruthLayer "
             "(layer, hook, names, directions_GD)")
        need(isinstance(g.directions_GD, torch.Tensor),
             f"ground_truth()[{i}].directions_GD is {type(g.directions_GD).__name__}; "
             "expected a tensor [G, d_model]")
    layers = [g.layer for g in gt]
    need(len(set(layers)) == len(layers), f"ground_truth(): layers {layers} repeat; expected "
         "one step per layer")
    for g in gt:
        where = f"ground_truth() step at layer {g.layer}"
        need(isinstance(g.layer, int) and not isinstance(g.layer, bool) and 0 <= g.layer < L,
             f"{where}: layer out of range; expected 0..{L - 1}")
        need(isinstance(g.hook, str), f"{where}: hook {g.hook!r}; expected a hook name")
        need(g.hook in hook_dict, f"{where}: hook {g.hook!r} is not a hook point of the model")
        need(len(g.names) > 0 and len(set(g.names)) == len(g.names),
             f"{where}: names {list(g.names)}; expected one or more distinct names")
        shape = tuple(getattr(g.directions_GD, "shape", ()))
        need(shape == (len(g.names), D), f"{where}: directions_GD has shape {shape}; expected "
             f"[{len(g.names)}, {D}] (one row per feature, d_model columns)")
        need(bool(torch.isfinite(g.directions_GD).all()) and
             bool((g.directions_GD.norm(dim=-1) > 0).all()),
             f"{where}: directions_GD has a zero or non-finite row; expected a direction "
             "for every feature")
    out = output_layer(case)
    need(out in layers, f"output_layer={out}; expected one of the step layers {layers}")
    need(len(middle_layers(case)) >= 1, f"output_layer={out}; expected at least one step "
         "before it")
    mid = getattr(case, "middle_layer", None)
    need(mid is None or mid in middle_layers(case),
         f"middle_layer={mid}; expected one of the steps before the output "
         f"{middle_layers(case)}")
    return steps(case)


def _check_run(case, model, gt, need, label) -> None:
    inputs = _call(case, "inputs", label)
    need(isinstance(inputs, torch.Tensor) and inputs.shape[0] > 1,
         "inputs() returned no tensor of at least 2 samples; expected [N, ...]")
    names = set(case.input_hooks) | set(case.output_hooks) | {g.hook for g in gt}
    try:
        with torch.no_grad():
            out, cache = model.run_with_cache(inputs, names_filter=lambda n: n in names)
    except Exception as exc:
        raise CltEvalError(f"case study {label!r}: model() failed on inputs() "
                           f"({type(exc).__name__}: {exc})") from None
    n, D = inputs.shape[0], case.d_model
    for h in (*case.input_hooks, *case.output_hooks):
        shape = tuple(cache[h].shape)
        need(shape == (n, D), f"hook {h!r} holds shape {shape}; expected [{n}, {D}] "
             "(one row per sample)")
    for g in gt:
        shape = tuple(cache[g.hook].shape)
        need(shape == (n, len(g.names)), f"ground_truth() step at layer {g.layer}: hook "
             f"{g.hook!r} holds shape {shape}; expected [{n}, {len(g.names)}]")
    try:
        value = case.output_value(out)
    except Exception as exc:
        raise CltEvalError(f"case study {label!r}: output_value() raised "
                           f"{type(exc).__name__}: {exc}") from None
    need(isinstance(value, torch.Tensor), f"output_value() returned {type(value).__name__}; "
         f"expected a tensor [{n}]")
    need(tuple(value.shape) == (n,), f"output_value() has shape {tuple(value.shape)}; "
         f"expected [{n}]")
    need(bool(torch.isfinite(value).all()), "output_value() is not finite on inputs()")
    if getattr(model, "batch_invariant", False):  # claimed, so checked: evaluation relies on it
        with torch.no_grad():
            alone = model(inputs[:1])
        need(torch.equal(alone, out[:1]), "the model declares batch_invariant, but sample 0's "
             "output alone differs from its output among inputs(); expected bitwise the same "
             "(compute every product row by row, e.g. with clt_eval.transcoder.row_matmul)")
    dirs = _call(case, "input_directions", label)
    need(isinstance(dirs, torch.Tensor) and dirs.dim() == 2 and dirs.shape[1] == D,
         f"input_directions() has shape {tuple(getattr(dirs, 'shape', ()))}; expected "
         f"[I, {D}]")
    off = _call(case, "off_distribution_inputs", label, 4, 0)
    need(isinstance(off, torch.Tensor) and off.shape[0] == 4,
         "off_distribution_inputs(4, 0) did not return 4 samples")


def _check_circuit(case, gt, need, L) -> None:
    circuit = _call(case, "circuit", getattr(case, "name", "?"))
    need(all(hasattr(circuit, f) for f in ("nodes", "edges", "node_layers")),
         f"circuit() returned {type(circuit).__name__}; expected a Circuit (nodes, edges, "
         "node_layers)")
    nodes = set(circuit.nodes)
    need(len(nodes) == len(circuit.nodes), "circuit(): nodes repeat; expected unique names")
    need(len(circuit.edges) > 0, "circuit(): no edges")
    for src, dst in circuit.edges:
        need(src in nodes and dst in nodes, f"circuit(): edge ({src!r}, {dst!r}) names a node "
             "not in circuit().nodes")
    for node, layer in circuit.node_layers.items():
        need(node in nodes, f"circuit().node_layers names unknown node {node!r}")
        need(-1 <= layer < L, f"circuit().node_layers[{node!r}]={layer}; expected -1 (an "
             f"input) or a layer 0..{L - 1}")
    for g in gt:
        missing = [n for n in g.names if n not in nodes]
        need(not missing, f"circuit(): ground-truth features {missing} (layer {g.layer}) are "
             "not nodes of the circuit")
        wrong = [n for n in g.names if circuit.node_layers.get(n, g.layer) != g.layer]
        need(not wrong, f"circuit().node_layers: {wrong} disagree with their step's layer "
             f"{g.layer}")
