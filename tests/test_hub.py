"""Transcoders from the Hugging Face hub (``hf://`` and ``sae_lens:``), read offline from a
hub cache the tests lay out themselves in tmp (refs/, snapshots/<commit>/ linking into blobs/,
as huggingface_hub writes it)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
import yaml
from conftest import fails

from clt_eval.config import TranscoderConfig
from clt_eval.formats import load_any, save_as
from clt_eval.formats.convert import convert
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

L, D, F = 3, 8, 6
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@torch.no_grad()
def perturbed(seed=0, **kw) -> Transcoder:
    tc = Transcoder([TranscoderConfig(d_model=D, n_layers=L, n_features=F, **kw)])
    g = torch.Generator().manual_seed(seed)
    for p in tc.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return tc.eval()


def same_weights(a: Transcoder, b: Transcoder) -> None:
    for name in ("W_enc", "b_enc", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.dense_W_dec(), b.dense_W_dec())
    x = torch.randn(16, L, D, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a(x).recon_RBLD, b(x).recon_RBLD)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache, offline."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "main",
               commit: str = COMMIT) -> None:
    """Lay ``files`` out as huggingface_hub caches a snapshot of ``repo_id`` at ``revision``."""
    base = cache / f"models--{repo_id.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / revision).write_text(commit)
    for name, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = base / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- hf:// ----------------------------------------------------------------------------------
def test_circuit_tracer_clt_repo(hub, tmp_path):
    tc = perturbed(activation="jumprelu")
    window = LayerWindow((0, 1, 2), "blocks.{layer}.hook_resid_mid", model_name="toy")
    src = save_as(tc, window, tmp_path / "src", "circuit-tracer")
    cache_repo(hub, "org/clt", folder_files(src))
    back, back_window = load_any("hf://org/clt")
    assert back_window == window
    same_weights(tc, back)
    out = convert("hf://org/clt", tmp_path / "native", "clt-eval")  # every command's path
    same_weights(tc, load_any(out)[0])


def test_set_in_a_subfolder_at_a_revision(hub, tmp_path, monkeypatch):
    """Only the subfolder's files are asked for; the revision picks the snapshot."""
    tc = perturbed(arch="plt", activation="jumprelu", skip=True)
    src = save_as(tc, LayerWindow((0, 1, 2)), tmp_path / "src", "circuit-tracer")
    cache_repo(hub, "org/sets", folder_files(src, "wide/"), revision="v1")
    asked = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kw):
        asked.extend(kw.get("allow_patterns") or ["<everything>"])
        return real(*args, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    back, window = load_any("hf://org/sets/wide@v1")
    assert window.layers == (0, 1, 2) and back.cfg.skip
    same_weights(tc, back)
    assert torch.equal(tc.W_skip, back.W_skip)
    assert asked and all(p.startswith("wide/") for p in asked), asked
    fails(lambda: load_any("hf://org/sets/wide"), "hf://org/sets/wide: not in the Hugging Face "
          "cache", "HF_HUB_OFFLINE=0 hf download org/sets")


def test_config_listing_hf_uris(hub, tmp_path):
    """A transcoder set whose config.yaml lists its files as hf:// URIs, as published sets do;
    one of them in another repository."""
    tc = perturbed(arch="plt")
    src = save_as(tc, LayerWindow((0, 1, 2)), tmp_path / "src", "circuit-tracer")
    files = folder_files(src)
    cache_repo(hub, "other/repo", {"deep/l2.safetensors": files.pop("layer_2.safetensors")})
    config = yaml.safe_load(files["config.yaml"])
    config["transcoders"] = ["hf://org/pub/layer_0.safetensors", "hf://org/pub/layer_1.safetensors",
                             "hf://other/repo/deep/l2.safetensors"]
    files["config.yaml"] = yaml.safe_dump(config).encode()
    cache_repo(hub, "org/pub", files)
    same_weights(tc, load_any("hf://org/pub")[0])


def test_sae_lens_folder_repo(hub, tmp_path):
    """A sae_lens transcoder folder (cfg.json + sae_weights.safetensors) in a subfolder."""
    g = torch.Generator().manual_seed(0)
    W = {"W_enc": torch.randn(D, F, generator=g), "b_enc": torch.randn(F, generator=g),
         "W_dec": torch.randn(F, D, generator=g), "b_dec": torch.randn(D, generator=g)}
    cfg = {"d_in": D, "d_sae": F, "d_out": D, "architecture": "transcoder",
           "apply_b_dec_to_input": False,
           "metadata": {"hook_name": "blocks.4.hook_resid_mid",
                        "hook_name_out": "blocks.4.hook_mlp_out"}}
    (tmp_path / "w.safetensors").unlink(missing_ok=True)
    safetensors.torch.save_file(W, str(tmp_path / "w.safetensors"))
    cache_repo(hub, "org/saes", {"l4/cfg.json": json.dumps(cfg).encode(),
                                 "l4/sae_weights.safetensors":
                                     (tmp_path / "w.safetensors").read_bytes()})
    tc, window = load_any("hf://org/saes/l4")
    assert window.layers == (4,) and window.input_hook == "blocks.{layer}.hook_resid_mid"
    assert torch.equal(tc.W_enc[0, 0], W["W_enc"])
    assert torch.equal(tc.decoder_block(0, 0)[0], W["W_dec"])


def test_missing_and_partial_cache(hub, tmp_path):
    fails(lambda: load_any("hf://org/absent"), "hf://org/absent: not in the Hugging Face cache",
          str(hub), "HF_HUB_OFFLINE=0 hf download org/absent")
    src = save_as(perturbed(), LayerWindow((0, 1, 2)), tmp_path / "src", "circuit-tracer")
    cache_repo(hub, "org/partial", {"config.yaml": (src / "config.yaml").read_bytes()})
    fails(lambda: load_any("hf://org/partial"), "not in the Hugging Face cache",
          "W_enc_0.safetensors")
    for bad in ("hf://org", "hf://org/repo/../x", "hf://org/repo@"):
        fails(lambda b=bad: load_any(b), "expected hf://org/repo[/subfolder][@revision]")


# ---- sae_lens:RELEASE/ID --------------------------------------------------------------------
def test_sae_lens_release_of_circuit_tracer_files(hub, tmp_path):
    """sae_lens's registry maps the release to its repository and file (here a transcoder-set
    repository in circuit-tracer's layout); the file is one layer, model layer 3."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, sae_id = "mwhanna-qwen3-0.6b-transcoders-lowl0", "layer_3"
    info = get_pretrained_saes_directory()[release]
    path = info.saes_map[sae_id]
    tc = perturbed(arch="plt", activation="jumprelu")
    one = tc.select([0])
    src = save_as(tc, LayerWindow((0, 1, 2), "blocks.{layer}.mlp.hook_in",
                                  "blocks.{layer}.mlp.hook_out"), tmp_path / "src",
                  "circuit-tracer")
    config = yaml.safe_load((src / "config.yaml").read_text())
    for key in ("clt_eval_layers", "transcoders"):
        config.pop(key)
    cache_repo(hub, info.repo_id, {"config.yaml": yaml.safe_dump(config).encode(),
                                   path: (src / "layer_1.safetensors").read_bytes()})
    back, window = load_any(f"sae_lens:{release}/{sae_id}")
    assert window.layers == (3,) and window.input_hook == "blocks.{layer}.mlp.hook_in"
    assert torch.equal(back.W_enc[0, 0], one.W_enc[0, 1])
    assert torch.equal(back.decoder_block(0, 0)[0], tc.decoder_block(1, 1)[0])


def test_sae_lens_bad_names():
    fails(lambda: load_any("sae_lens:no-such-release/x"), "release 'no-such-release' is not "
          "in sae_lens's registry")
    fails(lambda: load_any("sae_lens:mwhanna-qwen3-0.6b-transcoders-lowl0/layer_999"),
          "id 'layer_999' is not in release")
    fails(lambda: load_any("sae_lens:gemma-scope-2b-pt-transcoders/"
                           "layer_0/width_16k/average_l0_76"),
          "with 'gemma_2_transcoder', a layout clt-eval does not read")
    fails(lambda: load_any("sae_lens:only-a-release"), "expected sae_lens:RELEASE/ID")
