"""Where a transcoder sits in a language model: which model layers, which hook points.

A transcoder's layer index ℓ = 0..L-1 is *its own*; ``layers[ℓ]`` is the model layer it
replaces. A transcoder trained on a window of a model (e.g. layers 4..7 of 30) therefore has
L = 4 and ``layers = (4, 5, 6, 7)``. The window travels with the weights: clt-eval's own
format keeps it in ``config.json``'s ``extra["window"]``; the circuit-tracer and sae_lens
layouts carry the hook names and layer indices in their own fields.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass

from clt_eval.errors import CltEvalError, require

# docs/concepts.md §2: the MLP input after the block's second normalisation, and the MLP output.
DEFAULT_INPUT_HOOK = "blocks.{layer}.ln2.hook_normalized"
DEFAULT_OUTPUT_HOOK = "blocks.{layer}.hook_mlp_out"


@dataclass(frozen=True)
class LayerWindow:
    layers: tuple[int, ...]
    input_hook: str = DEFAULT_INPUT_HOOK  # a template with "{layer}"
    output_hook: str = DEFAULT_OUTPUT_HOOK
    model_name: str | None = None  # what the transcoder was trained on, if known

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        require(len(self.layers) > 0, "layers: expected at least one model layer")
        require(all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                    for x in self.layers),
                f"layers={list(self.layers)}: expected model layer indices >= 0")
        require(list(self.layers) == sorted(set(self.layers)),
                f"layers={list(self.layers)}: expected distinct layers in increasing order")
        for name in ("input_hook", "output_hook"):
            template = getattr(self, name)
            # Only {layer} is filled in: any other placeholder would fail later, mid-job.
            fields = _placeholders(template) if isinstance(template, str) else None
            require(fields == {"layer"},
                    f"{name}={template!r}: expected a template whose only placeholder is "
                    "'{layer}'")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def input_hooks(self) -> tuple[str, ...]:
        return tuple(self.input_hook.format(layer=x) for x in self.layers)

    def output_hooks(self) -> tuple[str, ...]:
        return tuple(self.output_hook.format(layer=x) for x in self.layers)

    def to_dict(self) -> dict:
        return asdict(self) | {"layers": list(self.layers)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "window") -> LayerWindow:
        if not isinstance(data, dict):
            raise CltEvalError(f"{source}: expected a JSON object with 'layers'")
        allowed = {"layers", "input_hook", "output_hook", "model_name"}
        unknown = sorted(set(data) - allowed)
        require(not unknown, f"{source}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        require("layers" in data, f"{source}: missing field 'layers'")
        try:
            return cls(**data)
        except CltEvalError as exc:
            raise CltEvalError(f"{source}: {exc}") from None


def _placeholders(template: str) -> set[str] | None:
    """The names of a format string's fields, or None if it does not parse."""
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError:
        return None
