"""Interventions at middle window layers: the real model against each replacement model.

The intervention (docs/concepts.md §5, "interventional faithfulness"): at model layer
``layers[m]``, set
the MLP output at the chosen positions to zero (``zero``) or to its value on another prompt of
the same length (``patch``), and record the change of the answer token's log-prob (and of its
logit minus the mean logit) at the last position.

The replacement model here is the *spliced* model of ``clt_eval.lm.splice`` with its error
terms *frozen* at their clean values: every window MLP is replaced by the transcoder's
ŷ_ℓ(x_ℓ) + e_ℓ, where e_ℓ = y_ℓ − ŷ_ℓ on the clean prompt is a constant (the attribution
graph's error node). On the clean prompt it reproduces the model exactly; under an
intervention only the transcoder's features respond. Recomputing e_ℓ from the MLP's own output
would make it the real model again, so it would trivially agree. Attention, normalisation and
the MLPs outside the window stay live, as in the real model, so that the comparison measures
the transcoders and not the freezing of a local replacement model (with a window of 4 of 30
layers, a frozen local replacement would also freeze the 16 MLPs after the window).

Control: ``no_response``, the real model with layer m intervened on and the later window MLPs
held at their clean outputs, is what a replacement predicts whose later window layers do not
respond at all (a CLT that wrote them entirely from features at layers ≤ m would). The gap
between it and the real effect is what the later layers' response adds.

Two ways to intervene in the replacement at layer m:
- ``frozen``: the transcoder's ŷ_m is zeroed (or patched with its ŷ_m on the other prompt);
  e_m stays. What the features explain of layer m is removed, nothing else.
- ``whole``: layer m's whole output, e_m included, becomes what the real model's does. Its
  direct effect is then exact, and any disagreement comes from how the later window layers
  respond: a CLT whose later layers are written from early features through cross-layer
  decoders responds less than the real MLPs do.

Shapes: P positions, L window layers, D d_model, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clt_eval.lm.splice import activate_layer, decode_layer, encode_layer
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

KINDS = ("zero", "patch")
SCOPES = ("all", "last")  # every position after BOS, or the last position only
VARIANTS = ("frozen", "whole")


@dataclass
class CleanRun:
    """One prompt's clean run, and each transcoder's reconstruction and frozen errors."""

    tokens_P: torch.Tensor
    logits_PV: torch.Tensor
    y_LPD: torch.Tensor  # the real MLP outputs at the window layers
    recon: dict[str, torch.Tensor]  # name -> ŷ [L, P, D]
    error: dict[str, torch.Tensor]  # name -> y − ŷ [L, P, D]
    acts: dict[str, torch.Tensor]  # name -> [P, L, F]


@torch.no_grad()
def clean_run(model, tcs: dict[str, Transcoder], window: LayerWindow, tokens_P: torch.Tensor,
              skip_first: bool) -> CleanRun:
    names = set(window.input_hooks()) | set(window.output_hooks())
    logits, cache = model.run_with_cache(tokens_P[None], names_filter=lambda n: n in names)
    x = torch.stack([cache[h][0] for h in window.input_hooks()])  # [L, P, D]
    y = torch.stack([cache[h][0] for h in window.output_hooks()])
    recon, error, acts = {}, {}, {}
    for name, tc in tcs.items():
        a, r = _reconstruct(tc, x, skip_first)
        recon[name], error[name], acts[name] = r, y - r, a
    return CleanRun(tokens_P, logits[0], y, recon, error, acts)


def _reconstruct(tc: Transcoder, x_LPD: torch.Tensor, skip_first: bool):
    """(acts [P, L, F], ŷ [L, P, D]) layer by layer, as the spliced model computes them."""
    acts, out = {}, []
    for ell in range(x_LPD.shape[0]):
        a = activate_layer(tc, encode_layer(tc, x_LPD[ell][None], ell), ell)
        if skip_first:  # no features at BOS: its output is all error node
            a[:, 0] = 0
        acts[ell] = a
        out.append(decode_layer(tc, acts, x_LPD[ell][None], ell)[0])
    return torch.stack([acts[i][0] for i in range(len(acts))], 1), torch.stack(out)


def _set(value, pos_P: torch.Tensor, new_PD: torch.Tensor):
    out = value.clone()
    out[0, pos_P] = new_PD[pos_P]
    return out


@torch.no_grad()
def true_logits(model, window: LayerWindow, tokens_P, layer: int, new_PD, pos_P,
                clean_y_LPD: torch.Tensor | None = None) -> torch.Tensor:
    """[P, V]: the real model with MLP output ``layers[layer]`` set to ``new_PD`` at ``pos_P``.
    With ``clean_y_LPD`` the later window MLPs are held at their clean outputs: the effect a
    replacement whose later layers do not respond at all would predict (a control)."""
    hooks = [(window.output_hooks()[layer], lambda v, hook: _set(v, pos_P, new_PD))]
    if clean_y_LPD is not None:
        hooks += [(h, lambda v, hook, y=clean_y_LPD[t]: y[None])
                  for t, h in enumerate(window.output_hooks()) if t > layer]
    return model.run_with_hooks(tokens_P[None], fwd_hooks=hooks)[0]


@torch.no_grad()
def replacement_logits(model, tc: Transcoder, window: LayerWindow, tokens_P, error_LPD,
                       skip_first: bool, layer: int | None = None, new_PD=None, pos_P=None,
                       whole: bool = False) -> torch.Tensor:
    """[P, V]: the spliced replacement with frozen errors (module docstring); with ``layer``,
    its ŷ there (``whole``: its whole output) set to ``new_PD`` at ``pos_P``."""
    acts: dict[int, torch.Tensor] = {}
    xs: dict[int, torch.Tensor] = {}

    def read(ell):
        def hook(value, hook):
            xs[ell] = value[0]
            a = activate_layer(tc, encode_layer(tc, value, ell), ell)
            if skip_first:
                a[:, 0] = 0
            acts[ell] = a
        return hook

    def write(ell):
        def hook(value, hook):
            y = decode_layer(tc, acts, xs[ell][None], ell)
            if ell == layer and not whole:
                y = _set(y, pos_P, new_PD)
            y = y + error_LPD[ell][None]
            return _set(y, pos_P, new_PD) if ell == layer and whole else y
        return hook

    hooks = []
    for ell, (h_in, h_out) in enumerate(zip(window.input_hooks(), window.output_hooks(),
                                            strict=True)):
        hooks += [(h_in, read(ell)), (h_out, write(ell))]
    return model.run_with_hooks(tokens_P[None], fwd_hooks=hooks)[0]


def answer_effect(clean_PV: torch.Tensor, new_PV: torch.Tensor, target: int) -> dict:
    """Change of the target's log-prob and of its logit minus the mean logit, last position."""
    lp = lambda z: float(z[-1].log_softmax(-1)[target])  # noqa: E731
    cl = lambda z: float(z[-1, target] - z[-1].mean())  # noqa: E731
    return {"dlogprob": lp(new_PV) - lp(clean_PV), "dlogit": cl(new_PV) - cl(clean_PV)}


def intervention_cases(model, tcs: dict[str, Transcoder], window: LayerWindow, clean: CleanRun,
                       target: int, layers: list[int], skip_first: bool,
                       other: CleanRun | None = None) -> list[dict]:
    """Every (layer, kind, scope) case for one prompt: the real model's effect and each
    replacement's under both variants. ``other``: the patch source (same length), or None."""
    P = clean.tokens_P.numel()
    scopes = {"all": torch.arange(int(skip_first), P), "last": torch.tensor([P - 1])}
    cases = []
    for ell in layers:
        for kind in KINDS if other is not None else ("zero",):
            true_new = (torch.zeros_like(clean.y_LPD[ell]) if kind == "zero"
                        else other.y_LPD[ell])
            for scope, pos in scopes.items():
                if not pos.numel():
                    continue
                logits = true_logits(model, window, clean.tokens_P, ell, true_new, pos)
                case = {"tc_layer": ell, "model_layer": window.layers[ell], "kind": kind,
                        "scope": scope, "true": answer_effect(clean.logits_PV, logits, target)}
                logits = true_logits(model, window, clean.tokens_P, ell, true_new, pos,
                                     clean.y_LPD)
                case["no_response"] = answer_effect(clean.logits_PV, logits, target)
                for name, tc in tcs.items():
                    rec_new = (torch.zeros_like(true_new) if kind == "zero"
                               else other.recon[name][ell])
                    for variant in VARIANTS:
                        whole = variant == "whole"
                        logits = replacement_logits(
                            model, tc, window, clean.tokens_P, clean.error[name], skip_first,
                            ell, true_new if whole else rec_new, pos, whole)
                        case[f"{name}_{variant}"] = answer_effect(clean.logits_PV, logits,
                                                                  target)
                cases.append(case)
    return cases
