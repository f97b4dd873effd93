"""A hand-built residual stack of MLP blocks, exposed through TransformerLens hook points.

The toy case studies are residual networks without attention or LayerNorm: an embedding
writes the inputs into the residual stream, then block ℓ adds MLP_ℓ(resid) to it. Because
there is no attention, an MLP reads the stream exactly as it stands, so its input is the
embedding plus every earlier MLP's output: the residual stream is consistent by construction.

Hook names follow ``HookedTransformer`` so the library reads every case study the same way:
``hook_embed``; per block ``blocks.{ℓ}.hook_resid_pre``, ``hook_resid_mid`` (the MLP input:
with no attention it equals ``hook_resid_pre``), ``hook_mlp_out``, ``hook_resid_post``; inside
the MLP ``blocks.{ℓ}.mlp.hook_pre`` and ``blocks.{ℓ}.mlp.hook_post`` (the hidden ReLU units,
which the case studies use as their ground-truth features, one unit per feature).

An MLP is given as plain tensors ``(W_in [D, H], b_in [H] or None, W_out [H, D])``, so a case
study describes its model without importing transformer_lens (seconds to import); only
``mlp_stack()`` imports it, when a model is actually built.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from clt_eval.errors import require
from clt_eval.transcoder import row_matmul

MLPSpec = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]


def input_hooks(n_layers: int) -> tuple[str, ...]:
    """The MLP input x_ℓ of every layer."""
    return tuple(f"blocks.{ell}.hook_resid_mid" for ell in range(n_layers))


def output_hooks(n_layers: int) -> tuple[str, ...]:
    """The MLP output y_ℓ of every layer."""
    return tuple(f"blocks.{ell}.hook_mlp_out" for ell in range(n_layers))


def feature_hook(layer: int) -> str:
    """Where layer ``layer``'s hidden units (the ground-truth features) can be read."""
    return f"blocks.{layer}.mlp.hook_post"


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Parameters (not buffers) so .to(device) and state_dict() treat them like any model's;
    # frozen because the toys are built by hand, never trained.
    return nn.Parameter(t.detach().clone().float(), requires_grad=False)


class LinearEmbed(nn.Module):
    """inputs [N, I] -> residual stream [N, D]: ``inputs @ W_E + b_E``. A constant-1
    dimension set in ``b_E`` lets the MLPs carry their biases as weights on it."""

    def __init__(self, W_E_ID: torch.Tensor, b_E_D: torch.Tensor | None = None):
        super().__init__()
        self.W_E = _frozen(W_E_ID)
        self.b_E = _frozen(b_E_D if b_E_D is not None else torch.zeros(W_E_ID.shape[1]))

    def forward(self, inputs_NI: torch.Tensor) -> torch.Tensor:
        return row_matmul(inputs_NI.to(self.W_E), self.W_E) + self.b_E


def bias_embed(n_inputs: int, d_model: int, bias_dim: int) -> LinearEmbed:
    """The toys' embedding: input i in residual dimension i, a constant 1 in ``bias_dim``."""
    b_E = torch.zeros(d_model)
    b_E[bias_dim] = 1.0
    return LinearEmbed(torch.eye(n_inputs, d_model), b_E)


def check_mlps(mlps: Sequence[MLPSpec]) -> int:
    """d_model of ``mlps``; a one-line error naming the layer and tensor if shapes disagree."""
    require(len(mlps) > 0, "MLPStack: mlps is empty; expected one (W_in, b_in, W_out) per layer")
    D = mlps[0][0].shape[0]
    for ell, (W_in, b_in, W_out) in enumerate(mlps):
        require(W_in.dim() == 2 and W_in.shape[0] == D,
                f"MLPStack: layer {ell} W_in has shape {tuple(W_in.shape)}; expected [{D}, H]")
        H = W_in.shape[1]
        require(tuple(W_out.shape) == (H, D), f"MLPStack: layer {ell} W_out has shape "
                f"{tuple(W_out.shape)}; expected [{H}, {D}]")
        b_shape = None if b_in is None else tuple(b_in.shape)
        require(b_shape in (None, (H,)), f"MLPStack: layer {ell} b_in has shape {b_shape}; "
                f"expected [{H}] or None")
    return D


def forward_mlps(mlps: Sequence[MLPSpec], resid_ND: torch.Tensor):
    """(MLP outputs [N, L, D], hidden units [one [N, H_ℓ] per layer]) from the embedded stream
    ``resid_ND``, in plain torch: what the hooked model computes, without transformer_lens.
    Used to build decompositions from a case study's own weights."""
    outs, hidden = [], []
    for W_in, b_in, W_out in mlps:
        hidden.append((row_matmul(resid_ND, W_in) + (0.0 if b_in is None else b_in)).relu())
        outs.append(row_matmul(hidden[-1], W_out))
        resid_ND = resid_ND + outs[-1]  # the next MLP reads everything written so far
    return torch.stack(outs, dim=1), hidden


def mlp_stack(mlps: Sequence[MLPSpec], embed: Callable[[torch.Tensor], torch.Tensor]):
    """A HookedRootModule: inputs [N, ...] -> final residual stream [N, D], one block per MLP.
    ``embed`` maps inputs to the residual stream (an nn.Module embed moves with .to())."""
    return _classes()(mlps, embed).eval()


@functools.cache
def _classes():
    """Define the hooked classes once, on first use, so that importing a case study does not
    import transformer_lens."""
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class MLP(nn.Module):
        def __init__(self, W_in, b_in, W_out):
            super().__init__()
            self.W_in = _frozen(W_in)  # [D, H]
            self.b_in = _frozen(torch.zeros(W_in.shape[1]) if b_in is None else b_in)  # [H]
            self.W_out = _frozen(W_out)  # [H, D]
            self.hook_pre = HookPoint()
            self.hook_post = HookPoint()

        def forward(self, x_ND):
            pre = self.hook_pre(row_matmul(x_ND, self.W_in) + self.b_in)
            return row_matmul(self.hook_post(pre.relu()), self.W_out)

    class Block(nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp
            self.hook_resid_pre = HookPoint()
            self.hook_resid_mid = HookPoint()  # no attention: the MLP reads the stream as is
            self.hook_mlp_out = HookPoint()
            self.hook_resid_post = HookPoint()

        def forward(self, resid_ND):
            resid_ND = self.hook_resid_mid(self.hook_resid_pre(resid_ND))
            return self.hook_resid_post(resid_ND + self.hook_mlp_out(self.mlp(resid_ND)))

    class MLPStack(HookedRootModule):
        # Every product is row_matmul, so a sample's numbers are the same in any batch: the
        # evaluation may push many runs' samples through the model at once.
        batch_invariant = True

        def __init__(self, mlps, embed):
            super().__init__()
            self.d_model = check_mlps(mlps)
            self.embed = embed
            self.hook_embed = HookPoint()
            self.blocks = nn.ModuleList([Block(MLP(*spec)) for spec in mlps])
            self.setup()

        def forward(self, inputs):
            resid_ND = self.hook_embed(self.embed(inputs))
            for block in self.blocks:
                resid_ND = block(resid_ND)
            return resid_ND

    return MLPStack
