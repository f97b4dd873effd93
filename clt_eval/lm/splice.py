"""The spliced replacement model: every window layer's MLP replaced by the transcoder at once.

One forward pass with TransformerLens hooks (docs/concepts.md §5, "KL and CE loss with *all* MLPs
replaced at once"): at model layer ``layers[ℓ]``'s MLP input hook the residual stream, as the
spliced model has computed it so far, is encoded by the transcoder's layer-ℓ encoder; at its
output hook the MLP output becomes ŷ_ℓ = Σ_{s≤ℓ} W_dec^{s→ℓ} a_s + b_dec^ℓ (+ W_skip x_ℓ).
Layer ℓ's input depends only on outputs of layers before it, so one pass computes the
replacement model exactly; only TopK selected *jointly* across layers needs every layer's
input at once, and for it we iterate as ``clt_eval.replacement.run_replacement`` does.

*Error terms* (Ameisen et al. 2025, "Circuit Tracing", §2): with ``error_terms=True`` each
layer's output is ŷ_ℓ + (y_ℓ − ŷ_ℓ), where y_ℓ is the true MLP's own output *on the spliced
residual stream* (what circuit-tracer's error nodes hold). The spliced model then reproduces
the clean model to rounding error, and y − ŷ is the per-layer error the attribution graph's
error nodes carry. Without error terms it is the pure replacement model.

``skip_first=True`` leaves position 0 to the true MLPs: transcoders trained here never see it
(``clt_eval.lm.activations`` drops it: the attention sink's activations are outliers), so
splicing them in there measures nothing but that choice. circuit-tracer zeroes BOS alike.

Shapes: R runs, B prompts, P positions, L transcoder layers, F features, D d_model, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clt_eval import activations as act
from clt_eval.errors import CltEvalError, require
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder


def check_compatible(tc: Transcoder, window: LayerWindow, model) -> None:
    """One-line ``CltEvalError`` naming the first mismatch of transcoder, window and model."""
    cfg = model.cfg
    name = getattr(cfg, "model_name", None) or "the model"
    require(tc.cfg.d_model == cfg.d_model,
            f"transcoder d_model={tc.cfg.d_model} but {name} has d_model={cfg.d_model}")
    require(tc.cfg.n_layers == window.n_layers,
            f"transcoder n_layers={tc.cfg.n_layers} but its window names {window.n_layers} "
            f"model layer(s) {list(window.layers)}")
    bad = [x for x in window.layers if x >= cfg.n_layers]
    require(not bad, f"window layers {bad} do not exist: {name} has n_layers={cfg.n_layers} "
            f"(layers 0..{cfg.n_layers - 1})")
    missing = [h for h in window.input_hooks() + window.output_hooks() if h not in model.hook_dict]
    if missing:
        near = sorted(h for h in model.hook_dict
                      if h.startswith("blocks.0.") and ("mlp" in h or "ln2" in h))
        raise CltEvalError(f"hook {missing[0]!r} does not exist in {name}; its MLP hooks of "
                           f"layer 0 are {', '.join(near[:8]) or 'none'}")


def is_joint_topk(tc: Transcoder) -> bool:
    return tc.cfg.activation == "topk" and tc.cfg.topk_mode == "joint"


def activate_layer(tc: Transcoder, pre_RNF: torch.Tensor, layer: int) -> torch.Tensor:
    """σ of one layer's pre-activations, as ``Transcoder.activate`` computes it in eval mode.

    Every activation but joint TopK acts on each layer alone, which lets a single forward pass
    encode layer by layer. BatchTopK uses its learned inference threshold (its eval mode).
    """
    cfg = tc.cfg
    require(not is_joint_topk(tc), "activation='topk' with topk_mode='joint' selects across "
            "all layers at once; it cannot be evaluated one layer at a time")
    if cfg.activation == "relu":
        return pre_RNF.relu()
    if cfg.activation == "jumprelu":
        thr = tc.threshold()[:, layer, None, :]
        return pre_RNF * (pre_RNF > thr)
    if cfg.activation == "topk":
        return act.topk(pre_RNF[:, :, None], tc.k_R, joint=False)[:, :, 0]
    thr = tc.batchtopk_threshold[:, layer, None, None]
    return pre_RNF * (pre_RNF > thr)


def encode_layer(tc: Transcoder, x_RND: torch.Tensor, layer: int) -> torch.Tensor:
    """z = W_enc^ℓ x + b_enc^ℓ for one layer, [R, N, F]."""
    return torch.einsum("rnd,rdf->rnf", x_RND, tc.W_enc[:, layer]) + tc.b_enc[:, layer, None]


def decode_layer(tc: Transcoder, acts: dict[int, torch.Tensor], x_RND: torch.Tensor,
                 layer: int) -> torch.Tensor:
    """ŷ_ℓ = Σ_{s≤ℓ} W_dec^{s→ℓ} a_s + b_dec^ℓ (+ W_skip^ℓ x_ℓ), [R, N, D]; absent blocks are
    masked, so a PLT reads only s = ℓ."""
    y = tc.b_dec[:, layer, None].expand(x_RND.shape).clone()
    for s in range(layer + 1):
        if layer in tc.targets(s):  # a PLT-only ensemble stores no cross-layer block
            y = y + torch.einsum("rnf,rfd->rnd", acts[s], tc.decoder_block(s, layer))
    if tc.W_skip is not None:
        y = y + torch.einsum("rnd,rde->rne", x_RND, tc.W_skip[:, layer])
    return y


@dataclass
class SpliceOutput:
    logits_RBPV: torch.Tensor
    acts_RNLF: torch.Tensor  # N = B·P tokens, batch-major
    mlp_out_RNLD: torch.Tensor  # y: the true MLPs' outputs on the spliced residual stream
    recon_RNLD: torch.Tensor  # ŷ: the transcoder's outputs


@torch.no_grad()
def run_spliced(model, tc: Transcoder, window: LayerWindow, tokens_BP: torch.Tensor,
                error_terms: bool = False, skip_first: bool = False) -> SpliceOutput:
    """Run ``model`` with every window MLP replaced by the transcoder, for each of its R runs."""
    check_compatible(tc, window, model)
    R, (B, P) = tc.n_runs, tokens_BP.shape
    batch = tokens_BP.repeat(R, 1)  # run-major: row r·B + b
    was_training = tc.training
    tc.eval()  # BatchTopK's batch-level selection is for training only
    try:
        fixed_x = _clean_inputs(model, window, batch, R) if is_joint_topk(tc) else None
        # Joint TopK has no layer-by-layer definition: as run_replacement does, L passes,
        # each selecting from the MLP inputs of the pass before (exact for every other σ).
        for _ in range(window.n_layers if fixed_x is not None else 1):
            fixed_acts = None if fixed_x is None else tc.activate(tc.encode(fixed_x))
            state = _SpliceState(tc, R, fixed_acts, error_terms, skip_first)
            logits = model.run_with_hooks(batch, fwd_hooks=state.hooks(window))
            if fixed_x is not None:
                fixed_x = torch.stack([state.x[i] for i in range(window.n_layers)], dim=2)
    finally:
        tc.train(was_training)
    L = window.n_layers
    stack = lambda d: torch.stack([d[i] for i in range(L)], dim=2)  # noqa: E731
    return SpliceOutput(logits.view(R, B, P, -1), stack(state.acts), stack(state.y),
                        stack(state.recon))


class _SpliceState:
    """Hooks of one spliced pass and what they record, per transcoder layer."""

    def __init__(self, tc: Transcoder, R: int, fixed_acts_RNLF, error_terms: bool,
                 skip_first: bool):
        self.tc, self.R, self.fixed, self.error_terms = tc, R, fixed_acts_RNLF, error_terms
        self.skip_first = skip_first
        self.x: dict[int, torch.Tensor] = {}
        self.acts: dict[int, torch.Tensor] = {}
        self.y: dict[int, torch.Tensor] = {}
        self.recon: dict[int, torch.Tensor] = {}

    def hooks(self, window: LayerWindow) -> list:
        out = []
        for layer, (h_in, h_out) in enumerate(zip(window.input_hooks(), window.output_hooks(),
                                                  strict=True)):
            out.append((h_in, self._encode(layer)))
            out.append((h_out, self._replace(layer)))
        return out

    def _encode(self, layer: int):
        def hook(value, hook):
            x = value.reshape(self.R, -1, value.shape[-1])
            self.x[layer] = x
            if self.fixed is not None:
                self.acts[layer] = self.fixed[:, :, layer]
            else:
                self.acts[layer] = activate_layer(self.tc, encode_layer(self.tc, x, layer), layer)
        return hook

    def _replace(self, layer: int):
        def hook(value, hook):
            y = value.reshape(self.R, -1, value.shape[-1])
            recon = decode_layer(self.tc, self.acts, self.x[layer], layer)
            self.y[layer], self.recon[layer] = y, recon
            new = (recon + (y - recon) if self.error_terms else recon).reshape(value.shape)
            if self.skip_first:
                new[:, 0] = value[:, 0]
            return new
        return hook


@torch.no_grad()
def _clean_inputs(model, window: LayerWindow, batch, R: int) -> torch.Tensor:
    """[R, N, L, D]: the clean model's MLP inputs, the start of the joint-TopK iteration."""
    names = set(window.input_hooks())
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
    x = torch.stack([cache[h] for h in window.input_hooks()], dim=0)  # [L, R·B, P, D]
    L, D = x.shape[0], x.shape[-1]
    return x.reshape(L, R, -1, D).permute(1, 2, 0, 3)


@torch.no_grad()
def run_zero_ablated(model, window: LayerWindow, tokens_BP: torch.Tensor,
                     skip_first: bool = False) -> torch.Tensor:
    """Logits with every window MLP's output set to zero: the CE-recovered baseline."""
    def zero(v, hook):
        out = torch.zeros_like(v)
        if skip_first:
            out[:, 0] = v[:, 0]
        return out
    return model.run_with_hooks(tokens_BP, fwd_hooks=[(h, zero) for h in window.output_hooks()])


@torch.no_grad()
def splice_metrics(model, tc: Transcoder, window: LayerWindow, tokens_BP: torch.Tensor,
                   skip_first: bool = False) -> dict:
    """KL and CE of the spliced model against the clean one, and per-layer error norms.

    Returns lists over the R runs: ``kl_mean`` (mean over tokens of KL(clean ‖ spliced)),
    ``ce_spliced``, ``ce_recovered``; the scalars ``ce_clean``, ``ce_zero_ablated``; and per
    layer ``error_norm_clean`` (‖y − ŷ‖/‖y‖ on the clean residual stream, i.e. with error
    terms, which is what the attribution graph's error nodes hold) and
    ``error_norm_spliced`` (the same inside the pure replacement model, where errors compound).
    With ``skip_first`` position 0 is left to the true MLPs (see the module docstring) and
    left out of the means and norms.
    """
    from clt_eval.lm import lm_metrics as M

    P = tokens_BP.shape[1]
    clean = model(tokens_BP)
    spliced = run_spliced(model, tc, window, tokens_BP, skip_first=skip_first)
    with_err = run_spliced(model, tc, window, tokens_BP, error_terms=True)
    zero = run_zero_ablated(model, window, tokens_BP, skip_first)
    ce_clean = M.next_token_ce(clean[None], tokens_BP)
    ce_zero = M.next_token_ce(zero[None], tokens_BP)
    ce_spliced = M.next_token_ce(spliced.logits_RBPV, tokens_BP)
    keep_N = torch.arange(tokens_BP.numel()) % P >= int(skip_first)  # N = B·P, batch-major
    norm = lambda o: M.relative_error_norm(o.mlp_out_RNLD[:, keep_N],  # noqa: E731
                                           o.recon_RNLD[:, keep_N]).tolist()
    kl = M.kl_per_token(clean, spliced.logits_RBPV)[:, :, int(skip_first):]
    return {"kl_mean": kl.mean((1, 2)).tolist(), "ce_clean": float(ce_clean[0]),
            "ce_zero_ablated": float(ce_zero[0]), "ce_spliced": ce_spliced.tolist(),
            "ce_recovered": M.ce_loss_recovered(ce_clean, ce_spliced, ce_zero).tolist(),
            "error_norm_clean": norm(with_err), "error_norm_spliced": norm(spliced),
            "window_layers": list(window.layers), "skip_first": skip_first,
            "n_tokens": int(keep_N.sum())}
