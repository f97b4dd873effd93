"""The activation store: shards + manifest on disk, read back through a shuffle buffer,
split across ranks, resumable after a killed collection, and strict about what it holds."""

import json

import pytest
import torch

from clt_eval.errors import CltEvalError
from clt_eval.lm.activations import ActivationSource, ActivationStore
from clt_eval.lm.window import LayerWindow

META = {"model": "tiny", "corpus": "random"}


@pytest.fixture(scope="module")
def tokens():
    """16 windows of 32 random ids: 16 × 31 = 496 samples once position 0 is dropped."""
    return torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(0))


def _source(model, tokens, cache, layers=(1, 2), **kw):
    kw = {"shard_tokens": 100, "model_batch": 2, "meta": META} | kw
    return ActivationSource(model, LayerWindow(layers), tokens, cache_dir=cache, **kw)


def _files(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


def test_round_trip_and_manifest(tiny_lm, tokens, tmp_path):
    want_x, want_y = _source(tiny_lm, tokens, None).collect()  # straight from the model
    src = _source(tiny_lm, tokens, tmp_path / "acts")
    src.ensure_cache()
    store = ActivationStore(tmp_path / "acts", batch_size=31,
                            expect={"model": "tiny", "layers": [1, 2]})
    x, y = store.collect()
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    m = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert (m["model"], m["layers"], m["corpus"], m["dtype"]) == ("tiny", [1, 2], "random",
                                                                  "float32")
    assert m["input_hooks"] == ["blocks.1.ln2.hook_normalized", "blocks.2.ln2.hook_normalized"]
    assert m["n_tokens"] == 496 == sum(s["n"] for s in m["shards"])
    # Shards of whole forward passes (2 windows = 62 samples) of at least 100 samples.
    assert [s["windows"] for s in m["shards"]] == [[0, 4], [4, 8], [8, 12], [12, 16]]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m["shards"])
    store.verify()
    shard = tmp_path / "acts" / m["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last value: same size, other content
    shard.write_bytes(bytes(data))
    with pytest.raises(CltEvalError, match=r"shard_00001\.safetensors: sha256 differs"):
        store.verify()
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(CltEvalError, match=r"shard_00001\.safetensors: \d+ bytes, the manifest "
                       r"says \d+ bytes"):
        store.collect()


def test_shuffled_batches_are_deterministic_and_cover_each_pass(tiny_lm, tokens, tmp_path):
    _source(tiny_lm, tokens, tmp_path / "acts").ensure_cache()
    store = ActivationStore(tmp_path / "acts", batch_size=31, shuffle_buffer=150)
    first = [next_x for next_x, _ in _take(store.batches(seed=1), 16)]
    again = [next_x for next_x, _ in _take(store.batches(seed=1), 16)]
    other = [next_x for next_x, _ in _take(store.batches(seed=2), 16)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    x_all, _ = store.collect()
    key = lambda t: t[:, 0, 0].sort().values  # noqa: E731
    assert torch.equal(key(torch.cat(first)), key(x_all))  # 16 × 31: every sample once
    # The buffer mixes samples across shards: a batch is not one shard's run of rows.
    shard_of = {float(v): i // 124 for i, v in enumerate(x_all[:, 0, 0])}
    assert len({shard_of[float(v)] for v in first[0][:, 0, 0]}) > 1


def _take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_rank_shards_are_disjoint_and_cover_the_global_batch(tiny_lm, tokens, tmp_path, world):
    _source(tiny_lm, tokens, tmp_path / "acts").ensure_cache()
    store = ActivationStore(tmp_path / "acts", batch_size=32, shuffle_buffer=100)
    whole = _take(store.batches(seed=3), 5)
    parts = [_take(store.batches(seed=3, rank=r, world=world), 5) for r in range(world)]
    for step, (gx, gy) in enumerate(whole):
        xs = [parts[r][step][0] for r in range(world)]
        assert all(len(x) == 32 // world for x in xs)
        assert torch.equal(torch.cat(xs), gx)  # in rank order: exactly the global batch
        assert torch.equal(torch.cat([parts[r][step][1] for r in range(world)]), gy)
    with pytest.raises(CltEvalError, match="batch_size=32: not divisible by the world size 3"):
        next(store.batches(rank=0, world=3))


def test_killed_collection_resumes_after_its_last_finished_shard(tiny_lm, tokens, tmp_path,
                                                                  monkeypatch):
    full = _source(tiny_lm, tokens, tmp_path / "full")
    full.ensure_cache()
    src = _source(tiny_lm, tokens, tmp_path / "acts")
    calls = []

    def dies_in_the_fifth_pass(tokens_BP):
        calls.append(1)
        if len(calls) == 5:  # shards 0 and 1 (2 passes each) are done, shard 2 half-way
            (src.partial_dir / ".shard_00002.safetensors.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return ActivationSource.run_model(src, tokens_BP)

    monkeypatch.setattr(src, "run_model", dies_in_the_fifth_pass)
    with pytest.raises(KeyboardInterrupt):
        src.ensure_cache()
    assert not (tmp_path / "acts").exists()  # nothing that looks like a finished store
    progress = json.loads((src.partial_dir / "progress.json").read_text())
    assert [s["windows"] for s in progress["shards"]] == [[0, 4], [4, 8]]
    again = _source(tiny_lm, tokens, tmp_path / "acts")
    manifest = again.ensure_cache()
    assert again.forward_passes == 4  # windows 8..16 only, 2 per pass
    assert not again.partial_dir.exists()
    assert sorted(p.name for p in (tmp_path / "acts").iterdir()) == [
        "manifest.json", *(f"shard_{i:05d}.safetensors" for i in range(4))]
    ref = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["shards"] == ref["shards"]  # byte for byte the uninterrupted store


def test_mismatched_manifest_is_one_line_and_writes_nothing(tiny_lm, tokens, tmp_path):
    _source(tiny_lm, tokens, tmp_path / "acts").ensure_cache()
    before = _files(tmp_path)
    for kw, field in (({"layers": (1, 3)}, "layers"),
                      ({"meta": {"model": "other", "corpus": "random"}}, "model"),
                      ({"dtype": torch.bfloat16}, "dtype")):
        with pytest.raises(CltEvalError, match=rf"acts/manifest\.json: cache was built with "
                           rf"{field}=") as exc:
            _source(tiny_lm, tokens, tmp_path / "acts", **kw).collect()
        assert "\n" not in str(exc.value)
    with pytest.raises(CltEvalError, match=r"manifest\.json: cache was built with "
                       r"output_hooks=.*asks for output_hooks=\[\"x\"\]"):
        ActivationStore(tmp_path / "acts", expect={"output_hooks": ["x"]})
    assert _files(tmp_path) == before


def test_partial_collection_of_something_else_is_left_alone(tiny_lm, tokens, tmp_path,
                                                            monkeypatch):
    src = _source(tiny_lm, tokens, tmp_path / "acts")
    calls = []

    def dies(tokens_BP):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return ActivationSource.run_model(src, tokens_BP)

    monkeypatch.setattr(src, "run_model", dies)
    with pytest.raises(KeyboardInterrupt):
        src.ensure_cache()
    before = _files(tmp_path)
    with pytest.raises(CltEvalError, match=r"\.acts\.partial/progress\.json: cache was built "
                       r"with layers=\[1, 2\], this run asks for layers=\[0, 2\]"):
        _source(tiny_lm, tokens, tmp_path / "acts", layers=(0, 2)).ensure_cache()
    assert _files(tmp_path) == before


def test_collection_killed_just_before_its_rename_finishes_without_the_model(tiny_lm, tokens,
                                                                             tmp_path):
    first = _source(tiny_lm, tokens, tmp_path / "acts")
    first.ensure_cache()
    (tmp_path / "acts").rename(first.partial_dir)  # every shard and the manifest written
    again = _source(tiny_lm, tokens, tmp_path / "acts")
    assert again.ensure_cache()["n_tokens"] == 496 and again.forward_passes == 0
    assert [p.name for p in tmp_path.iterdir()] == ["acts"]
