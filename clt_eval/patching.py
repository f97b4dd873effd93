"""Subspace activation patching, distributed alignment search (DAS) and the patching metrics.

Following Makelov, Lange & Nanda, "Is This the Subspace You Are Looking for?" (ICLR 2024):

* A *subspace patch* of a base activation w from a source activation u along the subspace
  spanned by the orthonormal columns of V replaces w's coordinates in that subspace by u's:
  w' = w + V Vᵀ (u − w). With V spanning everything this is the whole-component patch w' = u.
* *DAS* learns V (k columns) so that patching from the source makes the model answer as if
  the causal variable took the source's value. The paper learns an orthogonal rotation and
  swaps its first k coordinates, trained with cross-entropy toward the counterfactual answer
  by Adam at lr 0.01, decayed linearly to 0.1x. For the toys, whose output is one number, the
  loss is the squared error to the counterfactual output value instead.

Shapes: ``_ND`` is a batch of activations with any leading dims and D coordinates last;
``V_DK`` holds K orthonormal columns. Hooks are TransformerLens hook names; the model is any
``HookedRootModule`` (``run_with_hooks``/``run_with_cache``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from clt_eval.errors import require

# Columns count as orthonormal when every entry of VᵀV − I is below this (float32 QR gives
# ~1e-7; a hand-typed 1/√2 rounded to 4 digits is rejected, as it should be).
ORTHONORMAL_ATOL = 1e-4


# ---- the patch itself ----------------------------------------------------------------------
def as_basis(V: torch.Tensor, D: int, name: str = "V_DK") -> torch.Tensor:
    """``V`` as a [D, K] matrix with orthonormal columns; a single direction [D] is normalised.

    Refuses (naming ``name``) a non-tensor, a wrong number of rows, a zero or non-finite
    direction, K > D, or columns that are not orthonormal."""
    require(isinstance(V, torch.Tensor), f"{name}: got {type(V).__name__}; expected a tensor "
            f"[{D}] (one direction) or [{D}, K] (orthonormal columns)")
    require(V.dim() in (1, 2) and V.shape[0] == D, f"{name}: shape {tuple(V.shape)}; expected "
            f"[{D}] (one direction) or [{D}, K] with K <= {D}")
    require(bool(torch.isfinite(V).all()), f"{name}: has non-finite entries; expected a "
            "finite direction")
    if V.dim() == 1:
        norm = V.norm()
        require(float(norm) > 0, f"{name}: is the zero vector; expected a nonzero direction")
        return (V / norm)[:, None]
    K = V.shape[1]
    require(1 <= K <= D, f"{name}: k={K} columns; expected 1 <= k <= D={D}")
    gram = V.T @ V - torch.eye(K, dtype=V.dtype, device=V.device)
    err = float(gram.abs().max())
    require(err < ORTHONORMAL_ATOL, f"{name}: columns are not orthonormal (max |VᵀV − I| = "
            f"{err:.2g}); expected orthonormal columns (e.g. torch.linalg.qr(V).Q)")
    return V


def _patch(base_ND: torch.Tensor, source_ND: torch.Tensor, V_DK: torch.Tensor) -> torch.Tensor:
    """w + V Vᵀ (u − w), without checks (DAS calls this every step)."""
    return base_ND + ((source_ND - base_ND) @ V_DK) @ V_DK.T


def subspace_patch(base_ND: torch.Tensor, source_ND: torch.Tensor,
                   V_DK: torch.Tensor) -> torch.Tensor:
    """Base activations with their coordinates along span(V) taken from the source."""
    require(isinstance(base_ND, torch.Tensor) and isinstance(source_ND, torch.Tensor),
            "base_ND, source_ND: expected tensors")
    require(base_ND.shape == source_ND.shape, f"source_ND: shape {tuple(source_ND.shape)}; "
            f"expected the shape of base_ND {tuple(base_ND.shape)}")
    require(base_ND.dim() >= 1, "base_ND: a scalar; expected [..., D]")
    return _patch(base_ND, source_ND, as_basis(V_DK, base_ND.shape[-1]))


def whole_patch(base_ND: torch.Tensor, source_ND: torch.Tensor) -> torch.Tensor:
    """The whole-component patch: the source's value, in place of the base's."""
    require(base_ND.shape == source_ND.shape, f"source_ND: shape {tuple(source_ND.shape)}; "
            f"expected the shape of base_ND {tuple(base_ND.shape)}")
    return source_ND


# ---- running a model with a patch ----------------------------------------------------------
def _require_hook(model, hook_name: str) -> None:
    hooks = getattr(model, "hook_dict", None)
    require(isinstance(hooks, dict), f"model: {type(model).__name__} has no hook_dict; expected "
            "a TransformerLens HookedRootModule")
    require(hook_name in hooks, f"hook_name={hook_name!r} is not a hook point of the model; "
            f"expected one of its hook names, e.g. {next(iter(hooks), '(none)')!r}")


def _require_pairs(base_inputs, source_inputs) -> None:
    require(len(base_inputs) == len(source_inputs) and len(base_inputs) > 0,
            f"source_inputs: {len(source_inputs)} rows; expected as many as base_inputs "
            f"({len(base_inputs)}), one source per base, at least one pair")


@torch.no_grad()
def cache_hook(model, inputs, hook_name: str) -> torch.Tensor:
    """The value of ``hook_name`` on ``inputs`` (one clean forward pass, detached)."""
    _require_hook(model, hook_name)
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n == hook_name)
    return cache[hook_name].detach()


def _hook(source_ND: torch.Tensor, V_DK: torch.Tensor | None, pos: int | None):
    """A forward hook replacing the value (at token ``pos``, or everywhere) by the patch."""
    def fn(value, hook):
        src = source_ND.to(value.dtype)
        require(pos is None or value.dim() >= 3, f"pos={pos}: hook {hook.name!r} holds shape "
                f"{tuple(value.shape)}; expected [N, T, D] to patch one token position")
        if pos is None:
            return src if V_DK is None else _patch(value, src, V_DK)
        out = value.clone()
        new = src[:, pos] if V_DK is None else _patch(value[:, pos], src[:, pos], V_DK)
        out[:, pos] = new
        return out
    return fn


def run_patched(model, base_inputs, source_inputs, hook_name: str,
                V: torch.Tensor | None = None, pos: int | None = None,
                source_acts: torch.Tensor | None = None):
    """The model's output on ``base_inputs`` with ``hook_name`` patched from ``source_inputs``.

    ``V`` ([D] or [D, K]): patch that subspace; None: patch the whole component. ``pos``:
    patch only that token position of a [N, T, D] value. ``source_acts``: the source's hook
    value, when the caller already has it (the source is otherwise run once here)."""
    _require_hook(model, hook_name)
    _require_pairs(base_inputs, source_inputs)
    src = cache_hook(model, source_inputs, hook_name) if source_acts is None else source_acts
    V_DK = None if V is None else as_basis(V, src.shape[-1], "V").to(src.device, src.dtype)
    with torch.no_grad():
        return model.run_with_hooks(base_inputs, fwd_hooks=[(hook_name, _hook(src, V_DK, pos))])


# ---- distributed alignment search ----------------------------------------------------------
@dataclass
class DasResult:
    V_DK: torch.Tensor  # the learned orthonormal columns
    losses: list[float] = field(default_factory=list)  # per step

    @property
    def final_loss(self) -> float:
        return self.losses[-1]


def mse_loss(value_fn: Callable, target_N: torch.Tensor) -> Callable:
    """Loss for a toy: squared error between ``value_fn(model_out)`` and the counterfactual
    output values (the true model's output when the causal variable takes the source's value)."""
    return lambda out, idx: (value_fn(out) - target_N[idx]).pow(2).mean()


def cross_entropy_loss(answers_N: torch.Tensor, pos: int = -1) -> Callable:
    """The paper's DAS loss for a language model: cross-entropy of the logits at ``pos``
    toward the counterfactual answer tokens."""
    return lambda logits, idx: torch.nn.functional.cross_entropy(logits[:, pos], answers_N[idx])


def _parametrise(D: int, k: int, seed: int, device, dtype):
    """(module holding the parameters, () -> V_DK). k = 1: v/‖v‖; k > 1: the first k columns
    of an orthogonal matrix (torch's orthogonal parametrization), as DAS rotates and swaps."""
    with torch.random.fork_rng(devices=[]):  # seeded without touching the global stream
        torch.manual_seed(seed)
        if k == 1:
            p = torch.randn(D)
            module = torch.nn.ParameterList([torch.nn.Parameter(p / p.norm())])
        else:
            module = torch.nn.utils.parametrizations.orthogonal(
                torch.nn.Linear(D, D, bias=False))
    module = module.to(device=device, dtype=dtype)
    if k == 1:
        return module, lambda: (module[0] / module[0].norm())[:, None]
    return module, lambda: module.weight[:, :k]


def train_das(model, hook_name: str, base_inputs, source_inputs, loss_fn: Callable,
              k: int = 1, steps: int = 300, lr: float = 0.01, seed: int = 0,
              pos: int | None = None, batch_size: int | None = None) -> DasResult:
    """Learn V [D, k] so that patching ``hook_name`` from the source along V minimises
    ``loss_fn(patched output, rows)`` (``mse_loss`` or ``cross_entropy_loss``; ``rows`` are
    the indices of the pairs in the batch, to pick their targets).

    Adam at ``lr`` decayed linearly to 0.1x over ``steps`` (the paper's schedule); full batch
    unless ``batch_size``. Only V is trained; the model's parameters get no gradient.
    Deterministic for a given seed on a given device."""
    _require_hook(model, hook_name)
    _require_pairs(base_inputs, source_inputs)
    require(isinstance(steps, int) and steps > 0, f"steps={steps!r}: expected an integer > 0")
    require(isinstance(lr, int | float) and lr > 0, f"lr={lr!r}: expected a number > 0")
    src = cache_hook(model, source_inputs, hook_name)
    D, N = src.shape[-1], len(base_inputs)
    require(isinstance(k, int) and 1 <= k <= D, f"k={k!r}: expected an integer 1 <= k <= D={D}")
    require(batch_size is None or (isinstance(batch_size, int) and batch_size > 0),
            f"batch_size={batch_size!r}: expected None (full batch) or an integer > 0")
    require(batch_size is None or isinstance(base_inputs, torch.Tensor),
            "batch_size: mini-batches need base_inputs as a tensor; expected None otherwise")
    module, basis = _parametrise(D, k, seed, src.device, src.dtype)
    params = list(module.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=steps)
    gen = torch.Generator().manual_seed(seed)
    rows, base = torch.arange(N), base_inputs
    now = {"src": src, "V": None}  # what the one registered hook patches in, this step
    hook = (hook_name, lambda value, hook: _hook(now["src"], now["V"], pos)(value, hook))
    losses = []
    # Registered once: adding and removing it every step cost about a third of a toy step.
    with model.hooks(fwd_hooks=[hook]):
        for _ in range(steps):
            if batch_size is not None:
                rows = torch.randperm(N, generator=gen)[:batch_size]
                base = base_inputs[rows.to(base_inputs.device)]
                now["src"] = src[rows.to(src.device)]
            now["V"] = basis()
            loss = loss_fn(model(base), rows.to(src.device))
            # Gradients for V only: the model's own parameters must not accumulate any.
            for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                p.grad = g
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    with torch.no_grad():
        return DasResult(basis().detach().clone(), losses)


# ---- metrics (pure functions of tensors) ---------------------------------------------------
def fraction_of_change(patched_N: torch.Tensor, base_N: torch.Tensor,
                       counterfactual_N: torch.Tensor, atol: float = 1e-6) -> float:
    """Fraction of the counterfactual change a patch achieves, over the pairs whose
    counterfactual output differs from the base's by more than ``atol``:

        Σ (patched − base)(cf − base) / Σ (cf − base)².

    A ratio of sums (the least-squares slope of achieved on wanted change) rather than a mean
    of per-pair ratios: a pair with a tiny wanted change cannot blow it up, and a change of
    the wrong sign counts against it. 1: exactly the counterfactual; 0: nothing (or changes
    unrelated to the wanted ones). NaN when no pair's counterfactual differs."""
    require(patched_N.shape == base_N.shape == counterfactual_N.shape,
            f"patched_N, base_N, counterfactual_N: shapes {tuple(patched_N.shape)}, "
            f"{tuple(base_N.shape)}, {tuple(counterfactual_N.shape)}; expected one shape [N]")
    want = (counterfactual_N - base_N).double()
    keep = want.abs() > atol
    if not bool(keep.any()):
        return float("nan")
    got = (patched_N - base_N).double()[keep]
    return float((got * want[keep]).sum() / want[keep].pow(2).sum())


def logit_diff(logits_NV: torch.Tensor, correct_N: torch.Tensor,
               wrong_N: torch.Tensor) -> torch.Tensor:
    """Per-sample logit difference, correct answer minus the wrong one, [N]."""
    return (logits_NV.gather(-1, correct_N[:, None]) - logits_NV.gather(-1, wrong_N[:, None]))[:, 0]


def fldd(ld_patched_N: torch.Tensor, ld_clean_N: torch.Tensor) -> float:
    """Fractional logit-difference decrease, 1 − LD_patched / LD_clean, with LD the mean over
    the prompts (the paper's IOI metric: 1 = the patch erases the model's preference, above 1
    = it reverses it, negative = it strengthens it)."""
    clean = float(ld_clean_N.double().mean())
    require(clean != 0.0, "ld_clean_N: mean clean logit difference is 0; expected a task the "
            "model solves (nonzero)")
    return 1.0 - float(ld_patched_N.double().mean()) / clean


def interchange_accuracy(patched: torch.Tensor, counterfactual: torch.Tensor,
                         atol: float = 0.1) -> float:
    """Share of pairs whose patched prediction is the counterfactual answer: for logits
    [N, V], argmax equals the answer tokens [N]; for scalar outputs [N], within ``atol``."""
    if patched.dim() == 2:
        require(counterfactual.shape == patched.shape[:1], f"counterfactual: shape "
                f"{tuple(counterfactual.shape)}; expected answer ids [{patched.shape[0]}]")
        return float((patched.argmax(-1) == counterfactual).double().mean())
    require(patched.shape == counterfactual.shape, f"counterfactual: shape "
            f"{tuple(counterfactual.shape)}; expected {tuple(patched.shape)} like patched")
    return float(((patched - counterfactual).abs() <= atol).double().mean())
