"""Capture MLP inputs/outputs through hook points, and run the replacement model.

The replacement model swaps every MLP for the transcoder at once: layer ℓ's MLP output
becomes ŷ_ℓ = Σ_{s≤ℓ} W_dec^{s→ℓ} a_s + b_dec^ℓ, with a_s computed from the *replacement*
residual stream, so reconstruction errors propagate as they would in an attribution graph.
Works for any TransformerLens ``HookedRootModule`` that exposes the named hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from clt_eval.transcoder import Transcoder

# edit(ŷ_RND) -> ŷ_RND: an intervention on one layer's MLP output (true model: R = 1).
Edit = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def collect_mlp_io(model, inputs, in_hooks, out_hooks, extra_hooks=()):
    """Run ``model`` once; return (x_BLD, y_BLD, {hook: value}) for the named hooks."""
    names = set(in_hooks) | set(out_hooks) | set(extra_hooks)
    out, cache = model.run_with_cache(inputs, names_filter=lambda n: n in names)
    x = torch.stack([cache[h] for h in in_hooks], dim=1)
    y = torch.stack([cache[h] for h in out_hooks], dim=1)
    return x, y, {h: cache[h] for h in extra_hooks} | {"output": out}


@torch.no_grad()
def run_true_model(model, inputs, out_hooks, edits: dict[int, Edit] | None = None):
    """The true model's output with interventions on MLP outputs ({layer: edit})."""
    hooks = [(out_hooks[layer], lambda v, hook, f=f: f(v[None])[0])
             for layer, f in (edits or {}).items()]
    return model.run_with_hooks(inputs, fwd_hooks=hooks)


@torch.no_grad()
def run_replacement(model, tc: Transcoder, inputs, in_hooks, out_hooks,
                    edits: dict[int, Edit] | None = None):
    """Replacement-model output for every run: (out [R, N, ...], acts_RNLF, recon_RNLD).

    Layer ℓ's input depends only on outputs of layers < ℓ, so starting from the true inputs
    and re-running L times reaches the replacement model's own activations exactly; this also
    lets activations that select jointly across layers (TopK "joint") see every layer at once.
    """
    R, N, L = tc.n_runs, inputs.shape[0], len(in_hooks)
    batch = inputs.repeat(R, *[1] * (inputs.dim() - 1))  # run-major: row r*N + n
    x, _, _ = collect_mlp_io(model, batch, in_hooks, out_hooks)
    x_RNLD = x.view(R, N, L, -1)
    edits = edits or {}
    for _ in range(L):
        acts = tc.activate(tc.encode(x_RNLD))
        recon = tc.decode(acts, x_RNLD)  # [R, N, L, D]
        captured: dict[int, torch.Tensor] = {}
        hooks = []
        for layer in range(L):
            hooks.append((in_hooks[layer], _capture(captured, layer)))
            hooks.append((out_hooks[layer], _replace(recon[:, :, layer], edits.get(layer))))
        out = model.run_with_hooks(batch, fwd_hooks=hooks)
        x_RNLD = torch.stack([captured[i] for i in range(L)], dim=1).view(R, N, L, -1)
    return out.view(R, N, *out.shape[1:]), acts, recon


def _capture(store: dict, layer: int):
    def hook(value, hook):
        store[layer] = value.detach()
    return hook


def _replace(recon_RND: torch.Tensor, edit: Edit | None):
    new = recon_RND if edit is None else edit(recon_RND)

    def hook(value, hook):
        return new.reshape(value.shape)
    return hook
