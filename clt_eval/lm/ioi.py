"""Indirect object identification (IOI) on a real model: the MLP-in-the-middle table.

Makelov, Lange & Nanda (ICLR 2024) patch GPT-2 small's IOI prompts at the last token, at the
layer-8 MLP, and compare (FLDD / interchange accuracy): the whole MLP (−8% / 0.0%), a 1-d DAS
direction among its hidden units (46.7% / 4.2%), that direction's part in the row space of the
MLP's output weights alone (13.5%) and its kernel part alone (0.0%), and a 1-d DAS direction in
the residual stream (140.7% / 74.8%). A direction that moves the output although the whole MLP
does not, and whose effect vanishes when split into the part the MLP can write and the part it
cannot, is the illusion: the patch opens a pathway the model does not use. ``ioi_table`` runs
the same five patches at one layer of any ``HookedTransformer`` with a tokenizer.

Templates file (``training/specs/ioi_templates.json``, or any file of the same shape): a JSON
object with

* ``templates``: strings with the slots ``{A}``, ``{B}`` and ``{S}``, each exactly once.
  ``{A}`` and ``{B}`` are the two names the first clause introduces, ``{S}`` is the name
  repeated as the subject later on, e.g. ``"When {A} and {B} went to the store, {S} gave a
  cold drink to"``. The prompt ends right before the answer.
* ``names``: names that follow a space and are one token each, with that leading space, in
  the tokenizer used (``build_ioi`` refuses any that are not).

Other keys (a description, the tokenizer it was checked with, the token count) are notes.
All prompts must tokenise to one length, so that they batch without padding (and the last
position is the same for all); the shipped templates are 15 SmolLM2 tokens each.

Prompts. A base prompt is ABB: A is the indirect object (IO, the answer ``" " + A``), B the
subject S, repeated. Each base gets a source prompt from the same template and the same two
names in which the answer's role flips (``source=``):

* ``"order"`` (default): the first clause's names trade places, BAB: "When B and A ..., B
  gave ... to". The IO is the same name but now second: the position of the IO (the
  positional signal the IOI circuit's S-inhibition heads send to the last token) flips while
  the names stay.
* ``"roles"``: the other name is repeated, ABA: "When A and B ..., A gave ... to": the IO and
  S roles of the two names swap while their positions stay.

Either way, a patch that carries the source's "which name is the IO" into the base should
make the model answer the base's S: the counterfactual answer.

Metrics, on held-out pairs: LD = logit(IO) − logit(S) at the last position of the base
prompt; FLDD = 1 − mean LD_patched / mean LD_clean (100%: the preference is erased; above
100%: reversed, as a full swap of the feature would do); interchange accuracy = share of
pairs whose patched logit for S exceeds that for IO (argmax over the two names equals the
counterfactual answer).

Hooks. MLP hidden units: ``blocks.ℓ.mlp.hook_post``. For a gated MLP (SmolLM2 and other
Llama-style models) TransformerLens's ``GatedMLP`` computes hook_post = act(x W_gate) ⊙
(x W_in) (+ b_in) and returns hook_post @ W_out + b_out, so hook_post is what W_out reads, as
for a plain MLP. Residual stream: ``blocks.ℓ.hook_resid_post``, the stream right after MLP ℓ
has written to it. DAS trains a single direction with ``clt_eval.patching.train_das`` and
the paper's cross-entropy loss toward the counterfactual answer.

Layer. The comparison says something only where the last token's residual stream already
carries the feature: before that, every patch at the last position does nothing.
``whole_patch_scan`` finds it. On SmolLM2-135M with "order" sources, patching the whole
residual stream at the last token does nothing up to layer 19 and reverses the answer at
layers 20-22 (~147% FLDD); from 24 on, the last token holds the answer name itself. Layer 20
is then SmolLM2's counterpart of GPT-2 small's layer 8 in the paper.

Speed. Every patch is at the last position, which no earlier position sees, so
``LastTokenRunner`` computes the prompts' earlier positions once (keys and values of every
layer) and each run recomputes only the last token from the patched block on: DAS steps
are T times cheaper than full passes (and skip the blocks before ℓ), with the same logits.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clt_eval.errors import CltEvalError, check_choice, require
from clt_eval.illusion import MIN_PART_NORM, split_direction
from clt_eval.patching import (
    DasResult,
    cache_hook,
    cross_entropy_loss,
    fldd,
    interchange_accuracy,
    run_patched,
    train_das,
)

SLOTS = ("A", "B", "S")
SOURCES = ("order", "roles")
TEMPLATES_FILE = "ioi_templates.json"
COMPONENTS = ("mlp_whole", "mlp_das", "mlp_das_rowspace", "mlp_das_kernel", "resid_das")


# ---- templates ----------------------------------------------------------------------------
@dataclass(frozen=True)
class IoiSpec:
    templates: tuple[str, ...]
    names: tuple[str, ...]


def default_templates_path() -> Path:
    """The packaged templates file, found through the ``training`` package's data."""
    from importlib import resources

    return Path(str(resources.files("clt_eval.training").joinpath("specs", TEMPLATES_FILE)))


def _slots(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise CltEvalError(f"template {template!r}: not a format string ({exc})") from None


def check_spec(templates: Sequence[str], names: Sequence[str], where: str = "spec") -> IoiSpec:
    """An ``IoiSpec``, after checking each template has the slots {A}, {B}, {S} once each
    and the names are at least two distinct words without spaces."""
    require(isinstance(templates, list | tuple) and len(templates) > 0,
            f"{where}: templates: expected a non-empty list of strings")
    for t in templates:
        require(isinstance(t, str) and sorted(_slots(t)) == sorted(SLOTS),
                f"{where}: template {t!r}: expected the slots {{A}}, {{B}}, {{S}} once each "
                "and no other braces")
    require(isinstance(names, list | tuple) and len(set(names)) >= 2,
            f"{where}: names: expected a list of at least two distinct names")
    bad = [n for n in names if not (isinstance(n, str) and n and not n.isspace()
                                    and " " not in n)]
    require(not bad, f"{where}: names {bad!r}: expected non-empty words without spaces")
    require(len(set(names)) == len(names), f"{where}: names: duplicates; expected each once")
    return IoiSpec(tuple(templates), tuple(names))


def load_spec(path: str | Path | None = None) -> IoiSpec:
    """Templates and names from a JSON file (default: the packaged one)."""
    path = Path(path) if path is not None else default_templates_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CltEvalError(f"{path}: cannot read IOI templates ({exc})") from None
    require(isinstance(data, dict), f"{path}: expected a JSON object with 'templates' and "
            "'names'")
    return check_spec(data.get("templates"), data.get("names"), str(path))


# ---- the dataset -------------------------------------------------------------------------
@dataclass(frozen=True)
class IoiData:
    """Paired IOI prompts, one row per pair, all of one length T."""

    base_NT: torch.Tensor  # base prompts (ABB), token ids
    source_NT: torch.Tensor  # source prompts (BAB for "order", ABA for "roles")
    io_N: torch.Tensor  # the base's answer: the IO name's token
    s_N: torch.Tensor  # the base's subject: the counterfactual answer
    source_answer_N: torch.Tensor  # the source prompt's own answer
    template_N: torch.Tensor  # index of the template
    base_text: tuple[str, ...]
    source_text: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return self.base_NT.shape[0]

    @property
    def pos(self) -> int:
        """The last token position, where the answer is predicted and patches are made."""
        return self.base_NT.shape[1] - 1

    @property
    def base_ids(self) -> torch.Tensor:
        """Row ids of the base prompts in ``ioi_runner``'s table: 0..N−1."""
        return torch.arange(len(self))

    @property
    def source_ids(self) -> torch.Tensor:
        """Row ids of the source prompts in ``ioi_runner``'s table: N..2N−1."""
        return torch.arange(len(self)) + len(self)

    def take(self, rows) -> IoiData:
        rows = torch.as_tensor(rows, dtype=torch.long)
        idx = rows.tolist()
        return IoiData(self.base_NT[rows.to(self.base_NT.device)],
                       self.source_NT[rows.to(self.source_NT.device)],
                       *(t[rows.to(t.device)] for t in (self.io_N, self.s_N,
                                                         self.source_answer_N,
                                                         self.template_N)),
                       tuple(self.base_text[i] for i in idx),
                       tuple(self.source_text[i] for i in idx), self.source)

    def split(self, n_train: int, seed: int = 0) -> tuple[IoiData, IoiData]:
        """(train, test): ``n_train`` random pairs and the rest, disjoint."""
        require(isinstance(n_train, int) and 0 < n_train < len(self),
                f"n_train={n_train!r}: expected an integer 0 < n_train < {len(self)} pairs")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.take(perm[:n_train]), self.take(perm[n_train:])

    def to(self, device) -> IoiData:
        return IoiData(*(t.to(device) for t in (self.base_NT, self.source_NT, self.io_N,
                                                 self.s_N, self.source_answer_N,
                                                 self.template_N)),
                       self.base_text, self.source_text, self.source)


def tokenizer_encoder(tokenizer) -> Callable[[str], list[int]]:
    """Text → token ids with a Hugging Face tokenizer, without special tokens."""
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False))


def single_token_names(encode: Callable[[str], list[int]], names: Sequence[str]) -> list[str]:
    """The names that are one token with a leading space (for filtering a candidate list)."""
    return [n for n in names if len(encode(" " + n)) == 1]


def _fill(template: str, io: str, s: str, source: str) -> tuple[str, str]:
    base = template.format(A=io, B=s, S=s)
    src = (template.format(A=s, B=io, S=s) if source == "order"
           else template.format(A=io, B=s, S=io))
    return base, src


def build_ioi(encode: Callable[[str], list[int]], n: int, spec: IoiSpec | None = None,
              source: str = "order", bos: int | None = None, seed: int = 0) -> IoiData:
    """``n`` distinct (template, IO, S) pairs drawn with ``seed``, tokenised by ``encode``
    (text → ids), each prefixed with ``bos`` when given. Refuses names that are not one token
    with a leading space, and templates that do not all tokenise to one length."""
    spec = spec if spec is not None else load_spec()
    check_choice("source", source, SOURCES)
    name_id = {}
    for name in spec.names:
        ids = encode(" " + name)
        require(len(ids) == 1, f"name {name!r}: ' {name}' is {len(ids)} tokens {ids}; "
                "expected one token (drop it, e.g. with single_token_names)")
        name_id[name] = int(ids[0])
    require(len(set(name_id.values())) == len(name_id), "names: two names share a token id; "
            "expected distinct tokens")
    n_names, n_t = len(spec.names), len(spec.templates)
    total = n_t * n_names * (n_names - 1)
    require(isinstance(n, int) and 0 < n <= total, f"n={n!r}: expected an integer 1..{total} "
            f"(templates × ordered name pairs)")
    prefix = [] if bos is None else [int(bos)]
    rows, lengths = [], {}
    for k in random.Random(seed).sample(range(total), n):
        t, rest = divmod(k, n_names * (n_names - 1))
        i, j = divmod(rest, n_names - 1)
        j += j >= i  # the subject is any name but the IO
        io, s = spec.names[i], spec.names[j]
        base, src = _fill(spec.templates[t], io, s, source)
        b_ids, s_ids = prefix + encode(base), prefix + encode(src)
        require(name_id[io] in b_ids and name_id[s] in b_ids,
                f"template {spec.templates[t]!r}: the names {io!r}, {s!r} do not appear as "
                "their single tokens in the tokenised prompt; expected each name after a space")
        lengths.setdefault(t, set()).update((len(b_ids), len(s_ids)))
        answer = io if source == "order" else s
        rows.append((b_ids, s_ids, name_id[io], name_id[s], name_id[answer], t, base, src))
    found = sorted({x for v in lengths.values() for x in v})
    if len(found) > 1:
        detail = "; ".join(f"template {t}: {sorted(v)}" for t, v in sorted(lengths.items()))
        raise CltEvalError(f"templates: prompts tokenise to lengths {found}; expected one "
                           f"length for all (so they batch without padding): {detail}")
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    cols = list(zip(*rows, strict=True))
    return IoiData(long(cols[0]), long(cols[1]), long(cols[2]), long(cols[3]), long(cols[4]),
                   long(cols[5]), tuple(cols[6]), tuple(cols[7]), source)


def build_ioi_for_model(model, n: int, spec: IoiSpec | None = None, source: str = "order",
                        seed: int = 0, prepend_bos: bool = True) -> IoiData:
    """``build_ioi`` with the model's tokenizer (and its BOS token first, if it has one), on
    the model's device."""
    tok = getattr(model, "tokenizer", None)
    require(tok is not None, "model: has no tokenizer; expected a HookedTransformer with one "
            "(or call build_ioi with an encoder)")
    bos = getattr(tok, "bos_token_id", None) if prepend_bos else None
    return build_ioi(tokenizer_encoder(tok), n, spec, source, bos, seed).to(model.cfg.device)


# ---- metrics -----------------------------------------------------------------------------
def name_logits(logits: torch.Tensor, data: IoiData) -> torch.Tensor:
    """[N, 2]: the logits of (IO, S) at the last position; ``logits`` is [N, T, V] (any T,
    e.g. 1 from ``LastTokenRunner``) or [N, V]."""
    last = logits[:, -1] if logits.dim() == 3 else logits
    ids = torch.stack([data.io_N, data.s_N], 1).to(last.device)
    return last.gather(-1, ids)


def ioi_logit_diff(two_N2: torch.Tensor) -> torch.Tensor:
    """LD = logit(IO) − logit(S) per pair, from ``name_logits``."""
    return two_N2[:, 0] - two_N2[:, 1]


def score(two_patched_N2: torch.Tensor, ld_clean_N: torch.Tensor) -> dict[str, float]:
    """FLDD and interchange accuracy of patched (IO, S) logits against the clean LDs."""
    ld = ioi_logit_diff(two_patched_N2)
    cf = torch.ones(len(ld), dtype=torch.long, device=ld.device)  # column 1: S
    return {"fldd": fldd(ld, ld_clean_N.to(ld.device)),
            "interchange_accuracy": interchange_accuracy(two_patched_N2, cf)}


# ---- running the model on the last token -------------------------------------------------
def mlp_hook(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def resid_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def mlp_W_out(model, layer: int) -> torch.Tensor:
    """[d_mlp, d_model]: the weights through which ``mlp_hook(layer)`` reaches the stream."""
    return model.blocks[layer].mlp.W_out.detach()


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))


class LastTokenRunner:
    """A ``HookedTransformer`` run on the last token of fixed prompts, from a cached prefix.

    Every patch here is at the last position, which no earlier position of a causal model
    sees. So the earlier positions' keys and values (every layer) and the last token's
    residual stream entering block ``start_layer`` are computed once, without gradients; each
    run then recomputes only the last token from block ``start_layer`` on: about T times
    fewer token-layers per DAS step than a full pass, with the same logits (up to float
    rounding) as long as hooks at or after ``start_layer`` touch only the last position.

    Its inputs are row ids into ``tokens_RT`` (a [R] long tensor); its outputs are logits
    [R, 1, V]. It has ``hook_dict``, ``hooks``, ``run_with_hooks`` and ``run_with_cache``,
    so ``clt_eval.patching`` (``run_patched``, ``train_das``, ``cache_hook``) drives it like
    the model itself, with ``pos=-1``.
    """

    def __init__(self, model, tokens_RT: torch.Tensor, start_layer: int = 0, chunk: int = 32):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        n_layers = model.cfg.n_layers
        require(isinstance(start_layer, int) and 0 <= start_layer < n_layers,
                f"start_layer={start_layer!r}: expected an integer 0..{n_layers - 1}")
        require(tokens_RT.dim() == 2 and tokens_RT.shape[1] >= 2, f"tokens: shape "
                f"{tuple(tokens_RT.shape)}; expected [R, T] prompts of T >= 2 tokens")
        self.model, self.start_layer, self.cfg = model, start_layer, model.cfg
        device = model.cfg.device
        tokens = tokens_RT.to(device)
        keys, values, resid = [], [], []
        with torch.no_grad():
            for rows in _chunks(len(tokens), chunk):
                part = tokens[rows.to(device)]
                ones = torch.ones_like(part)  # no padding: every position is attended
                cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(part))
                model(part[:, :-1], past_kv_cache=cache, attention_mask=ones[:, :-1],
                      return_type=None)
                cache.freeze()
                resid.append(model(part[:, -1:], past_kv_cache=cache,
                                   attention_mask=ones[:, -1:], stop_at_layer=start_layer))
                keys.append([cache[i].past_keys for i in range(start_layer, n_layers)])
                values.append([cache[i].past_values for i in range(start_layer, n_layers)])
        self.resid_R1D = torch.cat(resid)
        self.keys = [torch.cat(k) for k in zip(*keys, strict=True)]
        self.values = [torch.cat(v) for v in zip(*values, strict=True)]
        self.n_rows = len(tokens)

    @property
    def hook_dict(self):
        return self.model.hook_dict

    def hooks(self, *args, **kwargs):
        return self.model.hooks(*args, **kwargs)

    def _cache(self, rows: torch.Tensor):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import (
            TransformerLensKeyValueCacheEntry as Entry,
        )

        empty = self.keys[0][:0]  # blocks before start_layer are never run
        entries = [Entry(empty, empty, frozen=True)] * self.start_layer + [
            Entry(k[rows], v[rows], frozen=True) for k, v in zip(self.keys, self.values,
                                                                 strict=True)]
        mask = torch.ones(len(rows), self.keys[0].shape[1], dtype=torch.int,
                          device=self.resid_R1D.device)
        return TransformerLensKeyValueCache(entries, mask, frozen=True)

    def _rows(self, rows) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long).to(self.resid_R1D.device)
        require(rows.dim() == 1 and bool(((rows >= 0) & (rows < self.n_rows)).all()),
                f"rows: expected a 1-d tensor of row ids 0..{self.n_rows - 1}")
        return rows

    def _kwargs(self, rows) -> dict:
        rows = self._rows(rows)
        return {"start_at_layer": self.start_layer, "past_kv_cache": self._cache(rows)}

    def __call__(self, rows) -> torch.Tensor:
        kw = self._kwargs(rows)
        return self.model(self.resid_R1D[self._rows(rows)], **kw)

    def run_with_hooks(self, rows, fwd_hooks=(), **kwargs):
        kw = self._kwargs(rows)
        return self.model.run_with_hooks(self.resid_R1D[self._rows(rows)],
                                         fwd_hooks=list(fwd_hooks), **kw, **kwargs)

    def run_with_cache(self, rows, **kwargs):
        kw = self._kwargs(rows)
        return self.model.run_with_cache(self.resid_R1D[self._rows(rows)], **kw, **kwargs)


def ioi_runner(model, data: IoiData, start_layer: int, chunk: int = 32) -> LastTokenRunner:
    """A ``LastTokenRunner`` over the base prompts (rows ``data.base_ids``) followed by the
    source prompts (rows ``data.source_ids``)."""
    return LastTokenRunner(model, torch.cat([data.base_NT, data.source_NT]), start_layer,
                           chunk)


@torch.no_grad()
def clean_name_logits(runner: LastTokenRunner, data: IoiData, tokens: str = "base",
                      chunk: int = 64) -> torch.Tensor:
    """[N, 2] (IO, S) logits of the unpatched model on the base (or source) prompts."""
    check_choice("tokens", tokens, ("base", "source"))
    ids = data.base_ids if tokens == "base" else data.source_ids
    return torch.cat([name_logits(runner(ids[r]), data.take(r))
                      for r in _chunks(len(data), chunk)])


def source_activations(runner: LastTokenRunner, data: IoiData, hook: str,
                       chunk: int = 64) -> torch.Tensor:
    """[N, 1, D]: ``hook`` at the last position of the source prompts."""
    return torch.cat([cache_hook(runner, data.source_ids[r], hook)
                      for r in _chunks(len(data), chunk)])


def patched_name_logits(runner: LastTokenRunner, data: IoiData, hook: str,
                        V: torch.Tensor | None = None, source_acts: torch.Tensor | None = None,
                        chunk: int = 64) -> torch.Tensor:
    """[N, 2] (IO, S) logits on the base prompts with ``hook`` patched at the last position
    from the source prompts: along ``V`` ([D] or [D, K]), or wholly when ``V`` is None."""
    src = source_activations(runner, data, hook, chunk) if source_acts is None else source_acts
    out = []
    for r in _chunks(len(data), chunk):
        logits = run_patched(runner, data.base_ids[r], data.source_ids[r], hook, V, pos=-1,
                             source_acts=src[r.to(src.device)])
        out.append(name_logits(logits, data.take(r)))
    return torch.cat(out)


def train_ioi_das(runner: LastTokenRunner, data: IoiData, hook: str, steps: int = 150,
                  batch_size: int | None = 32, lr: float = 0.01, seed: int = 0) -> DasResult:
    """A 1-d DAS direction at ``hook`` (last position), trained by ``train_das`` with the
    paper's loss: cross-entropy toward the counterfactual answer (the base's S)."""
    bs = None if batch_size is None or batch_size >= len(data) else batch_size
    return train_das(runner, hook, data.base_ids, data.source_ids,
                     cross_entropy_loss(data.s_N, pos=-1), k=1, steps=steps, lr=lr,
                     seed=seed, pos=-1, batch_size=bs)


def split_mlp_direction(model, layer: int, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_row, v_ker), v = v_row + v_ker: the part of an MLP-hidden direction that W_out can
    write to the residual stream, and the part it maps to zero."""
    W = mlp_W_out(model, layer)
    return split_direction(v.to(W.device, W.dtype), W)


# ---- the table ---------------------------------------------------------------------------
@dataclass
class IoiTable:
    rows: list[dict]  # {component, hook, fldd, interchange_accuracy, n}
    layer: int
    source: str
    n_train: int
    n_test: int
    clean_accuracy: float  # base prompts (test split): logit(IO) > logit(S)
    clean_logit_diff: float  # mean LD on them
    source_accuracy: float  # source prompts: the source's own answer wins
    figures: dict[str, float] = field(default_factory=dict)  # norms, variation, DAS losses

    def row(self, component: str) -> dict:
        return next(r for r in self.rows if r["component"] == component)

    def markdown(self) -> str:
        lines = ["| component | hook | FLDD | interchange accuracy | n |",
                 "| --- | --- | ---: | ---: | ---: |"]
        for r in self.rows:
            lines.append(f"| {r['component']} | `{r['hook']}` | {100 * r['fldd']:.1f}% | "
                         f"{100 * r['interchange_accuracy']:.1f}% | {r['n']} |")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("layer", "source", "n_train", "n_test",
                                               "clean_accuracy", "clean_logit_diff",
                                               "source_accuracy", "rows", "figures")}


def _variation(runner: LastTokenRunner, data: IoiData, hook: str, src: torch.Tensor,
               directions: dict[str, torch.Tensor]) -> dict[str, float]:
    """How much source and base differ along each unit direction at the last position
    (mean |⟨u − w, e⟩|), and the spread of the base's projection (std ⟨w, e⟩): a part that
    barely differs between base and source carries no feature on real inputs."""
    base = torch.cat([cache_hook(runner, data.base_ids[r], hook)
                      for r in _chunks(len(data), 64)])[:, -1].double()
    diff = src[:, -1].double() - base
    out = {}
    for name, e in directions.items():
        if float(e.norm()) <= MIN_PART_NORM:
            out[f"mean_abs_diff_{name}"], out[f"std_base_{name}"] = 0.0, 0.0
            continue
        e = (e / e.norm()).double().to(base.device)
        out[f"mean_abs_diff_{name}"] = float((diff @ e).abs().mean())
        out[f"std_base_{name}"] = float((base @ e).std()) if len(base) > 1 else 0.0
    return out


def ioi_table(model, train: IoiData, test: IoiData, layer: int, steps: int = 150,
              batch_size: int | None = 32, lr: float = 0.01, seed: int = 0, chunk: int = 32,
              log: Callable[[str], None] | None = None) -> IoiTable:
    """The paper's five patches at ``layer`` (pick it with ``whole_patch_scan``: 20 for
    SmolLM2-135M), at the last token, DAS trained on ``train`` and every row evaluated on
    ``test``: the whole MLP's hidden activations, a DAS direction among them, its W_out
    row-space part alone, its kernel part alone, and a DAS direction in the residual stream
    after that MLP. Also reports the whole residual-stream patch (``figures``)."""
    n_layers = model.cfg.n_layers
    require(isinstance(layer, int) and 0 <= layer < n_layers,
            f"layer={layer!r}: expected an integer 0..{n_layers - 1}")
    require(train.base_NT.shape[1] == test.base_NT.shape[1] and train.source == test.source,
            "train, test: expected splits of one dataset (same prompt length and source kind)")
    say = log or (lambda _msg: None)
    mlp, resid = mlp_hook(layer), resid_hook(layer)
    run_train = ioi_runner(model, train, layer, chunk)
    run_test = ioi_runner(model, test, layer, chunk)
    say(f"prefix cached: {len(train)} train and {len(test)} test pairs, from block {layer}")

    ld_clean = ioi_logit_diff(clean_name_logits(run_test, test))
    src_two = clean_name_logits(run_test, test, tokens="source")
    src_io = test.source_answer_N.to(src_two.device) == test.io_N.to(src_two.device)
    src_ld = torch.where(src_io, 1.0, -1.0) * ioi_logit_diff(src_two)
    say(f"clean: accuracy {float((ld_clean > 0).double().mean()):.3f}, mean LD "
        f"{float(ld_clean.mean()):.3f} on {len(test)} test pairs")

    rows: list[dict] = []
    figures: dict[str, float] = {}

    def add(component: str, hook: str, two: torch.Tensor) -> None:
        rows.append({"component": component, "hook": hook, **score(two, ld_clean),
                     "n": len(test)})
        say(f"{component}: FLDD {100 * rows[-1]['fldd']:.1f}%, interchange accuracy "
            f"{100 * rows[-1]['interchange_accuracy']:.1f}%")

    src_mlp = source_activations(run_test, test, mlp)
    add("mlp_whole", mlp, patched_name_logits(run_test, test, mlp, None, src_mlp))

    das = train_ioi_das(run_train, train, mlp, steps, batch_size, lr, seed)
    v = das.V_DK[:, 0]
    figures |= {"das_mlp_loss_first": das.losses[0], "das_mlp_loss_last": das.final_loss}
    add("mlp_das", mlp, patched_name_logits(run_test, test, mlp, v, src_mlp))
    v_row, v_ker = split_mlp_direction(model, layer, v)
    figures |= {"norm_row": float(v_row.norm()), "norm_kernel": float(v_ker.norm())}
    for component, part in (("mlp_das_rowspace", v_row), ("mlp_das_kernel", v_ker)):
        if float(part.norm()) > MIN_PART_NORM:
            add(component, mlp, patched_name_logits(run_test, test, mlp, part, src_mlp))
        else:  # nothing to patch: the part is absent, so is its effect
            add(component, mlp, clean_name_logits(run_test, test))
    figures |= _variation(run_test, test, mlp, src_mlp, {"v": v, "row": v_row, "kernel": v_ker})

    das_r = train_ioi_das(run_train, train, resid, steps, batch_size, lr, seed)
    figures |= {"das_resid_loss_first": das_r.losses[0], "das_resid_loss_last": das_r.final_loss}
    add("resid_das", resid, patched_name_logits(run_test, test, resid, das_r.V_DK[:, 0]))
    add_whole = patched_name_logits(run_test, test, resid)  # the ceiling at this position
    figures |= {f"resid_whole_{k}": x for k, x in score(add_whole, ld_clean).items()}
    return IoiTable(rows, layer, test.source, len(train), len(test),
                    float((ld_clean > 0).double().mean()), float(ld_clean.mean()),
                    float((src_ld > 0).double().mean()), figures)


def whole_patch_scan(model, data: IoiData, layers: Sequence[int],
                     chunk: int = 32) -> list[dict]:
    """FLDD and interchange accuracy of patching the whole residual stream
    (``hook_resid_post``) and the whole MLP hidden activations at the last position, layer by
    layer: where the residual stream at the last token starts to carry the feature is where
    the paper's comparison is informative (before it, every patch there does nothing)."""
    layers = sorted(set(layers))
    require(len(layers) > 0 and all(isinstance(x, int) and 0 <= x < model.cfg.n_layers
                                    for x in layers),
            f"layers={layers!r}: expected layer numbers 0..{model.cfg.n_layers - 1}")
    runner = ioi_runner(model, data, layers[0], chunk)
    ld_clean = ioi_logit_diff(clean_name_logits(runner, data))
    out = []
    for layer in layers:
        row = {"layer": layer}
        for name, hook in (("resid_whole", resid_hook(layer)), ("mlp_whole", mlp_hook(layer))):
            got = score(patched_name_logits(runner, data, hook), ld_clean)
            row |= {f"{name}_{k}": x for k, x in got.items()}
        out.append(row)
    return out
