"""A trained two-hop transformer: entity e -> f(e) in MLP0 -> g(f(e)) in MLP1 -> answer token.

A 2-layer TransformerLens ``HookedTransformer`` (ReLU MLPs, no LayerNorm, ``n_ctx = 1``) reads
one entity token e and predicts the answer token g(f(e)): f maps entities onto ``n_values``
values, g (shared by all entities with the same f) maps those onto ``n_answers`` answers.
A lookup table is linear in a learned embedding, so left alone the model could answer without
any MLP. Hence the residual stream is split into subspaces ``emb | f | out``: embeddings are
random and frozen in ``emb`` (more entities than dimensions: no linear map of them gives f);
MLP0 writes only ``f``; MLP1 reads only ``f`` and writes only ``out``; the unembedding reads
only ``out``; attention (with one position, an affine path around the MLPs) and W_pos are
zero. MLP0 is trained alone first to write one orthonormal code per value of f (a learned
classifier head left as much spread within a value as between values, and probes on 96
entities then scored 0.67-0.96); then MLP1 and the unembedding learn the answer, MLP0 frozen.
Verification, before the model counts as ground truth: a linear probe reads f(e) from
``blocks.0.hook_resid_post`` on held-out entities, and patching the span of the f directions
in MLP0's output from e' into e moves the answer to g(f(e')); a failure raises, uncached.

``model()`` is a position-free view of the trained transformer (its modules and hook names,
every hook [N, ·] as the contract wants, logits [N, d_vocab], the zero attention left out);
``transformer()`` is the HookedTransformer itself; the two agree exactly. The weights are
cached as safetensors plus JSON, atomically, under ``cache_dir`` (default ``$CLT_EVAL_CACHE``
or ``~/.cache/clt-eval``, then the case-study name), in a folder named by a parameter hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clt_eval.atomic import atomic_folder, write_json_atomic
from clt_eval.case_study import Circuit, GroundTruthLayer
from clt_eval.errors import CltEvalError, require

VERSION = 2  # part of the cache key: bump whenever training or verification changes
WEIGHTS, CONFIG = "weights.safetensors", "config.json"
LR = 1e-2  # both hops reach 100% within ~100 full-batch Adam steps at this rate (measured)
# Probe: chance is 1/n_values (0.125 by default), and the probe on the embedding alone scores
# about that, so 0.95 after MLP0 means MLP0 computed f. Patch: a clean intermediate moves the
# answer on every pair; 0.95 allows a few pairs near a boundary. Task: every entity.
MIN_PROBE_ACCURACY, MIN_PATCH_SUCCESS, MIN_TASK_ACCURACY = 0.95, 0.95, 1.0
PROBE_STEPS, PROBE_TRAIN_SHARE, PATCH_PAIRS = 300, 0.75, 2048


def _subspaces(d_model: int) -> tuple[slice, slice, slice]:
    """Slices of the residual stream: embedding, intermediate value f, answer."""
    s = d_model // 3
    return slice(0, s), slice(s, 2 * s), slice(2 * s, 3 * s)


def _tl_config(p: dict) -> dict:
    d_vocab = p["n_entities"] + p["n_held_out"] + p["n_answers"]
    return dict(n_layers=2, d_model=p["d_model"], n_ctx=1, d_head=8, n_heads=1,
                d_mlp=p["d_mlp"], d_vocab=d_vocab, act_fn="relu", normalization_type=None,
                default_prepend_bos=False, device="cpu", seed=None)


def _new_transformer(cfg: dict):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():  # TL 3.9 announces HookedTransformer's removal in 4.0
        warnings.simplefilter("ignore", DeprecationWarning)
        tl = HookedTransformer(HookedTransformerConfig(**cfg), move_to_device=False)
    return tl.requires_grad_(False)


@torch.no_grad()
def _constrain(tl, d_model: int) -> None:
    """Zero every weight off the path emb -> MLP0 -> f -> MLP1 -> out -> logits."""
    _, f, out = _subspaces(d_model)
    not_f, not_out = torch.ones(d_model, dtype=torch.bool), torch.ones(d_model, dtype=torch.bool)
    not_f[f], not_out[out] = False, False
    m0, m1 = tl.blocks[0].mlp, tl.blocks[1].mlp
    m0.W_out[:, not_f], m0.b_out[not_f] = 0, 0
    m1.W_in[not_f, :], m1.W_out[:, not_out], m1.b_out[not_out] = 0, 0, 0
    tl.unembed.W_U[not_out, :] = 0
    for param in [*tl.blocks[0].attn.parameters(), *tl.blocks[1].attn.parameters()]:
        param.zero_()
    tl.pos_embed.W_pos.zero_()


def _fit(params: list, loss_fn, steps: int, after_step=lambda: None, lr: float = LR) -> None:
    """Full-batch Adam on ``params`` only; they are frozen again afterwards."""
    opt = torch.optim.Adam([p.requires_grad_(True) for p in params], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
            after_step()
    for p in params:
        p.requires_grad_(False)


def _train(tl, f_E: torch.Tensor, g_G: torch.Tensor, p: dict, gen: torch.Generator) -> None:
    """Attention and W_pos are zero, so a block is ``resid + mlp(resid)``: training calls the
    transformer's own modules on [N, D] (a full TransformerLens forward costs ~3x more)."""
    emb, f_sub, _ = _subspaces(p["d_model"])
    width = emb.stop - emb.start  # all three subspaces have this width
    with torch.no_grad():
        tl.embed.W_E.zero_()
        tl.embed.W_E[:, emb] = torch.randn(tl.cfg.d_vocab, width, generator=gen) / width**0.5
    _constrain(tl, p["d_model"])
    q, _ = torch.linalg.qr(torch.randn(width, p["n_values"], generator=gen))
    codes = q.T[f_E]  # orthonormal code of each entity's value
    x, m0, m1 = tl.embed.W_E[:p["n_entities"]], tl.blocks[0].mlp, tl.blocks[1].mlp
    constrain = functools.partial(_constrain, tl, p["d_model"])
    _fit(list(m0.parameters()), lambda: (m0(x)[:, f_sub] - codes).pow(2).sum(-1).mean(),
         p["train_steps"], constrain)
    resid = x + m0(x)  # MLP0 is frozen from here on
    answer_tokens = p["n_entities"] + p["n_held_out"] + g_G[f_E]
    _fit([*m1.parameters(), *tl.unembed.parameters()],
         lambda: F.cross_entropy(tl.unembed(resid + m1(resid)), answer_tokens),
         p["train_steps"], constrain)


@functools.cache
def _view_class():
    """Defined on first use: TransformerLens takes ~9 s to import, and listing case studies
    must not import it."""
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class Block(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.mlp = block.mlp
            for name in ("resid_pre", "resid_mid", "mlp_out", "resid_post"):
                setattr(self, f"hook_{name}", HookPoint())

        def forward(self, resid_ND):
            resid_ND = self.hook_resid_mid(self.hook_resid_pre(resid_ND))  # attention is 0
            return self.hook_resid_post(resid_ND + self.hook_mlp_out(self.mlp(resid_ND)))

    class TwoHopModel(HookedRootModule):
        """tokens [N] or [N, 1] -> logits [N, d_vocab]. ``hook_gt_f`` [N, n_values] and
        ``hook_gt_g`` [N, n_answers] hold the exact indicators of f(e) and g(f(e)) (zero
        rows for tokens outside the task)."""

        def __init__(self, tl, f_E: torch.Tensor, g_G: torch.Tensor, n_answers: int):
            super().__init__()
            self.embed, self.unembed = tl.embed, tl.unembed
            self.blocks = nn.ModuleList(Block(b) for b in tl.blocks)
            f_V = torch.full((tl.cfg.d_vocab,), -1, dtype=torch.long)
            f_V[:len(f_E)] = f_E
            self.register_buffer("f_V", f_V)  # f of every vocabulary entry, -1 off the task
            self.register_buffer("g_G", g_G.clone())
            self.n_answers = n_answers
            self.hook_embed, self.hook_gt_f, self.hook_gt_g = HookPoint(), HookPoint(), HookPoint()
            self.setup()

        def forward(self, tokens):
            tokens = tokens[:, -1] if tokens.dim() == 2 else tokens
            f = self.f_V[tokens]
            on = (f >= 0)[:, None].float()
            f = f.clamp(min=0)
            self.hook_gt_f(F.one_hot(f, len(self.g_G)).float() * on)
            self.hook_gt_g(F.one_hot(self.g_G[f], self.n_answers).float() * on)
            resid = self.hook_embed(self.embed(tokens))  # W_pos is 0
            for block in self.blocks:
                resid = block(resid)
            return self.unembed(resid)

    return TwoHopModel


def class_means(y_ND: torch.Tensor, labels_N: torch.Tensor, n: int) -> torch.Tensor:
    """[n, D]: the mean of y over each class minus the overall mean."""
    onehot = F.one_hot(labels_N, n).float()
    return (onehot.T @ y_ND) / onehot.sum(0)[:, None] - y_ND.mean(0)


def _probe_accuracy(x_ND: torch.Tensor, labels_N: torch.Tensor, n: int,
                    gen: torch.Generator) -> float:
    """Held-out accuracy of a multinomial logistic regression reading ``labels`` from x."""
    order = torch.randperm(len(labels_N), generator=gen)
    train, test = order.split(int(PROBE_TRAIN_SHARE * len(order)))
    x = x_ND - x_ND[train].mean(0)  # centred, not scaled: a dimension may be constant
    probe = nn.Linear(x.shape[1], n)
    _fit(list(probe.parameters()), lambda: F.cross_entropy(probe(x[train]), labels_N[train]),
         PROBE_STEPS, lr=0.05)
    return float((probe(x[test]).argmax(-1) == labels_N[test]).float().mean())


def _answers(logits, p: dict) -> torch.Tensor:
    """Index (0..n_answers-1) of the highest-scoring answer token."""
    first = p["n_entities"] + p["n_held_out"]
    return logits[..., first:first + p["n_answers"]].argmax(-1)


@torch.no_grad()
def verify(model, f_E: torch.Tensor, g_G: torch.Tensor, p: dict) -> dict:
    """The numbers that make the model ground truth (see the module docstring)."""
    from clt_eval.interventions import projector

    gen = torch.Generator().manual_seed(p["seed"])
    tokens = torch.arange(p["n_entities"])
    hooks = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out")
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    answers = g_G[f_E]
    v = {"task_accuracy": float((_answers(logits, p) == answers).float().mean()),
         "probe_accuracy": _probe_accuracy(cache[hooks[1]], f_E, p["n_values"], gen),
         "probe_accuracy_before_hop1": _probe_accuracy(cache[hooks[0]], f_E, p["n_values"],
                                                       gen)}
    # Patch only the span of the f directions in MLP0's output, as the evaluator does.
    mlp0 = cache[hooks[2]]
    P = projector(class_means(mlp0, f_E, p["n_values"]))
    i, j = torch.meshgrid(tokens, tokens, indexing="ij")
    i, j = i[f_E[i] != f_E[j]], j[f_E[i] != f_E[j]]
    pick = torch.randperm(len(i), generator=gen)[:PATCH_PAIRS]
    i, j = i[pick], j[pick]
    patched = model.run_with_hooks(tokens[i], fwd_hooks=[
        (hooks[2], lambda y, hook: y - y @ P + mlp0[j] @ P)])
    hit = _answers(patched, p) == answers[j]
    moved = answers[i] != answers[j]
    return v | {"patch_success": float(hit.float().mean()),
                "patch_success_answer_changed": float(hit[moved].float().mean()),
                "patch_pairs": len(i)}


def check_verification(v: dict, where: str) -> None:
    """Raise unless every check passed: a failed build never becomes ground truth."""
    for key, least in (("task_accuracy", MIN_TASK_ACCURACY),
                       ("probe_accuracy", MIN_PROBE_ACCURACY),
                       ("patch_success", MIN_PATCH_SUCCESS)):
        value = v.get(key)
        if not isinstance(value, float) or value < least:
            raise CltEvalError(f"{where}: verification check {key}={value!r}; expected "
                               f">= {least} before the model counts as ground truth")


def _build(folder: Path, p: dict) -> None:
    """Train, verify, and only then write the cache."""
    from safetensors.torch import save_file

    start, threads = time.perf_counter(), torch.get_num_threads()
    # One thread: these tensors are tiny, and a second thread costs 10x and more whenever
    # the other core is busy (measured on the 2-core machines this runs on).
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # seeded; the caller's RNG is left alone
            torch.manual_seed(p["seed"])
            gen = torch.Generator().manual_seed(p["seed"])
            f_E = torch.randperm(p["n_entities"], generator=gen) % p["n_values"]
            g_G = torch.randperm(p["n_values"], generator=gen) % p["n_answers"]
            tl = _new_transformer(cfg := _tl_config(p))
            _train(tl, f_E, g_G, p, gen)
            v = verify(_view_class()(tl.eval(), f_E, g_G, p["n_answers"]), f_E, g_G, p)
    finally:
        torch.set_num_threads(threads)
    v["build_seconds"] = round(time.perf_counter() - start, 2)
    check_verification(v, f"two_hop_transformer build {p}")
    tensors = {k: t.contiguous() for k, t in tl.named_parameters()}
    with atomic_folder(folder) as tmp:
        save_file(tensors | {"task.f": f_E, "task.g": g_G}, str(tmp / WEIGHTS))
        write_json_atomic(tmp / CONFIG, {"params": p, "transformer_config": cfg,
                                         "verification": v})


def _load(folder: Path, p: dict):
    """(transformer, f, g, config) from the cache folder; one-line errors name the file."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / CONFIG).read_text())
        tensors = load_file(str(folder / WEIGHTS))
    except Exception as exc:  # a missing, truncated or foreign file: all mean "rebuild"
        raise CltEvalError(f"{folder}: unreadable cache ({type(exc).__name__}: {exc}); "
                           f"expected {CONFIG} and {WEIGHTS} (delete the folder to rebuild)"
                           ) from None
    require(config.get("params") == p,
            f"{folder / CONFIG}: params {config.get('params')}; expected {p}")
    tl = _new_transformer(config["transformer_config"])
    missing = sorted({*dict(tl.named_parameters()), "task.f", "task.g"} - set(tensors))
    require(not missing, f"{folder / WEIGHTS}: tensors {missing} missing")
    tl.load_state_dict({k: t for k, t in tensors.items() if not k.startswith("task.")},
                       strict=False)  # the attention masks are buffers TL rebuilds itself
    check_verification(config.get("verification", {}), str(folder / CONFIG))
    return tl.eval(), tensors["task.f"], tensors["task.g"], config


class TwoHopTransformer:
    """Case-study plugin: the trained two-hop transformer (see the module docstring).

    ``output_value`` is the index (0..n_answers-1) of the highest-scoring answer token, as a
    float: a changed answer moves it by at least 1, so ``output_tolerance = 0.5`` means "the
    same answer" and an intervention shows exactly when it changes the answer. Off-distribution
    inputs are the held-out entity tokens: random embeddings never trained on (no f there).
    """

    name = "two_hop_transformer"
    description = ("trained 2-layer transformer: entity -> f(e) in MLP0 -> g(f(e)) in MLP1 -> "
                   "answer token; both hops verified by a probe and by patching")
    n_layers = 2
    middle_layer, output_layer = 0, 1
    input_hooks = ("blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid")  # no LayerNorm
    output_hooks = ("blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out")
    output_tolerance = 0.5

    def __init__(self, n_entities: int = 256, n_values: int = 8, n_answers: int = 4,
                 n_held_out: int = 64, d_model: int = 48, d_mlp: int = 128,
                 train_steps: int = 300, seed: int = 0, cache_dir: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        p = {"n_entities": n_entities, "n_values": n_values, "n_answers": n_answers,
             "n_held_out": n_held_out, "d_model": d_model, "d_mlp": d_mlp,
             "train_steps": train_steps, "seed": seed, "version": VERSION}
        _check_params(p)
        self.params, self.d_model, self.device = p, d_model, torch.device(device)
        key = hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:16]
        default_root = Path(os.environ.get("CLT_EVAL_CACHE") or Path.home() / ".cache/clt-eval")
        self.cache_path = Path(cache_dir or default_root / self.name) / key
        self.loaded_from_cache = (self.cache_path / CONFIG).exists()
        if not self.loaded_from_cache:
            _build(self.cache_path, p)
        # Built just now or not, the model is read from the files: build and reload agree.
        tl, self.f_E, self.g_G, config = _load(self.cache_path, p)
        self.verification = config["verification"]
        self._transformer = tl.to(self.device, print_details=False)
        self._model = _view_class()(tl, self.f_E, self.g_G, n_answers).to(self.device).eval()
        self._ground_truth: list[GroundTruthLayer] | None = None
        self.f_names = tuple(f"f={v}" for v in range(n_values))  # ground-truth feature names
        self.g_names = tuple(f"g={k}" for k in range(n_answers))

    def transformer(self):
        """The trained HookedTransformer itself (tokens [N, 1] -> logits [N, 1, d_vocab])."""
        return self._transformer

    def model(self):
        return self._model

    def inputs(self) -> torch.Tensor:
        return torch.arange(self.params["n_entities"], device=self.device)[:, None]

    def off_distribution_inputs(self, n: int = 512, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        held = torch.randint(0, self.params["n_held_out"], (n, 1), generator=gen)
        return (self.params["n_entities"] + held).to(self.device)

    def output_value(self, model_out: torch.Tensor) -> torch.Tensor:
        return _answers(model_out, self.params).float()

    def answers(self) -> torch.Tensor:
        """The correct answer index g(f(e)) of every input."""
        return self.g_G[self.f_E].to(self.device)

    def ground_truth(self) -> list[GroundTruthLayer]:
        """Step 1 (layer 0): indicators of f(e); step 2 (layer 1): indicators of g(f(e)).
        Directions: the class-conditional mean of the layer's MLP output minus its mean."""
        if self._ground_truth is None:
            with torch.no_grad():
                _, cache = self._model.run_with_cache(self.inputs())
            steps = (("hook_gt_f", self.f_names, self.f_E.to(self.device)),
                     ("hook_gt_g", self.g_names, self.answers()))
            self._ground_truth = [GroundTruthLayer(layer, hook, names, class_means(
                cache[self.output_hooks[layer]], labels, len(names)))
                for layer, (hook, names, labels) in enumerate(steps)]
        return self._ground_truth

    def input_directions(self) -> torch.Tensor:
        return self._model.embed.W_E[:self.params["n_entities"]].detach()

    def circuit(self) -> Circuit:
        """One input node per entity token; edges e -> f(e) and f -> g(f)."""
        entities = tuple(f"e{e}" for e in range(self.params["n_entities"]))
        fs, gs = self.f_names, self.g_names
        edges = [(e, fs[v]) for e, v in zip(entities, self.f_E.tolist(), strict=True)]
        edges += [(fs[v], gs[k]) for v, k in enumerate(self.g_G.tolist())]
        layers = dict.fromkeys(entities, -1) | dict.fromkeys(fs, 0) | dict.fromkeys(gs, 1)
        return Circuit(entities + fs + gs, tuple(edges), layers)


def _check_params(p: dict) -> None:
    for field, value in p.items():
        require(isinstance(value, int) and value >= (field != "seed"),
                f"{field}={value!r}; expected a {'non-negative' if field == 'seed' else 'positive'}"
                " integer")
    s = p["d_model"] // 3
    require(p["d_model"] % 3 == 0 and 2 <= p["n_answers"] <= p["n_values"] <= s,
            f"d_model={p['d_model']}, n_values={p['n_values']}, n_answers={p['n_answers']}; "
            "expected d_model a multiple of 3 and 2 <= n_answers <= n_values <= d_model/3")
    require(p["n_entities"] >= 4 * s, f"n_entities={p['n_entities']}; expected >= "
            f"4 * d_model/3 = {4 * s}, so that no linear map of the embedding computes f")
