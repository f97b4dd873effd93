"""Stream (MLP input, MLP output) pairs from a TransformerLens model, for training transcoders.

``ActivationSource`` runs the model on windows of token ids with forward hooks on exactly the
hook points a ``LayerWindow`` names, stops the forward pass after the window's last layer
(later layers and the unembedding are never computed), and flattens batch × position into
samples: x_NLD, y_NLD with L = the window's layers. ``batches()`` is the endless, shuffled
iterator the trainer eats; ``passes()`` is one ordered pass, for evaluation.

The first position of every window is dropped by default. It holds BOS (or whatever token
starts the window) and serves as the attention sink: its residual stream and MLP outputs are
outliers, often 10-100x the norm of other positions, and a squared-error loss would spend
most of its capacity on them. Anthropic's and SAELens's transcoder pipelines drop it too.

With ``cache_dir``, the first use runs the model once over all windows and writes the
activations as safetensors shards (x [N,L,D], y [N,L,D]) plus ``manifest.json``; later uses
(and later runs) read the shards instead. The cache is built in a sibling temporary folder and
renamed into place, so an interrupted build leaves nothing that looks complete; a manifest
that does not match the request (other model, layers, hooks, tokens, ...) is an error, never
silently reused or overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from clt_eval.errors import CltEvalError, require
from clt_eval.lm.window import LayerWindow

FORMAT = "clt-eval-activations"
VERSION = 1
MANIFEST = "manifest.json"
# Fields that must agree between a cache and a request for the cache to be reused.
IDENTITY = ("format", "version", "model", "layers", "input_hooks", "output_hooks", "corpus",
            "n_ctx", "n_windows", "tokens_sha1", "drop_first", "dtype", "d_model")


def check_window(model, window: LayerWindow) -> None:
    """One-line errors for layers the model does not have and hook names it does not know."""
    n = model.cfg.n_layers
    bad = [x for x in window.layers if x >= n]
    if bad:
        raise CltEvalError(f"layers={list(window.layers)}: model {model.cfg.model_name!r} has "
                           f"{n} layers (0..{n - 1}); layer {bad[0]} does not exist")
    known = model.hook_dict
    for name in window.input_hooks() + window.output_hooks():
        if name not in known:
            # The hook points a transcoder can read or write first, as the likeliest intent.
            layer0 = sorted((h for h in known if h.startswith("blocks.0.")),
                            key=lambda h: (not any(k in h for k in ("ln2", "mlp", "resid")), h))
            raise CltEvalError(f"hook {name!r} does not exist in model {model.cfg.model_name!r}; "
                               f"hooks of layer 0 include {', '.join(layer0[:6])}, ...")
    # Some hook points exist but only fire when a config flag is set (hook_mlp_in needs
    # use_hook_mlp_in): a two-token forward pass, stopped after the window, finds them.
    fired: set[str] = set()
    names = window.input_hooks() + window.output_hooks()
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, lambda a, hook: fired.add(hook.name))
                                                 for n in names]):
        model(torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device),
              stop_at_layer=max(window.layers) + 1)
    silent = [n for n in names if n not in fired]
    if silent:
        raise CltEvalError(f"hook {silent[0]!r} exists in model {model.cfg.model_name!r} but "
                           "never fires in a forward pass (a hook that needs a config flag?)")


def tokens_digest(tokens_NC: torch.Tensor) -> str:
    return hashlib.sha1(tokens_NC.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


class ActivationSource:
    """MLP inputs/outputs of ``model`` at ``window``'s layers on the windows ``tokens_NC``.

    ``batch_size``: samples (token positions) per yielded batch. ``model_batch``: windows per
    forward pass. ``shuffle_buffer``: samples mixed before batching (whole cache shards are
    also visited in a shuffled order). ``meta``: what the cache manifest records about where
    the tokens came from (``model``, ``corpus``).
    """

    def __init__(self, model, window: LayerWindow, tokens_NC: torch.Tensor, batch_size: int = 1024,
                 model_batch: int = 8, drop_first: bool = True, shuffle_buffer: int = 16384,
                 cache_dir: str | Path | None = None, meta: dict | None = None,
                 shard_tokens: int = 16384, dtype: torch.dtype = torch.float32,
                 progress: bool = False):
        check_window(model, window)
        require(tokens_NC.dim() == 2 and len(tokens_NC) > 0,
                f"tokens: expected a non-empty [N, n_ctx] tensor, got {list(tokens_NC.shape)}")
        require(tokens_NC.shape[1] > int(drop_first),
                f"n_ctx={tokens_NC.shape[1]}: too short to drop the first position")
        require(not tokens_NC.is_floating_point() and int(tokens_NC.min()) >= 0
                and int(tokens_NC.max()) < model.cfg.d_vocab,
                f"tokens: expected integer ids in [0, {model.cfg.d_vocab}) for this model")
        require(tokens_NC.shape[1] <= model.cfg.n_ctx,
                f"n_ctx={tokens_NC.shape[1]}: longer than the model's n_ctx={model.cfg.n_ctx}")
        for name, v in (("batch_size", batch_size), ("model_batch", model_batch),
                        ("shard_tokens", shard_tokens)):
            require(isinstance(v, int) and v > 0, f"{name}={v!r}: expected an integer > 0")
        self.model, self.window, self.tokens_NC = model, window, tokens_NC
        self.batch_size, self.model_batch, self.drop_first = batch_size, model_batch, drop_first
        self.shuffle_buffer, self.shard_tokens, self.dtype = shuffle_buffer, shard_tokens, dtype
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.meta = dict(meta or {})
        self.progress = progress  # a tqdm bar while the cache is built (minutes for SmolLM2)
        self.forward_passes = 0  # how many times the model ran (tests check the cache is used)

    # ---- sizes ------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.window.n_layers

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model

    @property
    def n_tokens(self) -> int:
        """Samples per pass: windows × kept positions."""
        return self.tokens_NC.shape[0] * (self.tokens_NC.shape[1] - int(self.drop_first))

    # ---- running the model ------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: its tensors cannot be saved for backward later
    def run_model(self, tokens_BP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_NLD, y_NLD for one batch of windows, N = B × kept positions."""
        store: dict[str, torch.Tensor] = {}

        def keep(act, hook):
            store[hook.name] = act

        names = self.window.input_hooks() + self.window.output_hooks()
        stop = max(self.window.layers) + 1  # blocks after the window never run
        with self.model.hooks(fwd_hooks=[(n, keep) for n in names]):
            self.model(tokens_BP.to(self.model.cfg.device), stop_at_layer=stop)
        self.forward_passes += 1
        first = int(self.drop_first)
        L = self.n_layers
        x = torch.stack([store[n][:, first:] for n in names[:L]], 2)
        y = torch.stack([store[n][:, first:] for n in names[L:]], 2)
        # On the CPU, where the trainer and the cache work (a no-op for a CPU model).
        return (x.reshape(-1, L, x.shape[-1]).to("cpu", self.dtype),
                y.reshape(-1, L, y.shape[-1]).to("cpu", self.dtype))

    def _model_chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.tokens_NC), self.model_batch):
            yield self.run_model(self.tokens_NC[i:i + self.model_batch])

    def chunks(self, shuffle: bool = False, seed: int = 0):
        """Blocks of (x_NLD, y_NLD) in corpus order: from the cache if there is one, else
        from the model. ``shuffle`` visits cache shards in a random order."""
        if self.cache_dir is None:
            yield from self._model_chunks()
            return
        manifest = self.ensure_cache()
        order = list(range(len(manifest["shards"])))
        if shuffle:
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(order), generator=g).tolist()
        for i in order:
            yield self._read_shard(manifest["shards"][i]["file"])

    # ---- iterators --------------------------------------------------------------------
    def passes(self, batch_size: int | None = None):
        """One ordered pass over every sample, in batches (the last may be smaller)."""
        size = batch_size or self.batch_size
        for x, y in self.chunks():
            for i in range(0, len(x), size):
                yield x[i:i + size], y[i:i + size]

    def collect(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample at once: x_NLD, y_NLD (for small evaluation sets)."""
        xs, ys = zip(*self.chunks(), strict=True)
        return torch.cat(xs), torch.cat(ys)

    def batches(self, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled batches of ``batch_size`` samples, cycling over the data: each
        pass fills a buffer of ``shuffle_buffer`` samples and yields it in random order; the
        few samples left over at the end of a pass are dropped (a different few each pass),
        unless the whole data set is smaller than one batch."""
        g = torch.Generator().manual_seed(seed)
        epoch = 0
        while True:
            buf_x: list[torch.Tensor] = []
            buf_y: list[torch.Tensor] = []
            held = 0
            for x, y in self.chunks(shuffle=True, seed=seed + epoch):
                buf_x.append(x)
                buf_y.append(y)
                held += len(x)
                if held >= max(self.shuffle_buffer, self.batch_size):
                    left = yield from self._drain(buf_x, buf_y, g)
                    buf_x, buf_y, held = [left[0]], [left[1]], len(left[0])
            left = yield from self._drain(buf_x, buf_y, g)
            if len(left[0]) == self.n_tokens:  # less than one batch in all
                yield left
            epoch += 1

    def _drain(self, buf_x, buf_y, g):
        """Yield the buffer's full batches in a random order; return the leftover samples."""
        x, y = torch.cat(buf_x), torch.cat(buf_y)
        perm = torch.randperm(len(x), generator=g)
        n_full = len(x) // self.batch_size * self.batch_size
        for i in range(0, n_full, self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield x[idx], y[idx]
        left = perm[n_full:]
        return x[left], y[left]

    # ---- the on-disk cache ------------------------------------------------------------
    def manifest_identity(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.meta.get("model"),
                "layers": list(self.window.layers), "input_hooks": list(self.window.input_hooks()),
                "output_hooks": list(self.window.output_hooks()),
                "corpus": self.meta.get("corpus"), "n_ctx": int(self.tokens_NC.shape[1]),
                "n_windows": int(self.tokens_NC.shape[0]),
                "tokens_sha1": tokens_digest(self.tokens_NC), "drop_first": self.drop_first,
                "dtype": str(self.dtype).removeprefix("torch."), "d_model": self.d_model}

    def ensure_cache(self) -> dict:
        """The manifest of a cache matching this source, building the cache if it is absent."""
        want = self.manifest_identity()
        path = self.cache_dir / MANIFEST
        if self.cache_dir.exists():
            require(path.is_file(), f"{self.cache_dir}: exists but holds no {MANIFEST}; "
                    "expected an activation cache folder or a new path")
            have = _read_manifest(path)
            for key in IDENTITY:
                require(have.get(key) == want[key],
                        f"{path}: cache was built with {key}={_short(have.get(key))}, this run "
                        f"asks for {key}={_short(want[key])}; use another cache folder")
            return have
        return self._build_cache(want)

    def _build_cache(self, identity: dict) -> dict:
        from safetensors.torch import save_file

        self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.cache_dir.name}.tmp-",
                                    dir=self.cache_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's private 0700 would outlive the rename
        try:
            shards, pend_x, pend_y, held = [], [], [], 0
            for x, y in self._with_bar(self._model_chunks()):
                pend_x.append(x)
                pend_y.append(y)
                held += len(x)
                if held >= self.shard_tokens:
                    shards.append(_write_shard(tmp, len(shards), pend_x, pend_y, save_file))
                    pend_x, pend_y, held = [], [], 0
            if pend_x:
                shards.append(_write_shard(tmp, len(shards), pend_x, pend_y, save_file))
            manifest = identity | {"n_tokens": sum(s["n"] for s in shards), "shards": shards,
                                   "meta": self.meta}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            os.replace(tmp, self.cache_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def _with_bar(self, chunks):
        if not self.progress:
            return chunks
        from tqdm.auto import tqdm

        total = -(-len(self.tokens_NC) // self.model_batch)
        return tqdm(chunks, total=total, desc="collecting activations", unit="batch")

    def _read_shard(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.cache_dir / name
        try:
            t = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a bad file
            raise CltEvalError(f"{path}: not a readable activation shard ({exc})") from None
        shape = [self.n_layers, self.d_model]
        for k in ("x", "y"):
            require(k in t and list(t[k].shape[1:]) == shape,
                    f"{path}: expected tensors x and y of shape [N, {shape[0]}, {shape[1]}]")
        return t["x"], t["y"]


def _write_shard(folder: Path, index: int, xs, ys, save_file) -> dict:
    name = f"shard_{index:05d}.safetensors"
    x, y = torch.cat(xs).contiguous(), torch.cat(ys).contiguous()
    save_file({"x": x, "y": y}, str(folder / name))
    return {"file": name, "n": len(x)}


def _read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CltEvalError(f"{path}: not valid JSON ({exc})") from None
    require(isinstance(data, dict) and isinstance(data.get("shards"), list),
            f"{path}: expected an activation manifest with a 'shards' list")
    return data


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."
