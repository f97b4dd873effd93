"""The MLP-in-the-middle toy: a subspace-patching illusion with a known answer, built by hand.

After Makelov, Lange & Nanda (ICLR 2024): an MLP that sits *between* where a variable is
written to the residual stream and where it is read holds a unit that carries the variable but
writes nothing (causally disconnected: its W_out row is zero) and a unit that is constant on
real inputs but writes where the reader looks (dormant). Patching the whole MLP does nothing,
yet patching the 1-d subspace along (disconnected + dormant)/√2 moves the output exactly as
changing the variable would: the patch copies the disconnected unit's variation into the
dormant unit, opening a pathway the model never uses.

Residual stream (d_model = 5):
    0 x ∈ [−1, 1] (input)   1 constant 1 (bias)   2 b (the intermediate variable)
    3 scratch (written, never read)   4 y (output)

Layer 0 (step 1) computes b = h3 = ReLU(x + 2) ∈ [1, 3], the real pathway.
Layer 1, the MLP in the middle: disconnected units read b, dormant units read only the bias.
    width = 1 (the distilled model): h1 = ReLU(b) (W_out row 0), h2 = ReLU(1) writing 2 to b.
    width = n: n disconnected units ReLU(a_i b + c_i) with random signed a_i (‖a‖ = 1) and
    biases keeping them active on [1, 3], and n dormant units ReLU(d_j) with random d_j > 0
    writing g_j to b (‖g‖ = 2, random signs) and random amounts to scratch. Random weights
    rather than a rotation of hidden units: rotating post-ReLU units would break the ReLU.
Layer 2 (step 2) computes y = ReLU(b_final − K) = x + 2, K the dormant units' constant write.

The illusory direction is (â, ĝ)/√2 in hidden coordinates (e1 + e2 over √2 when width = 1):
the disconnected units change by Δh = a Δb, so patching along it adds ½ (â·Δh) ĝ to the
dormant block and b moves by ½‖a‖‖g‖ Δb = Δb. The gain (g·v)(a·v) of a unit direction v
peaks at ½‖a‖‖g‖ = 1 there alone, so it is the one direction (up to sign) that reproduces the
counterfactual, whatever the width. All units are strictly active on real inputs, so every
effect is exactly linear there.
"""

from __future__ import annotations

import torch

from clt_eval.case_study import Circuit, GroundTruthLayer
from clt_eval.errors import require

D_MODEL, X, BIAS, B, SCRATCH, Y = 5, 0, 1, 2, 3, 4
LEVELS = 9  # x on an even grid of [−1, 1]: 72 ordered pairs of distinct values to patch
MARGIN = 0.25  # a disconnected unit's pre-activation stays at least this far above 0
B_RANGE = (1.0, 3.0)  # b = x + 2 on real inputs


def _weights(width: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W_in [D, H], W_out [H, D]) of the three MLPs; the bias lives in residual dim BIAS."""
    W0_in, W0_out = torch.zeros(D_MODEL, 1), torch.zeros(1, D_MODEL)
    W0_in[X, 0], W0_in[BIAS, 0], W0_out[0, B] = 1.0, 2.0, 1.0  # b = ReLU(x + 2)
    if width == 1:  # the distilled model, exact numbers
        a, c = torch.tensor([1.0]), torch.tensor([0.0])
        d, g, r = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.0])
    else:
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(width, generator=gen)
        a = a / a.norm()
        g = torch.randn(width, generator=gen)
        g = 2.0 * g / g.norm()
        d = 0.5 + torch.rand(width, generator=gen)
        r = torch.randn(width, generator=gen)
        # Lowest pre-activation of a_i b over b ∈ [1, 3] lifted to MARGIN: linear on real inputs.
        c = MARGIN - torch.minimum(a * B_RANGE[0], a * B_RANGE[1])
    W1_in, W1_out = torch.zeros(D_MODEL, 2 * width), torch.zeros(2 * width, D_MODEL)
    W1_in[B, :width], W1_in[BIAS, :width] = a, c  # disconnected: their W_out rows stay 0
    W1_in[BIAS, width:] = d  # dormant: no weight from anything that varies
    W1_out[width:, B], W1_out[width:, SCRATCH] = g, r
    W2_in, W2_out = torch.zeros(D_MODEL, 1), torch.zeros(1, D_MODEL)
    W2_in[B, 0], W2_in[BIAS, 0] = 1.0, -float(g @ d)  # remove the dormant units' constant
    W2_out[0, Y] = 1.0
    return [(W0_in, W0_out), (W1_in, W1_out), (W2_in, W2_out)]


def _build_model(width: int, seed: int):
    """inputs [N, 1] (x) -> final residual stream [N, 5], on the shared hooked MLP stack (it
    imports transformer_lens only now, not when case studies are listed)."""
    from clt_eval.case_studies._mlp_stack import bias_embed, mlp_stack

    return mlp_stack([(W_in, None, W_out) for W_in, W_out in _weights(width, seed)],
                     bias_embed(1, D_MODEL, BIAS))


class MlpInTheMiddle:
    """Case-study plugin: x -> b (layer 0) -> y (layer 2), an illusion-prone MLP at layer 1."""

    name = "mlp_in_the_middle"
    description = ("x -> b (layer 0) -> y (layer 2) past an MLP in the middle (layer 1) with a "
                   "disconnected and a dormant part: the subspace-patching illusion")
    n_layers = 3
    d_model = D_MODEL
    input_hooks = tuple(f"blocks.{i}.hook_resid_mid" for i in range(3))
    output_hooks = tuple(f"blocks.{i}.hook_mlp_out" for i in range(3))
    middle_layer = 0
    output_layer = 2
    off_distribution_noise = 0.2
    # What the illusion study patches: the middle MLP's hidden units (post-ReLU) ...
    mlp_layer = 1
    mlp_hook = "blocks.1.mlp.hook_post"
    # ... the real pathway's unit (h3), and the residual stream where layer 2 reads b.
    faithful_hook = "blocks.0.mlp.hook_post"
    reader_hook = "blocks.2.hook_resid_mid"

    def __init__(self, width: int = 1, seed: int = 0):
        require(isinstance(width, int) and not isinstance(width, bool) and width >= 1,
                f"width={width!r}: expected an integer >= 1 (1 = the distilled model)")
        require(isinstance(seed, int), f"seed={seed!r}: expected an integer")
        self.width, self.seed = width, seed
        self._model = None

    def model(self):
        """The true model, a TransformerLens HookedRootModule: inputs [N, 1] -> residual [N, 5]."""
        return _build_model(self.width, self.seed)

    def _built(self):
        if self._model is None:
            self._model = self.model()
        return self._model

    def inputs(self) -> torch.Tensor:
        return torch.linspace(-1.0, 1.0, LEVELS)[:, None]

    def off_distribution_inputs(self, n: int = 512, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        grid = self.inputs()[torch.randint(0, LEVELS, (n,), generator=g)]
        return grid + self.off_distribution_noise * torch.randn(n, 1, generator=g)

    def output_value(self, model_out: torch.Tensor) -> torch.Tensor:
        return model_out[..., Y]

    def ground_truth(self) -> list[GroundTruthLayer]:
        eye = torch.eye(D_MODEL)
        return [GroundTruthLayer(0, "blocks.0.mlp.hook_post", ("b",), eye[B:B + 1]),
                GroundTruthLayer(2, "blocks.2.mlp.hook_post", ("y",), eye[Y:Y + 1])]

    def input_directions(self) -> torch.Tensor:
        return torch.eye(D_MODEL)[X:X + 1]

    def circuit(self) -> Circuit:
        return Circuit(("x", "b", "y"), (("x", "b"), ("b", "y")), {"x": -1, "b": 0, "y": 2})

    # ---- what the illusion study needs -----------------------------------------------------
    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(base [P, 1], source [P, 1]): every ordered pair of distinct inputs."""
        x = self.inputs()
        i, j = torch.meshgrid(torch.arange(LEVELS), torch.arange(LEVELS), indexing="ij")
        keep = i != j
        return x[i[keep]], x[j[keep]]

    def counterfactual(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """The true output value when b takes the source's value (b patched whole), [P]."""
        from clt_eval.patching import run_patched

        out = run_patched(self._built(), base, source, self.faithful_hook)
        return self.output_value(out)

    def mlp_W_out(self) -> torch.Tensor:
        """The middle MLP's W_out [H, D] (hidden -> residual)."""
        return self._built().blocks[self.mlp_layer].mlp.W_out.detach().clone()

    def illusory_direction(self) -> torch.Tensor:
        """(â, ĝ)/√2 in the middle MLP's hidden space [H]: (e1 + e2)/√2 when width = 1."""
        mlp = self._built().blocks[self.mlp_layer].mlp
        a, g = mlp.W_in[B, :self.width], mlp.W_out[self.width:, B]
        return torch.cat([a / a.norm(), g / g.norm()]).detach() / 2 ** 0.5

    def faithful_W_out(self) -> torch.Tensor:
        return self._built().blocks[0].mlp.W_out.detach().clone()

    def faithful_direction(self) -> torch.Tensor:
        """h3, the real pathway's unit, in layer 0's hidden space [1]."""
        return torch.ones(1)

    def W_read(self) -> torch.Tensor:
        """Layer 2's W_in [D, 1]: the reader of b in the residual stream."""
        return self._built().blocks[2].mlp.W_in.detach().clone()

    def residual_direction(self) -> torch.Tensor:
        """Where b lives in the residual stream [D]."""
        return torch.eye(D_MODEL)[B]
