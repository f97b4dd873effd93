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
activations as an *activation store*: safetensors shards (x [N,L,D], y [N,L,D]) plus
``manifest.json`` (model, layers, hooks, corpus, n_tokens, dtype, and every shard's windows,
size and sha256); later uses (and later runs, and ``ActivationStore`` without the model)
read the shards instead. The store is collected in a hidden sibling folder
(``.<name>.partial``), one shard at a time: each shard is written to a temporary file and
renamed, then the list of finished shards (``progress.json``) is rewritten atomically, so a
collection killed at any moment resumes after its last finished shard; only when every shard
is there does the folder get its manifest and its real name, so nothing incomplete ever looks
like a store. A manifest (or a partial collection) that does not match the request (other
model, layers, hooks, tokens, ...) is a one-line error naming the file and the field, never
silently reused or overwritten.

Reading goes through a shuffle buffer: shards are visited in a seeded random order, and
``shuffle_buffer`` samples at a time are mixed and cut into batches, so memory holds one
buffer, never the whole store. ``batches(seed, rank, world)`` yields rank ``rank``'s rows of
each global batch: every rank draws the same global batches (a pure function of the seed)
and keeps its own disjoint slice of them, the layout data-parallel training needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from clt_eval.atomic import write_json_atomic
from clt_eval.errors import CltEvalError, require
from clt_eval.lm.window import LayerWindow

FORMAT = "clt-eval-activations"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # a partial collection's finished shards
# Fields that must agree between a store and a request for the store to be reused.
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


def rank_layout(rank: int | None, world: int | None) -> tuple[int, int]:
    """(rank, world): as given, else torch.distributed's when initialised, else (0, 1)."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    rank = (dist.get_rank() if on else 0) if rank is None else rank
    world = (dist.get_world_size() if on else 1) if world is None else world
    require(isinstance(world, int) and world >= 1 and 0 <= rank < world,
            f"rank={rank}, world={world}: expected 0 <= rank < world")
    return rank, world


class Batcher:
    """Batches from blocks of samples (``chunks``): one ordered pass, everything at once, or
    endless shuffled batches through a buffer of ``shuffle_buffer`` samples."""

    batch_size: int
    shuffle_buffer: int

    @property
    def n_tokens(self) -> int:
        raise NotImplementedError

    def chunks(self, shuffle: bool = False, seed: int = 0):
        raise NotImplementedError

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

    def batches(self, seed: int = 0, rank: int | None = None,
                world: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled batches of ``batch_size`` samples, cycling over the data: each
        pass fills a buffer of ``shuffle_buffer`` samples and yields it in random order; the
        few samples left over at the end of a pass are dropped (a different few each pass),
        unless the whole data set is smaller than one batch.

        With ``world`` ranks (default: torch.distributed's layout, else 1), every rank draws
        the same global batches and yields rows ``[rank·B/world, (rank+1)·B/world)`` of
        each: disjoint across ranks, covering the global batch."""
        rank, world = rank_layout(rank, world)
        require(self.batch_size % world == 0,
                f"batch_size={self.batch_size}: not divisible by the world size {world} "
                f"(ranks); expected a multiple of {world}")
        per = self.batch_size // world
        rows = slice(rank * per, (rank + 1) * per)
        for x, y in self._global_batches(seed):
            if world == 1 or len(x) < self.batch_size:  # a data set under one batch: all
                yield x, y
            else:
                yield x[rows], y[rows]

    def _global_batches(self, seed: int):
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


class ActivationStore(Batcher):
    """A finished activation store read without the model: the trainer's batches from disk.

    ``expect``: identity fields the store must have (e.g. model, layers, input_hooks); a
    difference is a one-line error naming the manifest and the field."""

    def __init__(self, folder: str | Path, batch_size: int = 1024, shuffle_buffer: int = 16384,
                 expect: dict | None = None):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        require(path.is_file(), f"{path}: no such file; expected a finished activation store "
                "(a collection that was interrupted resumes when run again)")
        self.manifest = read_manifest(path)
        check_identity(self.manifest, expect or {}, path)
        require(isinstance(batch_size, int) and batch_size > 0,
                f"batch_size={batch_size!r}: expected an integer > 0")
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_layers(self) -> int:
        return len(self.manifest["layers"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def chunks(self, shuffle: bool = False, seed: int = 0):
        yield from read_shards(self.folder, self.manifest, shuffle, seed)

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads the whole store)."""
        for shard in self.manifest["shards"]:
            path = self.folder / shard["file"]
            require(path.is_file() and file_sha256(path) == shard["sha256"],
                    f"{path}: sha256 differs from {self.folder / MANIFEST}; the shard is "
                    "damaged: collect the store again")


class ActivationSource(Batcher):
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

    def _model_chunks(self, start: int = 0):
        """(first window, end window, x, y) per forward pass, from window ``start`` on."""
        for i in range(start, len(self.tokens_NC), self.model_batch):
            end = min(i + self.model_batch, len(self.tokens_NC))
            yield (i, end, *self.run_model(self.tokens_NC[i:end]))

    def chunks(self, shuffle: bool = False, seed: int = 0):
        """Blocks of (x_NLD, y_NLD) in corpus order: from the cache if there is one, else
        from the model. ``shuffle`` visits cache shards in a random order."""
        if self.cache_dir is None:
            for _, _, x, y in self._model_chunks():
                yield x, y
            return
        yield from read_shards(self.cache_dir, self.ensure_cache(), shuffle, seed,
                               [self.n_layers, self.d_model])

    # ---- the on-disk store ------------------------------------------------------------
    def manifest_identity(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.meta.get("model"),
                "layers": list(self.window.layers), "input_hooks": list(self.window.input_hooks()),
                "output_hooks": list(self.window.output_hooks()),
                "corpus": self.meta.get("corpus"), "n_ctx": int(self.tokens_NC.shape[1]),
                "n_windows": int(self.tokens_NC.shape[0]),
                "tokens_sha1": tokens_digest(self.tokens_NC), "drop_first": self.drop_first,
                "dtype": str(self.dtype).removeprefix("torch."), "d_model": self.d_model}

    @property
    def partial_dir(self) -> Path:
        """Where an unfinished collection lives: hidden, beside the store's folder."""
        return self.cache_dir.parent / f".{self.cache_dir.name}.partial"

    def ensure_cache(self) -> dict:
        """The manifest of a store matching this source, collecting (or finishing) it if
        needed."""
        want = self.manifest_identity()
        path = self.cache_dir / MANIFEST
        if self.cache_dir.exists():
            require(path.is_file(), f"{self.cache_dir}: exists but holds no {MANIFEST}; "
                    "expected an activation cache folder or a new path")
            have = read_manifest(path)
            check_identity(have, want, path)
            return have
        return self._build_cache(want)

    def _build_cache(self, identity: dict) -> dict:
        from safetensors.torch import save_file

        tmp = self.partial_dir
        if (tmp / MANIFEST).is_file() and not (tmp / PROGRESS).exists():
            # Killed between the last write and the rename: the store is complete.
            manifest = read_manifest(tmp / MANIFEST)
            check_identity(manifest, identity, tmp / MANIFEST)
            os.replace(tmp, self.cache_dir)
            return manifest
        shards = self._resume(tmp, identity)
        start = shards[-1]["windows"][1] if shards else 0
        pend: list[tuple] = []
        for chunk in self._with_bar(self._model_chunks(start), start):
            pend.append(chunk)
            if sum(len(c[2]) for c in pend) >= self.shard_tokens:
                shards.append(_write_shard(tmp, len(shards), pend, save_file))
                write_json_atomic(tmp / PROGRESS, identity | {"shards": shards})
                pend = []
        if pend:
            shards.append(_write_shard(tmp, len(shards), pend, save_file))
        manifest = identity | {"n_tokens": sum(s["n"] for s in shards), "shards": shards,
                               "meta": self.meta}
        write_json_atomic(tmp / MANIFEST, manifest)
        (tmp / PROGRESS).unlink(missing_ok=True)
        os.replace(tmp, self.cache_dir)
        return manifest

    def _resume(self, tmp: Path, identity: dict) -> list[dict]:
        """The finished shards of an earlier, interrupted collection into ``tmp`` (creating
        it if absent); a collection of something else is an error, and is left alone."""
        progress = tmp / PROGRESS
        if not progress.is_file():
            if tmp.exists():  # killed before its first shard: nothing worth keeping
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            return []
        have = read_manifest(progress)
        check_identity(have, identity, progress)
        shards = have["shards"]
        # Shard files past the last recorded one were being written when the run died.
        keep = {s["file"] for s in shards}
        for f in tmp.iterdir():
            if f.name != PROGRESS and f.name not in keep:
                f.unlink()
        for s in shards:
            _check_size(tmp / s["file"], s)
        return shards

    def _with_bar(self, chunks, start: int = 0):
        if not self.progress:
            return chunks
        from tqdm.auto import tqdm

        total = -(-len(self.tokens_NC) // self.model_batch)
        return tqdm(chunks, total=total, initial=-(-start // self.model_batch),
                    desc="collecting activations", unit="batch")

    def _read_shard(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _load_shard(self.cache_dir / name, [self.n_layers, self.d_model])


def read_shards(folder: Path, manifest: dict, shuffle: bool, seed: int,
                shape: list[int] | None = None):
    """(x, y) of each shard of a store, in order or in a seeded random order."""
    shape = shape or [len(manifest["layers"]), int(manifest["d_model"])]
    order = list(range(len(manifest["shards"])))
    if shuffle:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(order), generator=g).tolist()
    for i in order:
        shard = manifest["shards"][i]
        path = folder / shard["file"]
        _check_size(path, shard)
        yield _load_shard(path, shape)


def _load_shard(path: Path, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a bad file
        raise CltEvalError(f"{path}: not a readable activation shard ({exc})") from None
    for k in ("x", "y"):
        require(k in t and list(t[k].shape[1:]) == shape,
                f"{path}: expected tensors x and y of shape [N, {shape[0]}, {shape[1]}]")
    return t["x"], t["y"]


def _check_size(path: Path, shard: dict) -> None:
    """A cheap guard on every read: the shard's size in bytes is the manifest's."""
    size = path.stat().st_size if path.is_file() else None
    want = shard.get("bytes", size)  # stores from before sizes were recorded
    require(size == want, f"{path}: {'missing' if size is None else f'{size} bytes'}, the "
            f"manifest says {want} bytes; the store is damaged: collect it again")


def _write_shard(folder: Path, index: int, chunks: list[tuple], save_file) -> dict:
    """Write one shard atomically (a temporary file, then a rename) and describe it."""
    name = f"shard_{index:05d}.safetensors"
    x = torch.cat([c[2] for c in chunks]).contiguous()
    y = torch.cat([c[3] for c in chunks]).contiguous()
    tmp = folder / f".{name}.tmp"
    save_file({"x": x, "y": y}, str(tmp))
    os.replace(tmp, folder / name)
    path = folder / name
    return {"file": name, "n": len(x), "windows": [chunks[0][0], chunks[-1][1]],
            "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_identity(have: dict, want: dict, path: Path) -> None:
    """One line naming ``path`` and the first field on which ``have`` differs from ``want``."""
    for key in IDENTITY:
        if key in want:
            require(have.get(key) == want[key],
                    f"{path}: cache was built with {key}={_short(have.get(key))}, this run "
                    f"asks for {key}={_short(want[key])}; use another cache folder")


def read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CltEvalError(f"{path}: not valid JSON ({exc})") from None
    require(isinstance(data, dict) and isinstance(data.get("shards"), list),
            f"{path}: expected an activation manifest with a 'shards' list")
    return data


_read_manifest = read_manifest  # the name it had before stores could be read alone


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."
