"""Round trips and bad-input errors of clt_eval.io (save/load a transcoder folder)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from clt_eval import io
from clt_eval.config import TranscoderConfig
from clt_eval.errors import CltEvalError
from clt_eval.io import load_extra, load_transcoder, save_transcoder
from clt_eval.transcoder import Transcoder

L, D, F = 2, 10, 16


def make_cfg(**kw) -> TranscoderConfig:
    base = dict(d_model=D, n_layers=L, n_features=F, arch="clt", activation="relu")
    return TranscoderConfig(**{**base, **kw})


@torch.no_grad()
def perturbed(cfg: TranscoderConfig, seed: int = 0) -> Transcoder:
    """A transcoder whose every parameter and buffer differs from the fresh init, so a loader
    that silently keeps the init would fail the round trip. Masked-out decoder blocks are
    perturbed too: the file stores the masked decoder, which must act the same."""
    tc = Transcoder([cfg])
    g = torch.Generator().manual_seed(seed)
    for p in tc.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    if cfg.activation == "batchtopk":  # the only activation that stores and reads it
        tc.batchtopk_threshold.copy_(torch.rand(tc.batchtopk_threshold.shape, generator=g) * 0.1)
    return tc.eval()


def saved(tmp_path, cfg=None, name="tc"):
    cfg = cfg or make_cfg()
    return save_transcoder(perturbed(cfg), tmp_path / name)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


# ---- round trips -------------------------------------------------------------------------
CASES = [
    dict(activation="relu"),
    dict(activation="jumprelu"),
    dict(activation="topk", k=2),
    dict(activation="batchtopk", k=2),
    dict(activation="relu", arch="plt"),
    dict(activation="jumprelu", arch="plt", skip=True),
    dict(activation="topk", k=2, skip=True),
    dict(activation="batchtopk", k=2, arch="plt", skip=True),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_round_trip_is_exact(tmp_path, kw):
    cfg = make_cfg(**kw)
    tc = perturbed(cfg)
    out = save_transcoder(tc, tmp_path / "tc", extra={"step": 7})
    back = load_transcoder(out)
    assert back.cfg == cfg and back.n_runs == 1 and not back.training
    want = tc.state_dict()
    got = back.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    x = torch.randn(5, L, D, generator=torch.Generator().manual_seed(1))
    a, b = tc(x), back(x)
    for field in ("pre_RBLF", "acts_RBLF", "recon_RBLD"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert load_extra(out) == {"step": 7}
    assert leftovers(tmp_path) == ["tc"]


def test_folder_contents(tmp_path):
    out = saved(tmp_path, make_cfg(activation="jumprelu", skip=True))
    assert leftovers(out) == ["config.json", "weights.safetensors"]
    data = json.loads((out / "config.json").read_text())
    assert data["format"] == "clt-eval" and data["version"] == 1 and data["extra"] == {}
    tensors = safetensors.torch.load_file(str(out / "weights.safetensors"))
    assert {k: list(v.shape) for k, v in tensors.items()} == {
        "W_enc": [L, D, F], "b_enc": [L, F], "W_dec_0": [F, L, D], "W_dec_1": [F, L - 1, D],
        "b_dec": [L, D], "W_skip": [L, D, D], "log_threshold": [L, F]}


# ---- saving ------------------------------------------------------------------------------
def test_save_ensemble_rejected(tmp_path):
    tc = Transcoder([make_cfg(), make_cfg()])
    with pytest.raises(CltEvalError, match="single run"):
        save_transcoder(tc, tmp_path / "tc")
    assert leftovers(tmp_path) == []


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_transcoder(perturbed(make_cfg()), tmp_path / "tc")
    assert leftovers(tmp_path) == []


def test_failed_save_keeps_old_folder(tmp_path, monkeypatch):
    out = saved(tmp_path, make_cfg(activation="relu"))
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save_transcoder(perturbed(make_cfg(activation="topk", k=2)), out)
    assert leftovers(tmp_path) == ["tc"]
    assert load_transcoder(out).cfg.activation == "relu"


def test_save_replaces_existing_folder(tmp_path):
    out = saved(tmp_path, make_cfg(activation="relu"))
    new = perturbed(make_cfg(activation="jumprelu"), seed=3)
    save_transcoder(new, out, extra={"v": 2})
    back = load_transcoder(out)
    assert back.cfg.activation == "jumprelu"
    assert torch.equal(back.log_threshold, new.log_threshold)
    assert load_extra(out) == {"v": 2}
    assert leftovers(tmp_path) == ["tc"]


def test_save_refuses_to_delete_unrelated_folder(tmp_path):
    (tmp_path / "tc").mkdir()
    (tmp_path / "tc" / "notes.txt").write_text("keep me")
    with pytest.raises(CltEvalError, match=r"tc: exists and holds other files \['notes.txt'\]"):
        save_transcoder(perturbed(make_cfg()), tmp_path / "tc")
    assert (tmp_path / "tc" / "notes.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == ["tc"]


def test_save_bad_extra_writes_nothing(tmp_path):
    with pytest.raises(CltEvalError, match="extra is not JSON-serialisable"):
        save_transcoder(perturbed(make_cfg()), tmp_path / "tc", extra={"x": object()})
    assert leftovers(tmp_path) == []


def test_save_creates_parent_folders(tmp_path):
    out = saved(tmp_path, name="a/b/tc")
    assert load_transcoder(out).cfg == make_cfg()


# ---- bad input ---------------------------------------------------------------------------
def edit_config(folder, fn):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def edit_weights(folder, fn):
    path = folder / "weights.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    fn(tensors)
    safetensors.torch.save_file(tensors, str(path))


def test_missing_folder(tmp_path):
    with pytest.raises(CltEvalError, match=r"nope: missing; expected a clt-eval"):
        load_transcoder(tmp_path / "nope")


def test_missing_config(tmp_path):
    out = saved(tmp_path)
    (out / "config.json").unlink()
    msg = f"{out}/config.json: missing; expected a clt-eval transcoder folder"
    with pytest.raises(CltEvalError) as err:
        load_transcoder(out)
    assert str(err.value) == msg


def test_invalid_json(tmp_path):
    out = saved(tmp_path)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CltEvalError, match=r"config\.json: not valid JSON"):
        load_transcoder(out)
    with pytest.raises(CltEvalError, match=r"config\.json: not valid JSON"):
        load_extra(out)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update(format="sae-lens"), "field 'format' is 'sae-lens', expected 'clt-eval'"),
    (lambda d: d.pop("format"), "field 'format' is None"),
    (lambda d: d.update(version=2), "field 'version' is 2, expected 1"),
    (lambda d: d.pop("transcoder"), "missing field 'transcoder'"),
    (lambda d: d.update(extra=[1]), "field 'extra' must be a JSON object"),
    (lambda d: d["transcoder"].update(activation="gelu"), "activation='gelu' is not one of"),
    (lambda d: d["transcoder"].update(n_layers=0), "n_layers=0: expected a positive integer"),
    (lambda d: d["transcoder"].update(colour="red"), "unknown key(s) ['colour']"),
    (lambda d: d["transcoder"].pop("d_model"), "d_model"),
    (lambda d: d.update(transcoder=[1, 2]), "expected a JSON object for TranscoderConfig"),
    # Wrong JSON types: a truthy string must not switch the skip map on, and true/false or a
    # numeric string are not numbers.
    (lambda d: d["transcoder"].update(skip="no"), "skip='no': expected true or false"),
    (lambda d: d["transcoder"].update(skip=0), "skip=0: expected true or false"),
    (lambda d: d["transcoder"].update(d_model=True), "d_model=True: expected a positive integer"),
    (lambda d: d["transcoder"].update(n_features="16"), "n_features='16': expected a positive"),
    (lambda d: d["transcoder"].update(jumprelu_bandwidth=True),
     "jumprelu_bandwidth=True: expected a number, not a boolean"),
    (lambda d: d["transcoder"].update(jumprelu_threshold_init="0.1"),
     "jumprelu_threshold_init='0.1': expected a finite number >= 0"),
    (lambda d: d["transcoder"].update(arch=["clt"]), "arch=['clt'] is not one of"),
])
def test_bad_config_fields(tmp_path, edit, needle):
    out = saved(tmp_path)
    edit_config(out, edit)
    with pytest.raises(CltEvalError) as err:
        load_transcoder(out)
    msg = str(err.value)
    assert msg.startswith(f"{out}/config.json: ") and needle in msg and "\n" not in msg


def test_missing_weights(tmp_path):
    out = saved(tmp_path)
    (out / "weights.safetensors").unlink()
    with pytest.raises(CltEvalError, match=r"weights\.safetensors: missing"):
        load_transcoder(out)


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not safetensors"])
def test_unreadable_weights(tmp_path, content):
    out = saved(tmp_path)
    (out / "weights.safetensors").write_bytes(content)
    with pytest.raises(CltEvalError, match=r"weights\.safetensors: not a readable safetensors"):
        load_transcoder(out)


def test_missing_tensor(tmp_path):
    out = saved(tmp_path, make_cfg(activation="jumprelu"))
    edit_weights(out, lambda t: t.pop("log_threshold"))
    with pytest.raises(CltEvalError, match=r"weights\.safetensors: missing tensor\(s\) "
                       r"\['log_threshold'\]"):
        load_transcoder(out)


def test_unexpected_tensor(tmp_path):
    out = saved(tmp_path, make_cfg(activation="relu"))
    edit_weights(out, lambda t: t.update(W_skip=torch.zeros(L, D, D)))
    with pytest.raises(CltEvalError, match=r"weights\.safetensors: unexpected tensor\(s\) "
                       r"\['W_skip'\]"):
        load_transcoder(out)


def test_wrong_shape(tmp_path):
    out = saved(tmp_path)
    edit_weights(out, lambda t: t.update(W_dec_0=torch.zeros(12, L, D)))
    with pytest.raises(CltEvalError) as err:
        load_transcoder(out)
    assert str(err.value) == (
        f"{out}/weights.safetensors: tensor 'W_dec_0' has shape [12, 2, 10], expected "
        "[16, 2, 10] from config.json (n_layers=2, n_features=16, d_model=10)")


def test_wrong_dtype(tmp_path):
    out = saved(tmp_path)
    edit_weights(out, lambda t: t.update(b_dec=torch.zeros(L, D, dtype=torch.int64)))
    with pytest.raises(CltEvalError, match=r"weights\.safetensors: tensor 'b_dec' has dtype"):
        load_transcoder(out)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite(tmp_path, value):
    out = saved(tmp_path)

    def poison(t):
        t["b_enc"][1, 3] = value

    edit_weights(out, poison)
    with pytest.raises(CltEvalError, match=r"weights\.safetensors: tensor 'b_enc' has 1 "
                       r"non-finite value"):
        load_transcoder(out)


def test_expected_shapes_match_transcoder():
    """The on-disk names are the Transcoder's attribute names, minus the run dim."""
    cfg = make_cfg(activation="batchtopk", k=2, skip=True)
    tc = Transcoder([cfg])
    for name, shape in io.expected_shapes(cfg).items():
        assert list(getattr(tc, name).shape) == [1, *shape]
