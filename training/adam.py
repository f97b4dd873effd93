"""Adam with torch's fused CPU kernel, computed the same way wherever an element lies.

The trainer's promise is that a run trains bit for bit as it would alone, whatever ensemble
it is in. An ensemble stores its runs side by side in one tensor per parameter, so a run's
elements sit at other offsets than they would alone. torch's fused CPU Adam
(``torch._fused_adam_``) computes 16 elements at a time with vector instructions and the
last ``numel % 16`` elements of a tensor one by one with scalar code, which rounds some of
them differently. Which path an element takes thus depends on where it lies, and a run would
train differently in an ensemble than alone (measured: in an ensemble of five 15-element
runs, two came out different from the same runs alone after 30 steps; see
tests/test_adam.py, which fails with the plain fused kernel). The multi-tensor (``foreach``)
kernel has no such trouble but makes eight passes over memory where the fused one makes one:
27.5 against 7.1 ms for a TopK transcoder's 8.4 million weights on 2 CPU threads.

``RunwiseAdam`` keeps every element on the vector path: the fused kernel runs over each
tensor's first ``numel - numel % LANES`` elements, and the few left over are copied into a
zero-padded block of ``LANES`` elements, stepped there (again on the vector path: the
padding's zero gradient and moments step to zeros and are dropped) and copied back. The
arithmetic is the kernel's own; only the tail's detour is ours. Anything the detour does not
cover (other devices, dtypes, non-contiguous tensors, AMSGrad, weight decay, maximize)
steps with torch's multi-tensor kernel, as before.
"""

from __future__ import annotations

import torch

# Elements per vector step: 16 float32 with AVX-512, fewer with AVX2 or NEON (torch's CPU
# vectors hold at most 16). The kernel splits work between threads at multiples of 16 (a
# 64-byte cache line), so a body cut at a multiple of 16 is all vector work on each of them.
LANES = 16


class RunwiseAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (multi-tensor kernel, state and checkpoints as torch's) whose
    step, for float32 tensors on the CPU, runs the fused kernel in a way that computes every
    element identically whatever its offset. See the module docstring."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr, foreach=True)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or not all(map(self._fits, self.param_groups)):
            return super().step(closure)
        for group in self.param_groups:
            self._fused_step(group)
        return None

    def _fits(self, group: dict) -> bool:
        """Can the fused detour step this group? (else torch's own step does)"""
        if (group["amsgrad"] or group["maximize"] or group["weight_decay"]
                or group["capturable"] or group["differentiable"] or group["fused"]):
            return False
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            tensors = [p, p.grad] + [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
            if any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
                   for t in tensors):
                return False
        return True

    def _fused_step(self, group: dict) -> None:
        bodies: list[list[torch.Tensor]] = [[], [], [], [], []]
        tails = []  # (flat tensors, where the tail starts, padded copies, step)
        steps = []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._state_of(p)
            steps.append(state["step"])
            flat = [t.view(-1) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
            n = p.numel()
            cut = n - n % LANES
            if cut:
                for acc, t in zip(bodies, flat + [state["step"]], strict=True):
                    acc.append(t[:cut] if t.dim() else t)
            if cut < n:
                padded = [p.new_zeros(LANES) for _ in flat]
                for pad, t in zip(padded, flat, strict=True):
                    pad[:n - cut] = t[cut:]
                tails.append((flat, cut, padded, state["step"]))
        torch._foreach_add_(steps, 1)  # once per tensor, before either call reads it
        beta1, beta2 = group["betas"]
        kw = dict(amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=0.0,
                  eps=group["eps"], maximize=False)
        if bodies[0]:
            torch._fused_adam_(*bodies[:4], [], bodies[4], **kw)
        if tails:
            pads = list(zip(*(padded for _, _, padded, _ in tails), strict=True))
            torch._fused_adam_(*map(list, pads), [], [s for *_, s in tails], **kw)
            for flat, cut, padded, _ in tails:  # param and moments back (not the gradient)
                for t, pad in zip(flat[:1] + flat[2:], padded[:1] + padded[2:], strict=True):
                    t[cut:] = pad[:len(t) - cut]

    def _state_of(self, p: torch.Tensor) -> dict:
        """p's state, created as torch's Adam creates it (a float32 step on the CPU)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state
