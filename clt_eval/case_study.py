"""The case-study contract and the registry of case studies.

A case study is a plugin: one module that provides a true model whose MLP inputs/outputs are
exposed through TransformerLens hook points, its data, the ground-truth features of each step
and the ground-truth circuit. Case studies register by name in the entry-point group
``clt_eval.case_studies`` (the built-in ones too, through the project's pyproject.toml), or are
named directly as ``package.module:Factory``. Listing names never imports a model library.

Steps: ``ground_truth()`` returns one ``GroundTruthLayer`` per step of the true computation,
in layer order, any number of them, each with any number of features. The last step is the
output; every earlier step is a *middle* step. A case study written for the first, two-step
contract (one ``middle_layer`` and one ``output_layer`` attribute) keeps working: those
attributes, when present, name the output and are checked against the steps.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Protocol

import torch

from clt_eval.errors import CltEvalError, require

ENTRY_POINT_GROUP = "clt_eval.case_studies"


@dataclass(frozen=True)
class GroundTruthLayer:
    """The true features computed at one step (one model layer)."""

    layer: int
    hook: str  # hook point whose value [N, G] holds the features' activations
    names: tuple[str, ...]
    directions_GD: torch.Tensor  # what each feature writes into its layer's MLP output


@dataclass(frozen=True)
class Circuit:
    """Ground-truth circuit: nodes are input or feature names, edges are (source, target)."""

    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str], ...]
    node_layers: dict[str, int] = field(default_factory=dict)  # -1 for inputs


class CaseStudy(Protocol):
    """What every case study provides. ``middle_layer``/``output_layer`` are optional."""

    name: str
    description: str
    n_layers: int
    d_model: int
    input_hooks: tuple[str, ...]  # MLP input x_ℓ per layer
    output_hooks: tuple[str, ...]  # MLP output y_ℓ per layer

    def model(self) -> torch.nn.Module: ...  # a TransformerLens HookedRootModule

    def inputs(self) -> torch.Tensor: ...  # the data set, one row per sample

    def off_distribution_inputs(self, n: int = 512, seed: int = 0) -> torch.Tensor: ...

    def output_value(self, model_out: torch.Tensor) -> torch.Tensor: ...  # C per sample, [N]

    def ground_truth(self) -> list[GroundTruthLayer]: ...  # one per step, in layer order

    def input_directions(self) -> torch.Tensor: ...  # [I, D]: where the inputs A live

    def circuit(self) -> Circuit: ...


# ---- steps: the one place that reads the old and the new contract ------------------------
def steps(case) -> list[GroundTruthLayer]:
    """The case study's ground-truth steps, sorted by layer (the last is the output)."""
    return sorted(case.ground_truth(), key=lambda g: g.layer)


def output_layer(case) -> int:
    """Layer of the output step: the old ``output_layer`` attribute, else the last step."""
    explicit = getattr(case, "output_layer", None)
    return int(explicit) if explicit is not None else steps(case)[-1].layer


def middle_layers(case) -> list[int]:
    """Layers of every step before the output: where the intermediate variables live."""
    out = output_layer(case)
    return [g.layer for g in steps(case) if g.layer < out]


def case_study_spec(case) -> str:
    """The string that loads this case study again: how it was loaded, else its name."""
    return getattr(case, "clt_eval_spec", None) or case.name


def step_at(case, layer: int) -> GroundTruthLayer:
    return next(g for g in case.ground_truth() if g.layer == layer)


# ---- registry -----------------------------------------------------------------------------
_REGISTRY: dict[str, str] = {}  # registered in-process, by code that calls register_case_study


def register_case_study(name: str, target: str, description: str = "") -> None:
    """Register ``target`` ("package.module:Factory") under ``name`` for this process only.
    Entry points are the way to register a plugin for every command; this stays for code
    written against the first contract. ``description`` is read from the factory now."""
    _REGISTRY[name] = target


def _entry_points() -> dict[str, str]:
    """{name: "module:Factory"} from every installed package's entry points."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def case_study_targets() -> dict[str, str]:
    """Registered names and their ``module:Factory`` targets, sorted by name."""
    return dict(sorted((_entry_points() | _REGISTRY).items()))


def case_study_names() -> dict[str, str]:
    """Registered names and their one-line descriptions (imports each plugin's module)."""
    out = {}
    for name, target in case_study_targets().items():
        try:
            out[name] = str(getattr(_import_target(name, target), "description", "")).strip()
        except CltEvalError as exc:
            out[name] = f"(broken: {exc})"
    return out


def parse_name(spec: str) -> tuple[str, dict]:
    """``name`` or ``module:Factory``, optionally with ``@key=value,...`` factory arguments
    (values read as JSON where they parse: ``boolean_chain@k=4``)."""
    require(isinstance(spec, str) and spec.strip() != "",
            f"case study {spec!r}: expected a registered name or module.path:Factory")
    target, _, args = spec.partition("@")
    kwargs = {}
    for part in filter(None, args.split(",")):
        key, eq, raw = part.partition("=")
        require(eq == "=" and key.strip().isidentifier(),
                f"case study {spec!r}: argument {part!r}; expected key=value")
        try:
            kwargs[key.strip()] = json.loads(raw)
        except ValueError:
            kwargs[key.strip()] = raw
    return target.strip(), kwargs


def _import_target(label: str, target: str):
    module_name, colon, attr = target.partition(":")
    require(colon == ":" and module_name and attr,
            f"case study {label!r}: target {target!r}; expected module.path:Factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure of a plugin is the plugin's problem
        raise CltEvalError(f"case study {label!r}: module {module_name!r} does not import "
                           f"({type(exc).__name__}: {exc}); expected an importable module"
                           ) from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        require(obj is not None, f"case study {label!r}: {module_name!r} has no attribute "
                f"{attr!r}; expected a case-study factory there")
    require(callable(obj), f"case study {label!r}: {target!r} is not callable; expected a "
            "class or function that returns a case study")
    return obj


def load_case_study(spec: str, validate: bool = False, **kwargs) -> CaseStudy:
    """The case study named ``spec`` (a registered name or ``module:Factory``, with optional
    ``@key=value`` arguments). ``validate`` also checks it against the contract (builds and
    runs its model once)."""
    target, args = parse_name(spec)
    if ":" not in target:
        registered = case_study_targets()
        if target not in registered:
            allowed = ", ".join(registered) or "(none registered)"
            raise CltEvalError(f"case study {target!r} is not registered; allowed: {allowed}, "
                               "or module.path:Factory")
        target = registered[target]
    factory = _import_target(spec, target)
    try:
        case = factory(**(args | kwargs))
    except CltEvalError:
        raise
    except Exception as exc:
        raise CltEvalError(f"case study {spec!r}: {target} raised {type(exc).__name__}: {exc}"
                           ) from None
    try:  # remembered so saved transcoders name what reloads it (arguments included)
        case.clt_eval_spec = spec
    except AttributeError:  # a frozen or slotted plugin object: its name must do
        pass
    from clt_eval.contract import check_case_study, check_interface

    (check_case_study if validate else check_interface)(case, spec)
    return case
