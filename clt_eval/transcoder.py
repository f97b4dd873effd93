"""One transcoder interface for per-layer (PLT) and cross-layer (CLT) transcoders.

A ``Transcoder`` holds an *ensemble* of R runs that share shapes and activation; a single
transcoder is an ensemble of one. PLT and CLT differ only in which decoder blocks s→ℓ exist:
the structural mask ``decoder_mask_RST`` is the identity for a PLT and upper-triangular
(ℓ ≥ s) for a CLT (docs/concepts.md §2). Nothing else in the library needs to know which is which.

Shapes: R runs, B samples, L layers (S source, T target), F features per layer, D d_model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from clt_eval import activations as act
from clt_eval.config import TranscoderConfig
from clt_eval.errors import require


@dataclass
class TranscoderOutput:
    pre_RBLF: torch.Tensor  # encoder pre-activations z
    acts_RBLF: torch.Tensor  # feature activations a = σ(z)
    recon_RBLD: torch.Tensor  # ŷ, the reconstructed MLP outputs


def structure_mask(arch: str, n_layers: int) -> torch.Tensor:
    """[S, T] bool: which decoder blocks s→t exist for ``arch``."""
    eye = torch.eye(n_layers, dtype=torch.bool)
    return eye if arch == "plt" else torch.ones(n_layers, n_layers).triu().bool()


def shared_fields(cfg: TranscoderConfig) -> dict:
    """Fields every run of an ensemble must agree on (arch and k may vary per run)."""
    d = dataclasses.asdict(cfg)
    d.pop("arch")
    d.pop("k")
    return d


class Transcoder(nn.Module):
    def __init__(self, cfgs: list[TranscoderConfig], seeds: list[int] | None = None):
        super().__init__()
        require(len(cfgs) > 0, "Transcoder: expected at least one run config")
        base = shared_fields(cfgs[0])
        for i, c in enumerate(cfgs):
            require(shared_fields(c) == base,
                    f"run {i}: configs in one ensemble may differ only in arch and k")
        self.cfgs = list(cfgs)
        cfg = cfgs[0]
        R, L, F, D = len(cfgs), cfg.n_layers, cfg.n_features, cfg.d_model
        self.W_enc = nn.Parameter(torch.zeros(R, L, D, F))
        self.b_enc = nn.Parameter(torch.zeros(R, L, F))
        self.W_dec = nn.Parameter(torch.zeros(R, L, L, F, D))
        self.b_dec = nn.Parameter(torch.zeros(R, L, D))
        self.W_skip = nn.Parameter(torch.zeros(R, L, D, D)) if cfg.skip else None
        self.log_threshold = (
            nn.Parameter(torch.full((R, L, F), math.log(cfg.jumprelu_threshold_init)))
            if cfg.activation == "jumprelu" else None
        )
        # BatchTopK's inference threshold: a running estimate, not trained by gradient.
        self.register_buffer("batchtopk_threshold", torch.zeros(R, L))
        masks = torch.stack([structure_mask(c.arch, L) for c in cfgs])
        self.register_buffer("decoder_mask_RST", masks)
        ks = [c.k or 0 for c in cfgs]
        self.register_buffer("k_R", torch.tensor(ks, dtype=torch.long))
        self.reset_parameters(seeds or list(range(R)))

    # ---- construction ---------------------------------------------------------------
    @property
    def cfg(self) -> TranscoderConfig:
        return self.cfgs[0]

    @property
    def n_runs(self) -> int:
        return len(self.cfgs)

    @torch.no_grad()
    def reset_parameters(self, seeds: list[int]) -> None:
        """Initialise each run from its own seed, so a run does not depend on its neighbours."""
        cfg = self.cfg
        L, F, D = cfg.n_layers, cfg.n_features, cfg.d_model
        for r, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed))
            w = (torch.rand(L, D, F, generator=g) * 2 - 1) / D**0.5
            self.W_enc[r] = w
            # Own-layer decoders start along the encoder's directions, every block at norm 0.1:
            # small, so early steps are driven by the data, and the same for cross-layer
            # blocks, so the initialisation favours neither skipping nor not skipping.
            dec = torch.rand(L, L, F, D, generator=g) * 2 - 1
            dec = dec / dec.norm(dim=-1, keepdim=True) * 0.1
            diag = torch.arange(L)
            dec[diag, diag] = w.transpose(1, 2) / w.transpose(1, 2).norm(dim=-1, keepdim=True) * 0.1
            self.W_dec[r] = dec * self.decoder_mask_RST[r, :, :, None, None]
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ---- forward ----------------------------------------------------------------------
    def masked_W_dec(self) -> torch.Tensor:
        return self.W_dec * self.decoder_mask_RST[:, :, :, None, None]

    def threshold(self) -> torch.Tensor | None:
        return None if self.log_threshold is None else self.log_threshold.exp()

    def encode(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """Pre-activations z for inputs shared by all runs ([B,L,D]) or per run ([R,B,L,D])."""
        eq = "bld,rldf->rblf" if x_BLD.dim() == 3 else "rbld,rldf->rblf"
        return torch.einsum(eq, x_BLD, self.W_enc) + self.b_enc[:, None]

    def activate(self, pre_RBLF: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        joint = cfg.topk_mode == "joint"
        if cfg.activation == "relu":
            return pre_RBLF.relu()
        if cfg.activation == "jumprelu":
            return act.jumprelu(pre_RBLF, self.threshold()[:, None], cfg.jumprelu_bandwidth)
        if cfg.activation == "topk":
            return act.topk(pre_RBLF, self.k_R, joint)
        # batchtopk: the batch-level selection while training, the learned threshold after.
        if not self.training:
            thr = self.batchtopk_threshold[:, None, :, None]
            return pre_RBLF * (pre_RBLF > thr)
        acts, cut_RL = act.batchtopk(pre_RBLF, self.k_R, joint)
        with torch.no_grad():  # running estimate of the threshold (EMA over batches)
            self.batchtopk_threshold.lerp_(cut_RL, 0.01)
        return acts

    def write(self, acts_RBLF: torch.Tensor) -> torch.Tensor:
        """[R,B,T,D]: Σ_s a_s W_dec^{s→t}, what the features write (no bias, no skip)."""
        return torch.einsum("rbsf,rstfd->rbtd", acts_RBLF, self.masked_W_dec())

    def decode(self, acts_RBLF: torch.Tensor, x_BLD: torch.Tensor | None = None) -> torch.Tensor:
        """ŷ_t = Σ_{s} a_s W_dec^{s→t} + b_dec^t (+ W_skip x_t); absent blocks are masked."""
        y = self.write(acts_RBLF) + self.b_dec[:, None]
        if self.W_skip is not None and x_BLD is not None:
            eq = "bld,rlde->rble" if x_BLD.dim() == 3 else "rbld,rlde->rble"
            y = y + torch.einsum(eq, x_BLD, self.W_skip)
        return y

    def forward(self, x_BLD: torch.Tensor) -> TranscoderOutput:
        pre = self.encode(x_BLD)
        acts = self.activate(pre)
        return TranscoderOutput(pre, acts, self.decode(acts, x_BLD))

    # ---- quantities the penalties and metrics read ------------------------------------
    def contributions(self, acts_RBLF: torch.Tensor) -> torch.Tensor:
        """[R,B,S,T,D]: what layer s's features write to layer t (b_dec excluded)."""
        return torch.einsum("rbsf,rstfd->rbstd", acts_RBLF, self.masked_W_dec())

    def decoder_block_norms(self) -> torch.Tensor:
        """[R,S,T,F]: ‖W_dec,i^{s→t}‖₂ for each feature and block (0 for absent blocks)."""
        # Mask the norms, not the [R,S,T,F,D] weights: the same numbers (an absent block is
        # stored as zeros, and the norm's gradient at 0 is 0) for a tenth of the work.
        return self.W_dec.norm(dim=-1) * self.decoder_mask_RST[..., None]

    # ---- ensembles --------------------------------------------------------------------
    @torch.no_grad()
    def select(self, runs: list[int]) -> Transcoder:
        """A new transcoder holding copies of the chosen runs."""
        out = Transcoder([self.cfgs[r] for r in runs])
        src, dst = self.state_dict(), out.state_dict()
        for name in dst:
            dst[name] = src[name][runs].clone()
        out.load_state_dict(dst)
        return out

    @staticmethod
    @torch.no_grad()
    def stack(parts: list[Transcoder]) -> Transcoder:
        """Concatenate transcoders with compatible shapes into one ensemble."""
        out = Transcoder([c for p in parts for c in p.cfgs])
        states = [p.state_dict() for p in parts]
        out.load_state_dict({k: torch.cat([s[k] for s in states]) for k in states[0]})
        return out
