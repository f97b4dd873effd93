"""Attribution graphs on a language model, through its local replacement model.

The *local replacement model* of a prompt (Ameisen et al. 2025, "Circuit Tracing", §2.3):
the model with its attention patterns and normalisation scales frozen at their values on the
prompt, and every window MLP replaced by the transcoder's features plus an *error node* per
(layer, position), the constant y − ŷ that makes it reproduce the clean model exactly. The
MLPs of model layers *outside* the window have no transcoder; their outputs are frozen
constants too, and appear as error nodes of those layers (all of y is "unexplained").
With features held fixed, everything else is linear in the residual stream, so the direct
effect of one node on another is exact, not a first-order approximation.

Edges (direct effects, the paper's §2.4): for a target node — a feature's encoder
pre-activation z, or a logit minus the mean logit (as circuit-tracer does, so that an
edge does not just move every logit alike) — take the gradient g of the target w.r.t. the
residual stream at each MLP output and at the embeddings, with feature activations
stop-gradient (constants) so that only paths through frozen attention, normalisation and
skip connections count. Then

    A[target, feature (s, p, i)] = a_{s,p,i} · Σ_{t ≥ s} W_dec,i^{s→t} · g_{layers[t]}[p]
    A[target, error (m, p)]      = e_m[p] · g_m[p]
    A[target, embedding p]       = (token + position embedding)[p] · g_emb[p]

Several targets share one backward pass: the prompt is stacked ``batch_size`` times along the
batch dimension, row b carrying target b, and one forward pass is reused for every batch.

Conventions (``conventions=``, docs/circuit_tracer.md). ``"circuit-tracer"`` (the default)
does what circuit-tracer does at position 0 (BOS, the attention sink, whose activations are
outliers): its features are off *and* its error nodes carry no edges — the MLP outputs there
become constants, like biases, that no node accounts for (the local replacement model still
reproduces the model: only the attribution changes). ``"clt-eval"`` is this project's earlier
choice: with ``skip_first`` the features at position 0 are off and its whole MLP outputs are
error nodes, so they count against the replacement and completeness scores; without it
position 0 is treated like any other.

Scores (``clt_eval.lm.graph``): ``replacement`` and ``completeness`` count every error node,
those of out-of-window MLPs included; ``window_replacement`` and ``window_completeness``
count those MLPs as given inputs, like the embeddings, so only the transcoder's own error
lowers them. The two agree when the window covers the whole model.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch

from clt_eval.errors import check_choice, require
from clt_eval.lm.graph import AttributionGraph, graph_scores
from clt_eval.lm.splice import activate_layer, check_compatible, encode_layer, is_joint_topk
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

EMBED_HOOK = "blocks.0.hook_resid_pre"  # token (+ position) embedding: the input nodes
CONVENTIONS = ("circuit-tracer", "clt-eval")


def first_position(conventions: str, skip_first: bool | None) -> tuple[bool, bool]:
    """(features off at position 0, error nodes at position 0 without edges) for
    ``conventions`` (module docstring); ``skip_first`` None takes the convention's default,
    False keeps position 0 like any other under either."""
    check_choice("conventions", conventions, CONVENTIONS)
    if conventions == "circuit-tracer":
        off = True if skip_first is None else bool(skip_first)
        return off, off
    return bool(skip_first), False


@dataclass
class LocalReplacement:
    """Everything frozen on one prompt. P positions, M model layers, L window layers."""

    tokens_P: torch.Tensor
    frozen: dict[str, torch.Tensor]  # hook_pattern / hook_scale values, batch dim 1
    resid0_PD: torch.Tensor  # embeddings
    y_MPD: torch.Tensor  # clean MLP outputs of every model layer
    x_LPD: torch.Tensor  # clean MLP inputs at the window layers
    pre_PLF: torch.Tensor
    acts_PLF: torch.Tensor
    error_MPD: torch.Tensor  # y − ŷ at window layers, y outside the window
    logits_PV: torch.Tensor
    out_hooks: tuple[str, ...]  # every model layer's MLP-output hook
    skip_first: bool = False  # position 0's features are off (its MLP outputs: error_MPD)
    zero_first_errors: bool = False  # position 0's error nodes carry no edges (circuit-tracer)


@torch.no_grad()
def build_local_replacement(model, tc: Transcoder, window: LayerWindow,
                            tokens_P: torch.Tensor, skip_first: bool = False,
                            zero_first_errors: bool = False) -> LocalReplacement:
    """Run the prompt once and freeze what the local replacement model holds constant.

    ``skip_first``: no features at position 0, so ``error_MPD`` there holds its MLP outputs
    entire (transcoders trained here never see that position, the attention sink, whose
    activations are outliers: ``clt_eval.lm.activations``). ``zero_first_errors``: those error
    nodes carry no edges either (circuit-tracer's convention); ``error_MPD`` still holds them,
    so the local replacement model still reproduces the model.
    """
    check_compatible(tc, window, model)
    require(tc.n_runs == 1, f"attribution: expected one transcoder run, got {tc.n_runs}; "
            "pick one with tc.select([r])")
    require(tokens_P.dim() == 1 and tokens_P.numel() > 0, "attribution: expected a non-empty "
            f"1-D tensor of token ids, got shape {list(tokens_P.shape)}")
    require(EMBED_HOOK in model.hook_dict, f"hook {EMBED_HOOK!r} does not exist in the model")
    M = model.cfg.n_layers
    out_hooks = tuple(window.output_hook.format(layer=m) for m in range(M))
    missing = [h for h in out_hooks if h not in model.hook_dict]
    require(not missing, f"hook {missing[:1]} does not exist in the model")
    frozen_names = {n for n in model.hook_dict
                    if n.endswith(".hook_pattern") or n.endswith("hook_scale")}
    wanted = frozen_names | set(out_hooks) | set(window.input_hooks()) | {EMBED_HOOK}
    logits, cache = model.run_with_cache(tokens_P[None], names_filter=lambda n: n in wanted)
    x = torch.stack([cache[h][0] for h in window.input_hooks()])  # [L, P, D]
    y = torch.stack([cache[h][0] for h in out_hooks])  # [M, P, D]
    was_training = tc.training
    tc.eval()
    try:
        out = tc(x.transpose(0, 1))  # positions as the batch: TopK selects per token
        acts, recon = out.acts_RBLF, out.recon_RBLD
        if skip_first:
            acts = acts.clone()
            acts[:, 0] = 0
            recon = tc.decode(acts, x.transpose(0, 1))
    finally:
        tc.train(was_training)
    error = y.clone()
    for ell, m in enumerate(window.layers):
        error[m] = y[m] - recon[0, :, ell]
    return LocalReplacement(tokens_P, {n: cache[n].detach() for n in frozen_names},
                            cache[EMBED_HOOK][0], y, x, out.pre_RBLF[0], acts[0], error,
                            logits[0], out_hooks, skip_first, zero_first_errors)


def _frozen_hooks(ctx: LocalReplacement, batch: int) -> list:
    return [(name, lambda v, hook, c=c: c.expand(batch, *c.shape[1:]))
            for name, c in ctx.frozen.items()]


def _skip(tc: Transcoder, x_NPD: torch.Tensor, ell: int) -> torch.Tensor:
    return x_NPD @ tc.W_skip[0, ell].detach()


@torch.no_grad()
def local_forward(model, tc: Transcoder, window: LayerWindow, ctx: LocalReplacement,
                  acts_PLF: torch.Tensor | None = None, edit=None):
    """Run the local replacement model; returns (pre_PLF, logits_PV).

    With ``acts_PLF`` the features are held at those activations (direct effects only);
    without, each layer's features respond to the residual stream through the encoder (total
    effects). ``edit(layer, acts_PF) -> acts_PF`` changes what a layer's features write, in
    either mode. Attention patterns, normalisation scales, embeddings (``ctx.resid0_PD``) and
    error nodes (``ctx.error_MPD``) are the constants ``ctx`` holds.
    """
    require(acts_PLF is not None or not is_joint_topk(tc),
            "local_forward: joint TopK features cannot respond layer by layer; pass acts_PLF")
    acts, pre = {}, {}
    hooks = _frozen_hooks(ctx, 1) + [(EMBED_HOOK, lambda v, hook: ctx.resid0_PD[None])]

    def read(ell):
        def hook(value, hook):
            x = value[0]
            pre[ell] = encode_layer(tc, x[None], ell)[0]
            if acts_PLF is not None:
                a = acts_PLF[:, ell]
            else:
                a = activate_layer(tc, pre[ell][None], ell)[0]
                if ctx.skip_first:
                    a = torch.cat([torch.zeros_like(a[:1]), a[1:]])
            acts[ell] = edit(ell, a) if edit is not None else a
            ctx_x[ell] = x
        return hook

    def write(ell, m):
        def hook(value, hook):
            y = tc.b_dec[0, ell] + ctx.error_MPD[m]
            for s in range(ell + 1):  # only the blocks that exist (a PLT: s = ell)
                if ell in tc.targets(s, 0):
                    y = y + acts[s] @ tc.decoder_block(s, ell)[0]
            if tc.W_skip is not None:
                y = y + _skip(tc, ctx_x[ell], ell)
            return y[None]
        return hook

    ctx_x: dict[int, torch.Tensor] = {}
    for ell, m in enumerate(window.layers):
        hooks += [(window.input_hook.format(layer=m), read(ell)),
                  (window.output_hook.format(layer=m), write(ell, m))]
    outside = set(range(model.cfg.n_layers)) - set(window.layers)
    # Outside the window the whole MLP output is the error node.
    hooks += [(ctx.out_hooks[m], lambda v, hook, c=ctx.error_MPD[m]: c[None]) for m in outside]
    logits = model.run_with_hooks(ctx.tokens_P[None], fwd_hooks=hooks)
    return torch.stack([pre[i] for i in range(window.n_layers)], 1), logits[0]


@contextlib.contextmanager
def _no_param_grads(*modules):
    """Parameters as constants: the backward passes then only reach the probes."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _Probed:
    """One forward pass of the local replacement model on ``batch`` copies of the prompt, with
    features held constant and a zero *probe* added to every MLP output and to the embeddings:
    the gradient of a target w.r.t. a probe is its gradient w.r.t. the residual stream there.
    The pass keeps its graph, so every batch of targets costs one backward pass only."""

    def __init__(self, model, tc: Transcoder, window: LayerWindow, ctx: LocalReplacement,
                 batch: int):
        P, D = ctx.resid0_PD.shape
        self.d_emb = torch.zeros(batch, P, D, requires_grad=True)
        self.d_mlp = [torch.zeros(batch, P, D, requires_grad=True)
                      for _ in range(model.cfg.n_layers)]
        self.x: dict[int, torch.Tensor] = {}
        win = {m: ell for ell, m in enumerate(window.layers)}
        hooks = _frozen_hooks(ctx, batch)
        hooks.append((EMBED_HOOK, lambda v, hook: ctx.resid0_PD + self.d_emb))
        for ell, h in enumerate(window.input_hooks()):
            hooks.append((h, self._read(ell)))
        for m, h in enumerate(ctx.out_hooks):
            hooks.append((h, self._write(tc, ctx, m, win.get(m))))
        with torch.enable_grad():
            self.logits_BPV = model.run_with_hooks(ctx.tokens_P.expand(batch, -1),
                                                   fwd_hooks=hooks)

    def _read(self, ell: int):
        def hook(value, hook):
            self.x[ell] = value
        return hook

    def _write(self, tc: Transcoder, ctx: LocalReplacement, m: int, ell: int | None):
        const = ctx.y_MPD[m]
        live_skip = ell is not None and tc.W_skip is not None
        if live_skip:  # the skip path is linear in the residual stream: it stays live
            const = const - _skip(tc, ctx.x_LPD[ell], ell)

        def hook(value, hook):
            y = const + self.d_mlp[m]
            return y + _skip(tc, self.x[ell], ell) if live_skip else y
        return hook

    def grads(self, target: torch.Tensor):
        """(g_emb [B,P,D], M × g_mlp [B,P,D]) of Σ_b target_b."""
        probes = [self.d_emb, *self.d_mlp]
        gs = torch.autograd.grad(target, probes, retain_graph=True, allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g for p, g in zip(probes, gs, strict=True)]
        return gs[0], gs[1:]


@dataclass
class _Sources:
    """The active features as source nodes, laid out so that one batch's edges from a source
    layer s are one batched product: per position p, the features active there (padded to
    the most active position) with their activation-scaled decoder rows to every target
    layer, concatenated — [P, n_max, T·D] against the gradients [P, B, T·D]."""

    layer_N: torch.Tensor  # transcoder layer s
    pos_N: torch.Tensor
    feat_N: torch.Tensor
    act_N: torch.Tensor
    groups: list  # (target layers [T], cols [n_s], pos [n_s], slot [n_s], dec [P, n_max, T·D])

    @classmethod
    def build(cls, tc: Transcoder, acts_PLF: torch.Tensor) -> _Sources:
        P, L, F = acts_PLF.shape
        pos, layer, feat = (acts_PLF != 0).nonzero(as_tuple=True)
        order = torch.argsort((layer * P + pos) * F + feat)  # by layer, position, feature
        pos, layer, feat = pos[order], layer[order], feat[order]
        act = acts_PLF[pos, layer, feat]
        groups = []
        for s in range(L):
            cols = (layer == s).nonzero()[:, 0]
            targets = [t for t in range(s, L) if bool(tc.decoder_mask_RST[0, s, t])]
            if not cols.numel() or not targets:
                continue
            p_s, f_s = pos[cols], feat[cols]
            first = torch.searchsorted(p_s, p_s)  # sorted by position: rank within it
            slot = torch.arange(len(cols)) - first
            W_FTD = tc.decoder_from(s)[0].detach()  # this source's blocks only
            stored = [t - s for t in targets]
            dec = torch.zeros(P, int(slot.max()) + 1, len(targets) * W_FTD.shape[-1])
            rows_TnD = W_FTD[f_s][:, stored].transpose(0, 1) * act[cols, None]
            dec[p_s, slot] = rows_TnD.transpose(0, 1).flatten(1)
            groups.append((targets, cols, p_s, slot, dec))
        return cls(layer, pos, feat, act, groups)


def _edge_rows(src: _Sources, ctx: LocalReplacement, window: LayerWindow, g_emb_BPD,
               g_mlp: list[torch.Tensor], n_cols: int) -> torch.Tensor:
    """[B, n_cols]: direct effects of every source node on each batch row's target, in node
    order (features, errors by model layer then position, embeddings, logits = 0)."""
    B, P, _ = g_emb_BPD.shape
    nf = src.act_N.numel()
    rows = torch.zeros(B, n_cols)
    for targets, cols, pos, slot, dec in src.groups:
        g_PBX = torch.cat([g_mlp[window.layers[t]] for t in targets], -1).transpose(0, 1)
        out_PBn = torch.bmm(g_PBX, dec.transpose(1, 2))
        rows[:, cols] = out_PBn[pos, :, slot].T
    err_BMP = torch.stack([(g * e).sum(-1) for g, e in zip(g_mlp, ctx.error_MPD, strict=True)],
                          dim=1)
    if ctx.zero_first_errors:  # constants without a node: no edges out of them
        err_BMP[:, :, 0] = 0
    rows[:, nf:nf + err_BMP[0].numel()] = err_BMP.flatten(1)
    start = nf + err_BMP[0].numel()
    rows[:, start:start + P] = (g_emb_BPD * ctx.resid0_PD).sum(-1)
    return rows


def tokenize_prompt(model, prompt: str) -> torch.Tensor:
    """Token ids of ``prompt`` as the training windows start (``clt_eval.lm.corpus``): BOS if
    the tokenizer has one, then the text; a model without a tokenizer reads UTF-8 bytes."""
    from clt_eval.lm.corpus import byte_ids

    tok = getattr(model, "tokenizer", None)
    if tok is None:
        ids = byte_ids(prompt, model.cfg.d_vocab)
    else:
        bos = getattr(tok, "bos_token_id", None)
        ids = ([bos] if bos is not None else []) + tok(prompt, add_special_tokens=False)[
            "input_ids"]
    require(len(ids) > 0, "prompt: expected a non-empty text")
    return torch.tensor(ids, dtype=torch.long)


def logit_targets(logits_V: torch.Tensor, max_logits: int = 10, logit_prob: float = 0.95,
                  target_tokens: list[int] | None = None) -> list[int]:
    """The tokens whose logits become sink nodes: the given ones, else the most probable
    tokens until they cover ``logit_prob`` of the probability, at most ``max_logits``
    (circuit-tracer's defaults)."""
    V = logits_V.shape[-1]
    if target_tokens:
        bad = [t for t in target_tokens if not 0 <= int(t) < V]
        require(not bad, f"target tokens {bad} are outside the vocabulary (0..{V - 1})")
        return [int(t) for t in target_tokens]
    probs, order = logits_V.softmax(-1).sort(descending=True)
    n = int((probs.cumsum(0) < logit_prob).sum()) + 1
    return order[:min(n, max_logits, V)].tolist()


def attribute(model, tc: Transcoder, window: LayerWindow, tokens_P: torch.Tensor, *,
              target_tokens: list[int] | None = None, max_logits: int = 10,
              logit_prob: float = 0.95, batch_size: int = 16,
              skip_first: bool | None = None, conventions: str = "circuit-tracer",
              progress: bool | None = None) -> AttributionGraph:
    """The attribution graph of ``tokens_P``'s next-token prediction (module docstring), with
    every active feature as a node, its replacement and completeness scores filled in.
    ``conventions`` and ``skip_first``: position 0 (``first_position``). ``progress``: a bar
    on stderr over the backward passes (None: only when stderr is a terminal)."""
    require(batch_size > 0, f"batch_size={batch_size!r}: expected a positive integer")
    off, zero_err = first_position(conventions, skip_first)
    ctx = build_local_replacement(model, tc, window, tokens_P, off, zero_err)
    src = _Sources.build(tc, ctx.acts_PLF)
    logit_tok = logit_targets(ctx.logits_PV[-1], max_logits, logit_prob, target_tokens)
    M, (P, _) = model.cfg.n_layers, ctx.resid0_PD.shape
    nf, K = src.act_N.numel(), len(logit_tok)
    n = nf + M * P + P + K
    A = torch.zeros(n, n)
    # Targets: every feature, then every logit; row b of a batch computes target b.
    targets = [(int(ell), int(p), int(f)) for ell, p, f in
               zip(src.layer_N, src.pos_N, src.feat_N, strict=True)] + logit_tok
    target_rows = list(range(nf)) + list(range(n - K, n))
    W_enc = tc.W_enc[0].detach()
    with _no_param_grads(model, tc):
        probed = _Probed(model, tc, window, ctx, min(batch_size, len(targets)))
        for start in _progress(range(0, len(targets), batch_size), progress, len(targets),
                               batch_size):
            chunk = targets[start:start + batch_size]
            value = _target_values(probed, W_enc, chunk)
            g_emb, g_mlp = probed.grads(value)
            rows = _edge_rows(src, ctx, window, g_emb, g_mlp, n)
            A[target_rows[start:start + len(chunk)]] = rows[:len(chunk)]
        del probed
    g = _assemble(model, tc, window, ctx, src, logit_tok, A)
    g.meta["conventions"] = conventions
    return g


def _progress(steps: range, show: bool | None, n_targets: int, batch_size: int):
    """``steps`` wrapped in a tqdm bar on stderr (counting targets), unless not wanted."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return steps
    from tqdm import tqdm

    def gen():
        with tqdm(total=n_targets, desc="attribution", unit="target", file=sys.stderr) as bar:
            for start in steps:
                yield start
                bar.update(min(batch_size, n_targets - start))
    return gen()


def _target_values(probed: _Probed, W_enc_LDF: torch.Tensor, chunk: list) -> torch.Tensor:
    """Σ_b target_b: feature targets' pre-activations (bias left out: it has no sources),
    logit targets' logit minus the mean logit at the last position."""
    feats = [(b, t) for b, t in enumerate(chunk) if isinstance(t, tuple)]
    logit = [(b, t) for b, t in enumerate(chunk) if not isinstance(t, tuple)]
    total = probed.logits_BPV.new_zeros(())
    if feats:
        b, ell, p, f = (torch.tensor(v) for v in zip(*[(b, *t) for b, t in feats], strict=True))
        x = torch.stack([probed.x[i] for i in range(len(probed.x))])  # [L, B, P, D]
        total = total + (x[ell, b, p] * W_enc_LDF[ell, :, f]).sum()
    if logit:
        b, k = (torch.tensor(v) for v in zip(*logit, strict=True))
        last = probed.logits_BPV[b, -1]
        total = total + (last.gather(1, k[:, None])[:, 0] - last.mean(-1)).sum()
    return total


def _token_str(model, token: int) -> str:
    tok = getattr(model, "tokenizer", None)
    return str(token) if tok is None else tok.decode([token])


def _assemble(model, tc, window, ctx, src: _Sources, logit_tok, A) -> AttributionGraph:
    M, P = model.cfg.n_layers, ctx.resid0_PD.shape[0]
    layers = torch.tensor(window.layers)
    probs = ctx.logits_PV[-1].softmax(-1)
    nf = src.act_N.numel()
    kind = ["feature"] * nf + ["error"] * (M * P) + ["embedding"] * P + ["logit"] * len(logit_tok)
    layer = layers[src.layer_N].tolist() + [m for m in range(M) for _ in range(P)] \
        + [-1] * P + [M] * len(logit_tok)
    position = src.pos_N.tolist() + list(range(P)) * M + list(range(P)) + [P - 1] * len(logit_tok)
    activation = (src.act_N.tolist() + ctx.error_MPD.norm(dim=-1).flatten().tolist()
                  + ctx.resid0_PD.norm(dim=-1).tolist() + probs[logit_tok].tolist())
    tokens = ctx.tokens_P.tolist()
    g = AttributionGraph(
        kind=kind, layer=layer, tc_layer=src.layer_N.tolist() + [-1] * (len(kind) - nf),
        position=position, feature=src.feat_N.tolist() + [-1] * (len(kind) - nf),
        activation=activation, token=[-1] * (nf + M * P) + tokens + list(logit_tok), A_NN=A,
        prompt_tokens=tokens, prompt_strs=[_token_str(model, t) for t in tokens],
        meta={"model": getattr(model.cfg, "model_name", None), "window": window.to_dict(),
              "transcoder": tc.cfg.to_dict(), "n_model_layers": M, "skip_first": ctx.skip_first,
              "zero_first_errors": ctx.zero_first_errors,
              "logit_strs": [_token_str(model, t) for t in logit_tok]})
    w, err = g.logit_weights(), g.mask("error")
    g.scores = graph_scores(A, w, err, g.mask("embedding"))
    # The same scores with the MLPs outside the window counted as given inputs, like the
    # embeddings: they measure only the transcoder's own error.
    outside = err & ~torch.isin(torch.tensor(layer), layers)
    g.scores |= {f"window_{k}": v for k, v in
                 graph_scores(A, w, err & ~outside, g.mask("embedding") | outside).items()}
    return g
