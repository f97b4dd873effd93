"""The case-study contract (GUIDE §8.8) and the registry of case studies.

A case study is a plugin: one module that provides a true model whose MLP inputs/outputs are
exposed through TransformerLens hook points, its data, the ground-truth features of each layer
and the ground-truth circuit. The registry maps a name to ``"module:attribute"`` so listing
case studies never imports a model library.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol

import torch

from clt_eval.errors import CltEvalError


@dataclass(frozen=True)
class GroundTruthLayer:
    """The true features computed at one layer."""

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
    """What every case study provides."""

    name: str
    description: str
    n_layers: int
    d_model: int
    input_hooks: tuple[str, ...]  # MLP input x_ℓ per layer
    output_hooks: tuple[str, ...]  # MLP output y_ℓ per layer
    middle_layer: int  # where the intermediate step B is computed
    output_layer: int  # where the output C is computed

    def model(self) -> torch.nn.Module: ...  # a TransformerLens HookedRootModule

    def inputs(self) -> torch.Tensor: ...  # the data set, one row per sample

    def off_distribution_inputs(self, n: int = 512, seed: int = 0) -> torch.Tensor: ...

    def output_value(self, model_out: torch.Tensor) -> torch.Tensor: ...  # C per sample, [N]

    def ground_truth(self) -> list[GroundTruthLayer]: ...

    def input_directions(self) -> torch.Tensor: ...  # [I, D]: where the inputs A live

    def circuit(self) -> Circuit: ...


_REGISTRY: dict[str, tuple[str, str]] = {}


def register_case_study(name: str, target: str, description: str) -> None:
    """Register ``target`` ("package.module:Factory") under ``name``."""
    _REGISTRY[name] = (target, description)


def case_study_names() -> dict[str, str]:
    """Registered names and their one-line descriptions."""
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def load_case_study(name: str, **kwargs) -> CaseStudy:
    if name not in _REGISTRY:
        allowed = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise CltEvalError(f"case study {name!r} is not registered; allowed: {allowed}")
    module_name, attr = _REGISTRY[name][0].split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**kwargs)
