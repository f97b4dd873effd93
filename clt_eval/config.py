"""Typed configs for transcoders and their training loss.

Each config validates itself in ``__post_init__`` and raises ``CltEvalError`` naming the field
and the allowed values, so a bad name never reaches a tensor operation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from clt_eval.errors import CltEvalError, check_choice, check_finite_nonneg, require

ARCHS = ("plt", "clt")
ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")
TOPK_MODES = ("per_layer", "joint")
PENALTIES = ("l1", "tanh", "l0", "topk", "batchtopk")
DECODER_NORMS = ("concatenated", "summed", "per_block", "none")

# Which activation each penalty trains through. l1/tanh also work on a JumpReLU, but the
# plain ReLU is their reference setting (docs/concepts.md §3); l0 needs JumpReLU's learned
# threshold.
PENALTY_ACTIVATIONS = {
    "l1": ("relu", "jumprelu"),
    "tanh": ("relu", "jumprelu"),
    "l0": ("jumprelu",),
    "topk": ("topk",),
    "batchtopk": ("batchtopk",),
}
DEFAULT_ACTIVATION = {"l1": "relu", "tanh": "relu", "l0": "jumprelu", "topk": "topk",
                      "batchtopk": "batchtopk"}
# Penalties that weigh activations by a decoder norm (docs/concepts.md §3); the others take "none".
NORMED_PENALTIES = ("l1", "tanh")


def _positive_int(field: str, value: object) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{field}={value!r}: expected a positive integer")


def _number(field: str, value: object) -> None:
    """A finite number >= 0; true/false are not numbers here, though Python counts them."""
    require(not isinstance(value, bool), f"{field}={value!r}: expected a number, not a boolean")
    check_finite_nonneg(field, value)


@dataclass(frozen=True)
class TranscoderConfig:
    """Shape and activation of one transcoder (PLT or CLT)."""

    d_model: int
    n_layers: int
    n_features: int  # per layer
    arch: str = "clt"
    activation: str = "relu"
    k: int | None = None  # active features per sample (topk) or per sample on average (batchtopk)
    topk_mode: str = "joint"  # k counted per layer, or jointly across all layers
    jumprelu_bandwidth: float = 0.05  # ε of the rectangle kernel in the threshold's STE
    jumprelu_threshold_init: float = 0.1
    skip: bool = False  # add a linear skip map W_skip x to each layer's output

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_features"):
            _positive_int(name, getattr(self, name))
        check_choice("arch", self.arch, ARCHS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("topk_mode", self.topk_mode, TOPK_MODES)
        if self.activation in ("topk", "batchtopk"):
            _positive_int("k", self.k)
        else:
            require(self.k is None, f"k={self.k!r}: only topk/batchtopk activations take k")
        for name in ("jumprelu_bandwidth", "jumprelu_threshold_init"):
            _number(name, getattr(self, name))
            require(getattr(self, name) > 0, f"{name}: expected a number > 0")
        # A truthy string such as "no" must not silently switch the skip map on.
        require(isinstance(self.skip, bool), f"skip={self.skip!r}: expected true or false")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> TranscoderConfig:
        return _from_dict(cls, data, source)


@dataclass(frozen=True)
class LossConfig:
    """Sparsity penalty and auxiliary terms of the training loss (docs/concepts.md §3)."""

    penalty: str = "l1"
    decoder_norm: str = "concatenated"
    sparsity_coef: float = 0.0  # λ; ignored (must be 0) for topk/batchtopk
    tanh_scale: float = 1.0  # c in tanh(c · a · ‖W_dec‖)
    preact_coef: float = 0.0  # weight of Σ ReLU(-z), which revives dead features
    auxk_coef: float = 1 / 32  # AuxK weight for topk/batchtopk (Gao et al. 2024 use 1/32)
    # κ: a mitigation against skipping. Adds λ·κ·Σ_i a_i Σ_{t>s} ‖W_dec,i^{s→t}‖, an extra l1
    # price on cross-layer decoder blocks only. On the toy a shortcut writes y through them
    # on 4 of 16 inputs at norm 2, i.e. 0.5 per sample, so any κ > 0 makes it costlier
    # than the best PLT under summed/per-block l1, and κ > 0.48 under concatenated l1
    # (docs/concepts.md §4).
    cross_layer_coef: float = 0.0

    def __post_init__(self) -> None:
        check_choice("penalty", self.penalty, PENALTIES)
        check_choice("decoder_norm", self.decoder_norm, DECODER_NORMS)
        for name in ("sparsity_coef", "tanh_scale", "preact_coef", "auxk_coef",
                     "cross_layer_coef"):
            _number(name, getattr(self, name))
        if self.penalty in NORMED_PENALTIES:
            require(self.decoder_norm != "none",
                    f"decoder_norm='none' with penalty={self.penalty!r}: expected one of "
                    "'concatenated', 'summed', 'per_block'")
        else:
            require(self.decoder_norm == "none",
                    f"decoder_norm={self.decoder_norm!r} with penalty={self.penalty!r}: "
                    "this penalty uses no decoder norm, expected 'none'")
        if self.penalty in ("topk", "batchtopk"):
            require(self.sparsity_coef == 0,
                    f"sparsity_coef={self.sparsity_coef!r} with penalty={self.penalty!r}: "
                    "topk/batchtopk have no penalty term, expected 0")
            require(self.cross_layer_coef == 0,
                    f"cross_layer_coef={self.cross_layer_coef!r} with penalty="
                    f"{self.penalty!r}: it scales with λ, which topk/batchtopk do not have; "
                    "expected 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> LossConfig:
        return _from_dict(cls, data, source)


def _from_dict(cls, data: dict, source: str):
    """Build a dataclass from a dict, naming unknown or missing keys in one line."""
    if not isinstance(data, dict):
        raise CltEvalError(f"{source}: expected a JSON object for {cls.__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    require(not unknown, f"{source}: unknown key(s) {unknown} for {cls.__name__}; "
            f"allowed: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:  # a required field is missing
        raise CltEvalError(f"{source}: {exc}") from None
