"""Published transcoders on the Hugging Face hub, read through the ordinary hub cache.

Two spellings, accepted wherever a transcoder path is (``clt_eval.formats.load_any``):

* ``hf://org/repo[/subfolder][@revision]``: a repository (or a folder of one) in any layout
  ``load_any`` reads: circuit-tracer's CLT (``W_enc_*``/``W_dec_*``) or transcoder set
  (``config.yaml`` with a ``transcoders`` list or ``layer_*`` files), a sae_lens folder
  (``cfg.json``), or clt-eval's own.
* ``sae_lens:RELEASE/ID``: an entry of sae_lens's registry of pretrained releases
  (``get_pretrained_saes_directory``), which maps it to a repository and path; releases stored
  as sae_lens folders or as circuit-tracer layer files are read, others are refused by name.

Only the files needed are fetched (``snapshot_download`` with ``allow_patterns``: the config
first, then the weights it names), into the normal cache (``HF_HUB_CACHE`` / ``HF_HOME``).
With ``HF_HUB_OFFLINE=1`` nothing is fetched: the files must be in the cache, and a missing one
is reported with the command that fetches it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from clt_eval.errors import CltEvalError, require
from clt_eval.formats import circuit_tracer as ct
from clt_eval.formats import native, sae_lens_io
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

HF_PREFIX, SAE_LENS_PREFIX = "hf://", "sae_lens:"
META_FILES = (ct.CONFIG_FILE, "config.json", sae_lens_io.CFG_FILE)
# sae_lens conversions whose files clt-eval reads itself (None: sae_lens's own folders).
READABLE_CONVERSIONS = (None, "mwhanna_transcoder")


def is_remote(path) -> bool:
    return isinstance(path, str) and path.startswith((HF_PREFIX, SAE_LENS_PREFIX))


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    subfolder: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{HF_PREFIX}{self.repo_id}{sub}" + (f"@{self.revision}" if self.revision else "")

    def path(self, name: str) -> str:
        """``name`` inside the subfolder, as a path in the repository."""
        return f"{self.subfolder}/{name}" if self.subfolder else name


def parse_hf(ref: str) -> HubRef:
    """``hf://org/repo[/subfolder][@revision]`` -> HubRef, or a one-line error."""
    require(ref.startswith(HF_PREFIX), f"{ref!r}: expected hf://org/repo[/subfolder][@revision]")
    body, at, revision = ref[len(HF_PREFIX):].partition("@")
    parts = [p for p in body.split("/") if p]
    require(len(parts) >= 2 and _parts_ok(parts) and (not at or revision),
            f"{ref!r}: expected hf://org/repo[/subfolder][@revision] (no '.' or '..' parts)")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]), revision or None)


def _parts_ok(parts: list[str]) -> bool:
    return all(p not in (".", "..") for p in parts)


# ---- the cache -----------------------------------------------------------------------------
def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, also when set after its import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> str | None:
    """The hub cache the environment names now (None: huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _fetch_hint(ref: HubRef, patterns: list[str]) -> str:
    rev = f" --revision {ref.revision}" if ref.revision else ""
    include = "".join(f" --include '{p}'" for p in patterns[:3])
    return f"hf download {ref.repo_id}{rev}{include}"


def snapshot(ref: HubRef, patterns: list[str]) -> Path:
    """The local snapshot folder holding (at least) the files matching ``patterns``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns,
                                      cache_dir=cache_dir(), local_files_only=offline()))
    except LocalEntryNotFoundError:
        raise CltEvalError(_not_cached(ref, patterns)) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise CltEvalError(f"{ref}: {type(exc).__name__} ({_first_line(exc)})") from None
    except (OSError, ValueError) as exc:  # network errors are OSErrors; bad ids ValueErrors
        raise CltEvalError(f"{ref}: could not fetch ({_first_line(exc)})") from None


def _not_cached(ref: HubRef, patterns: list[str]) -> str:
    where = cache_dir() or "the default Hugging Face cache"
    how = "offline (HF_HUB_OFFLINE=1)" if offline() else "could not be fetched"
    return (f"{ref}: not in the Hugging Face cache ({where}) and {how}; fetch it once online: "
            f"HF_HUB_OFFLINE=0 {_fetch_hint(ref, patterns)}")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def require_files(ref: HubRef, root: Path, names: list[str]) -> list[Path]:
    """The local paths of ``names`` (repository paths); a missing one is reported as not in
    the cache (offline) or not in the repository (online)."""
    paths = [root / n for n in names]
    missing = [n for n, p in zip(names, paths, strict=True) if not p.is_file()]
    if missing and offline():
        raise CltEvalError(_not_cached(ref, missing))
    if missing:
        raise CltEvalError(f"{ref}: {missing[0]!r} is not in the repository")
    return paths


# ---- hf:// ----------------------------------------------------------------------------------
def load_hf(ref_str: str, feature_input_hook: str | None = None,
            feature_output_hook: str | None = None) -> tuple[Transcoder, LayerWindow | None]:
    """Fetch (or find in the cache) what ``ref_str`` names and read it."""
    from clt_eval.formats import load_any

    ref = parse_hf(ref_str)
    root = snapshot(ref, [ref.path(m) for m in META_FILES])
    folder = root / ref.subfolder
    hooks = {"feature_input_hook": feature_input_hook, "feature_output_hook": feature_output_hook}
    if (folder / ct.CONFIG_FILE).is_file():
        return _load_circuit_tracer(ref, folder, hooks)
    if (folder / "config.json").is_file():
        snapshot(ref, [ref.path("weights.safetensors")])
        require_files(ref, root, [ref.path("weights.safetensors")])
        return native.load_native(folder)
    if (folder / sae_lens_io.CFG_FILE).is_file():
        weights = ref.path(sae_lens_io.WEIGHTS_FILE)
        require_files(ref, snapshot(ref, [weights]), [weights])
        return sae_lens_io.load_sae_lens(folder)
    # No config at the top: circuit-tracer files (with the hooks given), or one sae_lens
    # folder per layer.
    patterns = [ref.path(f"*/{sae_lens_io.CFG_FILE}"), ref.path(f"*/{sae_lens_io.WEIGHTS_FILE}")]
    if all(hooks.values()):
        patterns += [ref.path(p) for p in ("W_enc_*.safetensors", "W_dec_*.safetensors",
                                           "layer_*.safetensors")]
    folder = snapshot(ref, patterns) / ref.subfolder
    require(folder.is_dir() and any(folder.iterdir()), _not_cached(ref, patterns) if offline()
            else f"{ref}: no config.yaml, config.json or cfg.json; expected a transcoder "
            "repository (give both hooks for circuit-tracer files without config.yaml)")
    return load_any(folder, **hooks)


def _load_circuit_tracer(ref: HubRef, folder: Path, hooks: dict):
    config = ct.read_config(folder, (hooks["feature_input_hook"], hooks["feature_output_hook"]))
    if ct.MODEL_KINDS[config["model_kind"]] == "clt":
        names = [ref.path(p) for p in ("W_enc_*.safetensors", "W_dec_*.safetensors")]
        root = snapshot(ref, names)
        require_files(ref, root, [ref.path("W_enc_0.safetensors")])
        return ct.load_circuit_tracer(root / ref.subfolder, **hooks)
    files = set_files(ref, folder, config)
    return ct.load_circuit_tracer(folder, files=files, **hooks)


def set_files(ref: HubRef, folder: Path, config: dict) -> list[Path]:
    """A transcoder set's layer files, fetched: those config.yaml lists (hf:// URIs or paths
    inside the folder), else layer_0, layer_1, … ."""
    listed = config.get("transcoders")
    where = folder / ct.CONFIG_FILE
    if listed is None:
        root = snapshot(ref, [ref.path("layer_*.safetensors")])
        return ct._layer_files(root / ref.subfolder, "layer_")
    require(isinstance(listed, list) and listed and all(isinstance(p, str) for p in listed),
            f"{where}: field 'transcoders' must be a list of file paths, one per layer")
    bad = [p for p in listed if not p.split("?")[0].endswith(".safetensors")]
    if bad:
        raise CltEvalError(f"{where}: field 'transcoders' lists {bad[0]!r}; clt-eval reads "
                           ".safetensors transcoders only")
    by_repo: dict[HubRef, list[str]] = {}
    order = []
    for entry in listed:
        src, name = _entry(ref, entry, where)
        by_repo.setdefault(src, []).append(name)
        order.append((src, name))
    roots = {src: snapshot(src, names) for src, names in by_repo.items()}
    return [require_files(src, roots[src], [name])[0] for src, name in order]


def _entry(ref: HubRef, entry: str, where: Path) -> tuple[HubRef, str]:
    """(repository, path in it) of one ``transcoders`` entry."""
    if entry.startswith(HF_PREFIX):
        body, _, query = entry[len(HF_PREFIX):].partition("?")
        parts = body.split("/")
        m = re.search(r"(?:^|&)revision=([^&]+)", query)
        require(len(parts) >= 3 and _parts_ok(parts), f"{where}: field 'transcoders' lists "
                f"{entry!r}; expected hf://org/repo/path/to/file.safetensors")
        repo = "/".join(parts[:2])
        revision = m.group(1) if m else (ref.revision if repo == ref.repo_id else None)
        return HubRef(repo, "", revision), "/".join(parts[2:])
    require(not ct.leaves_folder(entry), f"{where}: field 'transcoders' lists {entry!r}, "
            "outside the repository folder; expected paths inside it")
    return ref, ref.path(os.path.normpath(entry))


# ---- sae_lens releases ------------------------------------------------------------------------
def registry_entry(spec: str) -> tuple[str, str, object]:
    """(release, id, sae_lens's lookup) for ``sae_lens:RELEASE/ID``, from sae_lens's registry."""
    body = spec[len(SAE_LENS_PREFIX):]
    release, _, sae_id = body.partition("/")
    require(release and sae_id, f"{spec!r}: expected sae_lens:RELEASE/ID")
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        raise CltEvalError(f"{spec}: sae_lens is not installed; its registry maps release "
                           "names to repositories (pip install sae-lens)") from None
    directory = get_pretrained_saes_directory()
    if release not in directory:
        import difflib

        close = difflib.get_close_matches(release, list(directory), n=3)
        raise CltEvalError(f"{spec}: release {release!r} is not in sae_lens's registry"
                           + (f"; close: {close}" if close else ""))
    info = directory[release]
    if sae_id not in info.saes_map:
        some = list(info.saes_map)[:3]
        raise CltEvalError(f"{spec}: id {sae_id!r} is not in release {release!r}; expected one "
                           f"of its {len(info.saes_map)} ids, e.g. {some}")
    return release, sae_id, info


def load_sae_lens_release(spec: str, feature_input_hook: str | None = None,
                          feature_output_hook: str | None = None):
    release, sae_id, info = registry_entry(spec)
    conversion = getattr(info, "conversion_func", None)
    require(conversion in READABLE_CONVERSIONS, f"{spec}: sae_lens converts release "
            f"{release!r} with {conversion!r}, a layout clt-eval does not read; expected a "
            "release of sae_lens folders or circuit-tracer layer files")
    path = info.saes_map[sae_id].strip("/")
    if conversion is None:
        return load_hf(f"{HF_PREFIX}{info.repo_id}/{path}", feature_input_hook,
                       feature_output_hook)
    return _load_layer_file(HubRef(info.repo_id), path, spec, feature_input_hook,
                            feature_output_hook)


def _load_layer_file(ref: HubRef, path: str, spec: str, in_hook, out_hook):
    """One circuit-tracer ``layer_<i>.safetensors`` of a transcoder-set repository: a one-layer
    PLT on model layer i, with the hooks of the repository's config.yaml."""
    m = re.search(r"layer_(\d+)\.safetensors$", path)
    require(m is not None, f"{spec}: maps to {path!r}; expected a layer_<i>.safetensors file")
    root = snapshot(ref, [ct.CONFIG_FILE, path])
    require_files(ref, root, [path] + ([] if in_hook and out_hook else [ct.CONFIG_FILE]))
    tc, window = ct.load_circuit_tracer(root, files=[root / path],
                                        feature_input_hook=in_hook, feature_output_hook=out_hook)
    return tc, dataclasses.replace(window, layers=(int(m.group(1)),))


def load_remote(spec: str, feature_input_hook: str | None = None,
                feature_output_hook: str | None = None):
    if spec.startswith(SAE_LENS_PREFIX):
        return load_sae_lens_release(spec, feature_input_hook, feature_output_hook)
    return load_hf(spec, feature_input_hook, feature_output_hook)
