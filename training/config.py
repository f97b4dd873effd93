"""Typed configs for runs and training. The CLI is generated from these dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from clt_eval.config import DEFAULT_ACTIVATION, PENALTY_ACTIVATIONS, LossConfig, TranscoderConfig
from clt_eval.device import check_device_name, check_dtype_name
from clt_eval.errors import check_choice, check_finite_nonneg, require


@dataclass(frozen=True)
class RunSpec:
    """One training run: what a sweep is a list of."""

    arch: str = "clt"
    penalty: str = "l1"
    decoder_norm: str = "concatenated"
    sparsity_coef: float = 0.0
    seed: int = 0
    n_features: int = 16
    k: int | None = None
    activation: str | None = None  # None: the penalty's reference activation
    topk_mode: str = "joint"
    tanh_scale: float = 1.0
    preact_coef: float = 0.0
    # The toy has 16 inputs and O(1) activations: a narrow kernel almost never sees a
    # pre-activation near θ, so θ would not learn (measured: L0 stays at 5-8 with ε = 0.05).
    jumprelu_bandwidth: float = 1.0
    jumprelu_threshold_init: float = 0.1
    skip: bool = False  # skip transcoder: add a learned linear map W_skip x to each output
    cross_layer_coef: float = 0.0  # κ: extra λ-scaled price on cross-layer decoder blocks

    def __post_init__(self) -> None:
        # Building both configs runs every field check once, in one place.
        self.loss_config()  # first: it checks the penalty name the activation depends on
        self.transcoder_config(d_model=1, n_layers=1)
        act = self.resolved_activation
        require(act in PENALTY_ACTIVATIONS[self.penalty],
                f"activation={act!r} with penalty={self.penalty!r}: expected one of "
                f"{PENALTY_ACTIVATIONS[self.penalty]}")

    @property
    def resolved_activation(self) -> str:
        return self.activation or DEFAULT_ACTIVATION[self.penalty]

    def transcoder_config(self, d_model: int, n_layers: int) -> TranscoderConfig:
        return TranscoderConfig(d_model=d_model, n_layers=n_layers, n_features=self.n_features,
                                arch=self.arch, activation=self.resolved_activation, k=self.k,
                                topk_mode=self.topk_mode,
                                jumprelu_bandwidth=self.jumprelu_bandwidth,
                                jumprelu_threshold_init=self.jumprelu_threshold_init,
                                skip=self.skip)

    def loss_config(self) -> LossConfig:
        return LossConfig(penalty=self.penalty, decoder_norm=self.decoder_norm,
                          sparsity_coef=self.sparsity_coef, tanh_scale=self.tanh_scale,
                          preact_coef=self.preact_coef,
                          cross_layer_coef=self.cross_layer_coef)

    def ensemble_key(self, mix_activations: bool = False) -> tuple:
        """Runs with equal keys share shapes and activation, so they train as one ensemble;
        arch, penalty (within an activation), decoder norm, λ, k and seed vary inside it.

        ``mix_activations``: narrow runs of different activations (ReLU, JumpReLU, TopK)
        share an ensemble too, paying one step's fixed cost instead of one per activation.
        Wide ones stay apart: only an ensemble of one sparse activation computes from its
        active features (clt_eval/sparse.py)."""
        d = asdict(self) | {"activation": self.resolved_activation}
        for name in ("arch", "penalty", "decoder_norm", "tanh_scale", "sparsity_coef", "k",
                     "seed", "cross_layer_coef"):
            d.pop(name)
        from clt_eval.sparse import SPARSE_MIN_FEATURES  # here: `--help` imports no torch

        if mix_activations and self.n_features < SPARSE_MIN_FEATURES:
            d.pop("activation")
        return tuple(sorted(d.items()))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    lr: float = 1e-2
    lr_warmup_steps: int = 100
    lr_final_frac: float = 0.05  # cosine decay to this fraction of lr
    lambda_warmup_frac: float = 0.2  # λ rises linearly from 0 over this share of steps
    batch_size: int = 0  # 0: the whole data set in every step
    log_every: int = 100
    dead_window: int = 200  # steps without firing after which a feature counts as dead (AuxK)
    # A run whose loss exceeds this multiple of its first loss is stopped as diverged (0: only
    # non-finite losses or gradients stop a run). Measured on the Boolean two-step toy, the
    # reproduce grid's largest λs raise a healthy loss to at most 1.14x its first value; a
    # blow-up raises it by orders of magnitude.
    divergence_factor: float = 1e4
    # auto: the GPU when one is visible. Only CPU float32 is bit-for-bit reproducible across
    # ensembles and resumptions; bfloat16 runs the forward pass under autocast and keeps
    # float32 master weights and optimiser state.
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_device_name(self.device, "device")
        check_dtype_name(self.dtype, "dtype")
        for name in ("steps", "lr_warmup_steps", "batch_size", "log_every", "dead_window"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 0, f"{name}={v!r}: expected an integer >= 0")
        require(self.steps > 0, f"steps={self.steps!r}: expected an integer > 0")
        for name in ("lr", "lr_final_frac", "lambda_warmup_frac"):
            check_finite_nonneg(name, getattr(self, name))
        require(self.lr > 0, f"lr={self.lr!r}: expected a number > 0")
        require(self.lambda_warmup_frac <= 1, "lambda_warmup_frac: expected a number in [0, 1]")
        check_finite_nonneg("divergence_factor", self.divergence_factor)
        require(self.divergence_factor == 0 or self.divergence_factor > 1,
                f"divergence_factor={self.divergence_factor!r}: expected 0 (off) or a number > 1")


WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class ReproduceConfig:
    """`clt-eval reproduce`: the packaged headline spec on one case study, or all of them.
    ``seeds``, ``n_features`` and ``steps`` override the spec (None: the spec's own)."""

    case_study: str = "boolean_two_step"
    out: str = "runs/reproduce"
    seeds: int | None = None
    n_features: int | None = None
    steps: int | None = None
    quick: bool = False  # a seconds-long smoke run of the same engine
    all: bool = False  # every registered case study, each into out/<name>, plus a summary
    wandb_mode: str = "offline"
    save_transcoders: bool = True
    device: str = "auto"  # replace the spec's train.device / train.dtype
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_choice("wandb_mode", self.wandb_mode, WANDB_MODES)
        check_device_name(self.device, "device")
        check_dtype_name(self.dtype, "dtype")
        for name in ("seeds", "n_features", "steps"):
            v = getattr(self, name)
            require(v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                    f"{name}={v!r}: expected an integer > 0")
