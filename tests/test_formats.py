"""On-disk formats: circuit-tracer's CLT and per-layer layouts, sae_lens transcoder folders and
clt-eval's own, all on files the tests write themselves; `convert` and its bad-input errors.
sae_lens is imported inside the tests that need it (~10 s, once per session)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import safetensors.torch
import torch
import yaml
from conftest import fails

from clt_eval.config import TranscoderConfig
from clt_eval.formats import detect_format, load_any, save_as
from clt_eval.formats.convert import convert
from clt_eval.formats.native import save_native
from clt_eval.formats.sae_lens_io import to_sae_lens
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

L, D, F = 3, 8, 6
WINDOW = LayerWindow((1, 3, 5), model_name="toy-model")
FULL = LayerWindow((0, 1, 2))  # model layers 0..2 with the default hooks, said explicitly
M = 7  # the model WINDOW sits in


@torch.no_grad()
def perturbed(L=L, D=D, F=F, seed=0, **kw) -> Transcoder:
    """Every parameter moved off its init, so a reader that keeps the init fails."""
    tc = Transcoder([TranscoderConfig(d_model=D, n_layers=L, n_features=F, **kw)])
    g = torch.Generator().manual_seed(seed)
    for p in tc.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.3)
    tc.batchtopk_threshold.copy_(torch.rand(tc.batchtopk_threshold.shape, generator=g) * 0.2)
    return tc.eval()


def inputs(n_layers=L, d=D, seed=1):
    return torch.randn(32, n_layers, d, generator=torch.Generator().manual_seed(seed))


def assert_same(a: Transcoder, b: Transcoder, n_layers=L, d=D):
    """Identical decoders, encoders, biases, skip; thresholds to float32 precision (log/exp);
    and identical forward outputs."""
    for name in ("W_enc", "b_enc", "b_dec", "W_skip"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), name
    assert torch.equal(a.masked_W_dec(), b.masked_W_dec())
    theta_a, theta_b = a.threshold(), b.threshold()
    assert (theta_a is None) == (theta_b is None)
    if theta_a is not None:
        assert torch.allclose(theta_a, theta_b, rtol=1e-6)
    x = inputs(n_layers, d)
    for field in ("acts_RBLF", "recon_RBLD"):
        assert torch.equal(getattr(a(x), field), getattr(b(x), field)), field


# ---- circuit-tracer ----------------------------------------------------------------------
CT_CASES = [
    dict(arch="clt"),
    dict(arch="clt", activation="jumprelu"),
    dict(arch="clt", activation="batchtopk", k=2),  # exported as the JumpReLU it is at inference
    dict(arch="plt"),
    dict(arch="plt", activation="jumprelu", skip=True),
    dict(arch="plt", activation="topk", k=2, topk_mode="per_layer"),
]


@pytest.mark.parametrize("kw", CT_CASES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_circuit_tracer_round_trip(tmp_path, kw):
    tc = perturbed(**kw)
    src = save_native(tc, WINDOW, tmp_path / "src")
    ct_dir = convert(src, tmp_path / "ct", "circuit-tracer", n_model_layers=M)
    assert detect_format(ct_dir) == f"circuit-tracer-{kw['arch']}"
    back_dir = convert(ct_dir, tmp_path / "back", "clt-eval")
    back, window = load_any(back_dir)
    assert window == WINDOW
    assert back.cfg.arch == kw["arch"] and back.cfg.skip == tc.cfg.skip
    if kw.get("activation") == "batchtopk":
        assert back.cfg.activation == "jumprelu"
        assert torch.equal(tc(inputs()).recon_RBLD, back(inputs()).recon_RBLD)
    else:
        assert back.cfg.activation == tc.cfg.activation and back.cfg.k == tc.cfg.k
        assert_same(tc, back)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "ct", "src"]


def test_circuit_tracer_clt_layout(tmp_path):
    out = save_as(perturbed(activation="jumprelu"), dataclasses.replace(WINDOW, layers=(0, 1, 2)),
                  tmp_path / "ct", "circuit-tracer", scan="my-scan")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config == {"model_kind": "cross_layer_transcoder", "model_name": "toy-model",
                      "scan": "my-scan", "feature_input_hook": "ln2.hook_normalized",
                      "feature_output_hook": "hook_mlp_out", "clt_eval_layers": [0, 1, 2]}
    for i in range(L):
        enc = safetensors.torch.load_file(str(out / f"W_enc_{i}.safetensors"))
        assert {k: list(v.shape) for k, v in enc.items()} == {
            f"W_enc_{i}": [F, D], f"b_enc_{i}": [F], f"b_dec_{i}": [D], f"threshold_{i}": [F]}
        dec = safetensors.torch.load_file(str(out / f"W_dec_{i}.safetensors"))
        assert {k: list(v.shape) for k, v in dec.items()} == {f"W_dec_{i}": [F, L - i, D]}


def test_circuit_tracer_plt_layout(tmp_path):
    out = save_as(perturbed(arch="plt", activation="jumprelu", skip=True), FULL,
                  tmp_path / "ct", "circuit-tracer")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["clt_eval_layers"] == [0, 1, 2]
    assert config["transcoders"] == [f"layer_{i}.safetensors" for i in range(L)]
    assert config["scan"] == "model/clt-eval-plt"
    t = safetensors.torch.load_file(str(out / "layer_1.safetensors"))
    assert {k: list(v.shape) for k, v in t.items()} == {
        "W_enc": [F, D], "W_dec": [F, D], "b_enc": [F], "b_dec": [D],
        "activation_function.threshold": [F], "W_skip": [D, D]}


def write_foreign_clt(folder, theta=None, dtype=torch.bfloat16, seed=0):
    """A CLT folder as circuit-tracer's own writer lays it out: no clt-eval keys, bf16."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir()
    raw = {"W_enc": [], "b_enc": [], "b_dec": [], "W_dec": []}
    for i in range(L):
        enc = {f"W_enc_{i}": torch.randn(F, D, generator=g),
               f"b_enc_{i}": torch.randn(F, generator=g), f"b_dec_{i}": torch.randn(D, generator=g)}
        if theta is not None:
            enc[f"threshold_{i}"] = torch.full((F,), theta)
        dec = {f"W_dec_{i}": torch.randn(F, L - i, D, generator=g)}
        enc, dec = ({k: v.to(dtype) for k, v in d.items()} for d in (enc, dec))
        safetensors.torch.save_file(enc, str(folder / f"W_enc_{i}.safetensors"))
        safetensors.torch.save_file(dec, str(folder / f"W_dec_{i}.safetensors"))
        for name in ("W_enc", "b_enc", "b_dec"):
            raw[name].append(enc[f"{name}_{i}"].float())
        raw["W_dec"].append(dec[f"W_dec_{i}"].float())
    (folder / "config.yaml").write_text(
        "model_name: google/gemma-2-2b\nmodel_kind: cross_layer_transcoder\n"
        "feature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n")
    return raw


@pytest.mark.parametrize("theta", [None, 0.3])
def test_reads_foreign_circuit_tracer_clt(tmp_path, theta):
    """Checked against circuit-tracer's CLT semantics written out by hand: a_s = σ(W_enc_s x_s
    + b_enc_s) and y_t = Σ_{s<=t} W_dec_s[:, t-s]ᵀ a_s + b_dec_t."""
    raw = write_foreign_clt(tmp_path / "ct", theta)
    tc, window = load_any(tmp_path / "ct")
    assert window == LayerWindow((0, 1, 2), "blocks.{layer}.hook_resid_mid",
                                 "blocks.{layer}.hook_mlp_out", "google/gemma-2-2b")
    assert tc.cfg.activation == ("relu" if theta is None else "jumprelu")
    x = inputs()
    acts = []
    for s in range(L):
        z = x[:, s] @ raw["W_enc"][s].T + raw["b_enc"][s]
        acts.append(z.relu() if theta is None else z * (z > theta))
    for t in range(L):
        y = raw["b_dec"][t] + sum(acts[s] @ raw["W_dec"][s][:, t - s] for s in range(t + 1))
        assert torch.allclose(tc(x).recon_RBLD[0, :, t], y, atol=1e-4)


def test_circuit_tracer_set_listed_in_config(tmp_path):
    """A transcoder set whose config.yaml lists its files (as GemmaScope's does)."""
    tc = perturbed(arch="plt")
    out = save_as(tc, FULL, tmp_path / "ct", "circuit-tracer")
    for i in range(L):
        (out / f"layer_{i}.safetensors").rename(out / f"tc{i}.safetensors")
    edit_yaml(out / "config.yaml",
              lambda c: c.update(transcoders=[f"tc{i}.safetensors" for i in range(L)]))
    assert_same(tc, load_any(out)[0])
    edit_yaml(out / "config.yaml", lambda c: c["transcoders"].append("hf://google/x/p.npz"))
    fails(lambda: load_any(out), "config.yaml: field 'transcoders' lists 'hf://google/x/p.npz'")


# ---- sae_lens ----------------------------------------------------------------------------
SAE_CASES = [dict(activation="relu"), dict(activation="jumprelu", skip=True),
             dict(activation="batchtopk", k=2)]


@pytest.mark.parametrize("kw", SAE_CASES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_sae_lens_round_trip(tmp_path, kw):
    from sae_lens import SAE

    tc = perturbed(arch="plt", **kw)
    out = convert(save_native(tc, WINDOW, tmp_path / "src"), tmp_path / "sl", "sae-lens")
    assert sorted(p.name for p in out.iterdir()) == ["layer_1", "layer_3", "layer_5"]
    x = inputs()
    want = tc(x).recon_RBLD[0]
    for i, layer in enumerate(WINDOW.layers):
        sae = SAE.load_from_disk(out / f"layer_{layer}")  # sae_lens's own loader
        arch = ("jumprelu_" if kw["activation"] != "relu" else "") + \
            ("skip_" if tc.cfg.skip else "") + "transcoder"
        assert sae.cfg.architecture() == arch
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.ln2.hook_normalized"
        assert sae.cfg.metadata.hook_name_out == f"blocks.{layer}.hook_mlp_out"
        assert torch.allclose(sae(x[:, i]), want[:, i], atol=1e-5)
    back, window = load_any(convert(out, tmp_path / "back", "clt-eval"))
    assert window == WINDOW
    if kw["activation"] == "batchtopk":
        assert torch.equal(back(x).recon_RBLD, tc(x).recon_RBLD)
    else:
        assert_same(tc, back)


def test_reads_folders_sae_lens_wrote(tmp_path):
    """JumpReLU transcoders built and saved by sae_lens itself, one folder per layer (named
    out of layer order), read as one PLT that computes what sae_lens computes."""
    from sae_lens import JumpReLUTranscoder
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import JumpReLUTranscoderConfig

    saes = []
    for name, layer in (("b", 2), ("a", 7)):
        cfg = JumpReLUTranscoderConfig(d_in=D, d_sae=F, d_out=D, apply_b_dec_to_input=False,
                                       metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_mid",
                                                            hook_name_out=f"blocks.{layer}.mlp.hook_out"))
        sae = JumpReLUTranscoder(cfg).eval()
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape) * 0.3)
            sae.threshold.abs_()
        sae.save_model(tmp_path / "set" / name)
        saes.append(sae)
    tc, window = load_any(tmp_path / "set")
    assert detect_format(tmp_path / "set") == "sae-lens"
    assert window == LayerWindow((2, 7), "blocks.{layer}.hook_resid_mid",
                                 "blocks.{layer}.mlp.hook_out")
    x = inputs(2)
    for i, sae in enumerate(saes):
        assert torch.allclose(tc(x).recon_RBLD[0, :, i], sae(x[:, i]), atol=1e-5)


def test_plt_in_hooked_sae_transformer(tiny_lm):
    """An exported PLT spliced into a HookedSAETransformer: with the error term the model is
    unchanged; without it, the MLP output is exactly the transcoder's reconstruction."""
    from sae_lens import HookedSAETransformer

    model = HookedSAETransformer(tiny_lm.cfg)
    model.load_state_dict(tiny_lm.state_dict())
    model.eval()
    cfg = tiny_lm.cfg
    tc = perturbed(L=cfg.n_layers, D=cfg.d_model, F=16, arch="plt", activation="jumprelu")
    saes = to_sae_lens(tc, LayerWindow(tuple(range(cfg.n_layers))))
    tokens = torch.randint(0, cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = model(tokens)
        model.add_sae(saes[1], use_error_term=True)
        assert torch.allclose(model(tokens), clean, atol=1e-5)
        model.reset_saes()
        model.add_sae(saes[1])
        logits, cache = model.run_with_cache(tokens)
        model.reset_saes()
    x = cache["blocks.1.ln2.hook_normalized"].reshape(-1, cfg.d_model)
    x_BLD = torch.zeros(len(x), cfg.n_layers, cfg.d_model)
    x_BLD[:, 1] = x
    want = tc(x_BLD).recon_RBLD[0, :, 1]
    got = cache["blocks.1.hook_mlp_out.hook_sae_output"].reshape(-1, cfg.d_model)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(logits, clean, atol=1e-3)  # the splice really changed the model


# ---- clt-eval's own format ---------------------------------------------------------------
def test_native_keeps_window(tmp_path):
    tc = perturbed()
    out = save_as(tc, WINDOW, tmp_path / "n", "clt-eval")
    assert json.loads((out / "config.json").read_text())["extra"]["window"]["layers"] == [1, 3, 5]
    back, window = load_any(out)
    assert window == WINDOW and back.cfg == tc.cfg
    assert_same(tc, back)
    save_native(tc, None, tmp_path / "bare")
    assert load_any(tmp_path / "bare")[1] is None


def test_convert_replaces_an_earlier_conversion(tmp_path):
    src = save_native(perturbed(), WINDOW, tmp_path / "src")
    convert(src, tmp_path / "out", "circuit-tracer", n_model_layers=M)
    convert(save_native(perturbed(arch="plt"), FULL, tmp_path / "src2"), tmp_path / "out",
            "circuit-tracer")
    assert detect_format(tmp_path / "out") == "circuit-tracer-plt"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


# ---- bad input: one line naming the file/tensor, nothing written ---------------------------
def ct_clt(tmp_path, **kw):
    return save_as(perturbed(**kw), FULL, tmp_path / "src", "circuit-tracer")


def edit_tensors(path, fn):
    t = safetensors.torch.load_file(str(path))
    fn(t)
    safetensors.torch.save_file(t, str(path))


def edit_yaml(path, fn):
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))


def _nan(t):
    t["b_enc_1"][2] = float("nan")


BAD_CT = [
    (lambda d: (d / "W_dec_1.safetensors").unlink(), "W_dec_1.safetensors: missing"),
    (lambda d: shutil.copy(d / "W_dec_2.safetensors", d / "W_dec_3.safetensors"),
     "W_dec_3.safetensors: a layer beyond the 3 layers"),
    (lambda d: edit_tensors(d / "W_dec_0.safetensors",
                            lambda t: t.update(W_dec_0=t["W_dec_0"][:, 1:].contiguous())),
     f"W_dec_0.safetensors: tensor 'W_dec_0' has shape [{F}, {L - 1}, {D}], "
     f"expected [{F}, {L}, {D}]"),
    (lambda d: edit_tensors(d / "W_enc_1.safetensors", _nan),
     "W_enc_1.safetensors: tensor 'b_enc_1' has 1 non-finite value(s)"),
    (lambda d: edit_tensors(d / "W_enc_0.safetensors",
                            lambda t: t.update(W_skip_0=torch.zeros(D, D))),
     "W_enc_0.safetensors: unexpected tensor(s) ['W_skip_0']"),
    (lambda d: edit_tensors(d / "W_enc_2.safetensors",
                            lambda t: t.update(b_dec_2=t["b_dec_2"].long())),
     "W_enc_2.safetensors: tensor 'b_dec_2' has dtype torch.int64, expected a float dtype"),
    (lambda d: (d / "W_enc_2.safetensors").write_bytes(b"garbage"),
     "W_enc_2.safetensors: not a readable safetensors file"),
    (lambda d: edit_yaml(d / "config.yaml", lambda c: c.update(model_kind="sparse_autoencoder")),
     "config.yaml: field 'model_kind' is 'sparse_autoencoder', expected one of"),
    (lambda d: edit_yaml(d / "config.yaml", lambda c: c.pop("feature_input_hook")),
     "config.yaml: field 'feature_input_hook' is None"),
    (lambda d: edit_yaml(d / "config.yaml", lambda c: c.update(clt_eval_layers=[0, 1])),
     "config.yaml: field 'clt_eval_layers' is [0, 1], expected a list of 3 model layers"),
    (lambda d: (d / "config.yaml").write_text("model_kind: [unclosed"),
     "config.yaml: not valid YAML"),
    (lambda d: (d / "config.yaml").unlink(), "config.yaml: missing"),
]


@pytest.mark.parametrize("edit, needle", BAD_CT, ids=range(len(BAD_CT)))
def test_bad_circuit_tracer_clt(tmp_path, edit, needle):
    src = ct_clt(tmp_path)
    edit(src)
    fails(lambda: convert(src, tmp_path / "dst", "clt-eval"), str(src), needle)
    assert not (tmp_path / "dst").exists()


def _shrink_features(t):
    t.update(W_enc=t["W_enc"][1:].contiguous())


BAD_PLT = [
    (lambda d: edit_tensors(d / "layer_1.safetensors", _shrink_features),
     f"layer_1.safetensors: tensor 'W_enc' has shape [{F - 1}, {D}], expected [{F}, {D}] "
     f"(F={F}, D={D} from layer_0.safetensors)"),
    (lambda d: (d / "layer_1.safetensors").unlink(),
     "layer_1.safetensors: missing; expected a safetensors file"),
    (lambda d: edit_tensors(d / "layer_2.safetensors",
                            lambda t: t.update(**{"activation_function.threshold": -t[
                                "activation_function.threshold"]})),
     "layer_2.safetensors: tensor 'activation_function.threshold' has 6 negative threshold(s)"),
    (lambda d: edit_yaml(d / "config.yaml", lambda c: c.update(activation="gelu")),
     "config.yaml: field 'activation' is 'gelu'"),
]


@pytest.mark.parametrize("edit, needle", BAD_PLT, ids=range(len(BAD_PLT)))
def test_bad_circuit_tracer_set(tmp_path, edit, needle):
    src = ct_clt(tmp_path, arch="plt", activation="jumprelu")
    edit(src)
    fails(lambda: convert(src, tmp_path / "dst", "sae-lens"), needle)
    assert not (tmp_path / "dst").exists()


def write_sae_lens_folder(folder, layer=0, **cfg_changes):
    """What sae_lens 6.54's save_model writes for a ReLU transcoder, written by hand."""
    folder.mkdir(parents=True)
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none",
           "reshape_activations": "none", "d_out": D, "architecture": "transcoder",
           "metadata": {"sae_lens_version": "6.54.12",
                        "hook_name": f"blocks.{layer}.hook_resid_mid",
                        "hook_name_out": f"blocks.{layer}.hook_mlp_out"}} | cfg_changes
    (folder / "cfg.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file({"W_enc": torch.randn(D, F), "b_enc": torch.zeros(F),
                                 "W_dec": torch.randn(F, D), "b_dec": torch.zeros(D)},
                                str(folder / "sae_weights.safetensors"))


BAD_SAE = [
    (dict(architecture="standard"), "cfg.json: field 'architecture' is 'standard'"),
    (dict(d_out=D + 1), f"cfg.json: d_in={D} but d_out={D + 1}"),
    (dict(normalize_activations="layer_norm"),
     "cfg.json: field 'normalize_activations' is 'layer_norm', expected 'none'"),
    (dict(metadata={"hook_name": "hook_embed", "hook_name_out": "blocks.0.hook_mlp_out"}),
     "cfg.json: field 'metadata.hook_name' is 'hook_embed'"),
    (dict(d_sae=F + 1), f"sae_weights.safetensors: tensor 'W_enc' has shape [{D}, {F}], "
                        f"expected [{D}, {F + 1}]"),
]


@pytest.mark.parametrize("changes, needle", BAD_SAE, ids=range(len(BAD_SAE)))
def test_bad_sae_lens_folder(tmp_path, changes, needle):
    write_sae_lens_folder(tmp_path / "src", **changes)
    fails(lambda: convert(tmp_path / "src", tmp_path / "dst", "clt-eval"), needle)
    assert not (tmp_path / "dst").exists()


def test_sae_lens_set_with_mismatched_layers(tmp_path):
    write_sae_lens_folder(tmp_path / "src" / "a", layer=0)
    write_sae_lens_folder(tmp_path / "src" / "b", layer=1, d_sae=F + 2)
    edit_tensors(tmp_path / "src" / "b" / "sae_weights.safetensors",
                 lambda t: t.update(W_enc=torch.zeros(D, F + 2), b_enc=torch.zeros(F + 2),
                                    W_dec=torch.zeros(F + 2, D)))
    fails(lambda: convert(tmp_path / "src", tmp_path / "dst", "clt-eval"),
          "b/cfg.json: dims (8, 8) differs from (6, 8)")
    write_sae_lens_folder(tmp_path / "src2" / "a", layer=4)
    write_sae_lens_folder(tmp_path / "src2" / "b", layer=4)
    fails(lambda: load_any(tmp_path / "src2"), "b/cfg.json: layer 4 again")


def test_exports_a_format_cannot_hold(tmp_path):
    src = save_native(perturbed(arch="clt"), None, tmp_path / "src")
    fails(lambda: convert(src, tmp_path / "dst", "sae-lens"),
          "arch='clt': sae_lens has no cross-layer transcoder class")
    skip_clt = save_native(perturbed(arch="clt", skip=True), FULL, tmp_path / "skip")
    fails(lambda: convert(skip_clt, tmp_path / "dst", "circuit-tracer"),
          "circuit-tracer's CLT layout has no skip connection")
    topk = save_native(perturbed(arch="plt", activation="topk", k=2), FULL, tmp_path / "topk")
    fails(lambda: convert(topk, tmp_path / "dst", "sae-lens"), "activation='topk'")
    fails(lambda: convert(topk, tmp_path / "dst", "circuit-tracer"), "topk_mode='joint'")
    odd = LayerWindow((0, 1, 2), input_hook="layers.{layer}.in")
    fails(lambda: save_as(perturbed(arch="plt"), odd, tmp_path / "dst", "circuit-tracer"),
          "input_hook='layers.{layer}.in'")
    assert not (tmp_path / "dst").exists()


def test_bad_source_and_destination(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "model.bin").write_text("x")
    fails(lambda: convert(tmp_path / "foreign", tmp_path / "dst", "clt-eval"),
          "foreign: not a transcoder folder in a known format (found ['model.bin'])")
    (tmp_path / "foreign" / "config.json").write_text('{"model_type": "llama"}')
    fails(lambda: convert(tmp_path / "foreign", tmp_path / "dst", "clt-eval"),
          "config.json: field 'format' is None, expected 'clt-eval'")
    fails(lambda: convert(tmp_path / "nope", tmp_path / "dst", "clt-eval"), "nope: missing")
    src = ct_clt(tmp_path)
    fails(lambda: convert(src, tmp_path / "dst", "onnx"), "to='onnx' is not one of")
    fails(lambda: convert(src, src, "clt-eval"), "overlaps the source folder")
    fails(lambda: convert(src, src / "inner", "clt-eval"), "overlaps the source folder")
    assert not (tmp_path / "dst").exists()
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("keep me")
    fails(lambda: convert(src, tmp_path / "dst", "clt-eval"),
          "dst: exists and holds other files ['notes.txt']")
    assert (tmp_path / "dst" / "notes.txt").read_text() == "keep me"
    bad_window = save_native(perturbed(), None, tmp_path / "native")
    cfg_path = bad_window / "config.json"
    data = json.loads(cfg_path.read_text())
    data["extra"]["window"] = {"layers": [0, 1]}
    cfg_path.write_text(json.dumps(data))
    fails(lambda: convert(bad_window, tmp_path / "dst2", "circuit-tracer"),
          "config.json: extra.window: has 2 layers, expected 3")
    assert not (tmp_path / "dst2").exists()
    fails(lambda: save_as(Transcoder([perturbed().cfg] * 2), None, tmp_path / "e", "clt-eval"),
          "expected a single run")


# ---- circuit-tracer exchange: padding, hooks, config keys, paths ---------------------------
def test_windowed_clt_is_padded_to_every_model_layer(tmp_path):
    """circuit-tracer numbers files by model layer: layers 2..4 of a 6-layer model are written
    as files 0..5, the others all zeros; circuit-tracer's reading (all 6 layers) reproduces
    the transcoder at its layers and writes nothing elsewhere; clt-eval reads the window back."""
    tc, window = perturbed(activation="jumprelu"), LayerWindow((2, 3, 4), model_name="m")
    fails(lambda: save_as(tc, window, tmp_path / "no", "circuit-tracer"),
          "window layers [2, 3, 4]", "n_model_layers")
    fails(lambda: save_as(tc, window, tmp_path / "no", "circuit-tracer", n_model_layers=4),
          "n_model_layers=4")
    out = save_as(tc, window, tmp_path / "ct", "circuit-tracer", n_model_layers=6)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["clt_eval_layers"] == list(range(6)) and config["clt_eval_window"] == [2, 3, 4]
    enc0 = safetensors.torch.load_file(str(out / "W_enc_0.safetensors"))
    assert not any(t.any() for t in enc0.values())
    enc2 = safetensors.torch.load_file(str(out / "W_enc_2.safetensors"))
    assert torch.equal(enc2["W_enc_2"], tc.W_enc[0, 0].detach().T)
    dec2 = safetensors.torch.load_file(str(out / "W_dec_2.safetensors"))["W_dec_2"]
    assert list(dec2.shape) == [F, 4, D] and not dec2[:, 3].any()
    assert torch.equal(dec2[:, 1], tc.decoder_block(0, 1)[0].detach())
    back, back_window = load_any(out)
    assert back_window == window
    assert_same(tc, back)
    # As circuit-tracer reads it: every file, no clt-eval keys.
    edit_yaml(out / "config.yaml", lambda c: [c.pop(k) for k in ("clt_eval_layers",
                                                                 "clt_eval_window")])
    full, full_window = load_any(out)
    assert full_window.layers == tuple(range(6)) and full.cfg.n_layers == 6
    x6 = torch.randn(32, 6, D, generator=torch.Generator().manual_seed(5))
    y6 = full(x6).recon_RBLD[0]
    torch.testing.assert_close(y6[:, 2:5], tc(x6[:, 2:5]).recon_RBLD[0], atol=1e-5, rtol=0)
    assert not y6[:, [0, 1, 5]].any()


def test_clt_layers_out_of_order_are_refused(tmp_path):
    """A CLT's W_dec_i decodes to the files after i, so clt_eval_layers must increase: a
    shuffled list would silently pair decoders with the wrong layers."""
    tc = perturbed(activation="jumprelu")
    out = convert(save_native(tc, WINDOW, tmp_path / "src"), tmp_path / "ct", "circuit-tracer",
                  n_model_layers=M)
    edit_yaml(out / "config.yaml", lambda c: c.update(
        clt_eval_layers=[0, 1, 2, 3, 5, 4, 6], clt_eval_window=[1, 3, 4]))
    fails(lambda: load_any(out), "config.yaml: field 'clt_eval_layers' is [0, 1, 2, 3, 5, 4, 6]",
          "increasing order")


def test_windowed_set_is_padded(tmp_path):
    tc = perturbed(arch="plt", activation="topk", k=2, topk_mode="per_layer")
    out = convert(save_native(tc, WINDOW, tmp_path / "src"), tmp_path / "ct", "circuit-tracer",
                  n_model_layers=M)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["transcoders"] == [f"layer_{i}.safetensors" for i in range(M)]
    assert config["k"] == 2 and config["clt_eval_window"] == [1, 3, 5]
    assert not safetensors.torch.load_file(str(out / "layer_0.safetensors"))["W_dec"].any()
    back, window = load_any(out)
    assert window == WINDOW
    assert_same(tc, back)


def test_folder_without_config_reads_with_hooks(tmp_path):
    """circuit-tracer's own to_safetensors writes no config.yaml: the hooks stand in."""
    write_foreign_clt(tmp_path / "ct", theta=0.3)
    with_config, _ = load_any(tmp_path / "ct")
    (tmp_path / "ct" / "config.yaml").unlink()
    fails(lambda: load_any(tmp_path / "ct"), "config.yaml: missing", "--feature-input-hook")
    tc, window = load_any(tmp_path / "ct", feature_input_hook="hook_resid_mid",
                          feature_output_hook="hook_mlp_out")
    assert window == LayerWindow((0, 1, 2), "blocks.{layer}.hook_resid_mid",
                                 "blocks.{layer}.hook_mlp_out")
    assert_same(with_config, tc)
    out = convert(tmp_path / "ct", tmp_path / "native", "clt-eval",
                  feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out")
    assert load_any(out)[1] == window
    write_foreign_clt(tmp_path / "ct2")
    fails(lambda: load_any(tmp_path / "ct2", feature_input_hook="ln2.hook_normalized",
                           feature_output_hook="hook_mlp_out"),
          "field 'feature_input_hook' is 'hook_resid_mid' but "
          "feature_input_hook='ln2.hook_normalized' was given")


def test_export_writes_the_hooks_the_transcoder_was_trained_on(tmp_path):
    """A toy transcoder saved with its case study (the Boolean chain reads
    blocks.{l}.hook_resid_mid): the export names that hook, not a default."""
    from clt_eval import io

    tc = perturbed(arch="plt")
    io.save_transcoder(tc, tmp_path / "toy", extra={"case_study": "boolean_chain"})
    assert load_any(tmp_path / "toy")[1] == LayerWindow((0, 1, 2), "blocks.{layer}.hook_resid_mid",
                                                        "blocks.{layer}.hook_mlp_out")
    out = convert(tmp_path / "toy", tmp_path / "ct", "circuit-tracer")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["feature_input_hook"] == "hook_resid_mid"
    assert config["feature_output_hook"] == "hook_mlp_out"
    # Without a window or a case study the hooks are unknown: refused, or given explicitly.
    bare = save_native(tc, None, tmp_path / "bare")
    fails(lambda: convert(bare, tmp_path / "ct2", "circuit-tracer"), "saved without a window")
    out = convert(bare, tmp_path / "ct2", "circuit-tracer", feature_input_hook="hook_resid_pre",
                  feature_output_hook="hook_mlp_out")
    assert yaml.safe_load((out / "config.yaml").read_text())["feature_input_hook"] == \
        "hook_resid_pre"


@pytest.mark.parametrize("entry", ["../outside/tc0.safetensors", "ABS", "a/../../x.safetensors"])
def test_config_paths_outside_the_folder_are_refused(tmp_path, entry):
    tc = perturbed(arch="plt")
    out = save_as(tc, FULL, tmp_path / "ct", "circuit-tracer")
    (tmp_path / "outside").mkdir()
    (out / "layer_0.safetensors").rename(tmp_path / "outside" / "tc0.safetensors")
    (tmp_path / "x.safetensors").write_bytes((tmp_path / "outside" / "tc0.safetensors")
                                              .read_bytes())
    (out / "a").mkdir()
    first = str(tmp_path / "outside" / "tc0.safetensors") if entry == "ABS" else entry
    edit_yaml(out / "config.yaml", lambda c: c["transcoders"].__setitem__(0, first))
    fails(lambda: load_any(out), "config.yaml: field 'transcoders' lists", "outside the folder",
          "allow_external_paths")
    fails(lambda: convert(out, tmp_path / "dst", "clt-eval"), "outside the folder")
    assert not (tmp_path / "dst").exists()
    assert_same(tc, load_any(out, allow_external_paths=True)[0])
