"""IOI prompts, metrics and the five-patch table: plumbing on the tiny random model with a
word-level stand-in tokenizer, the metrics by hand, and (slow) the table on SmolLM2-135M."""

import math
import re

import pytest
import torch
from conftest import skip_without_smollm2

from clt_eval.errors import CltEvalError
from clt_eval.lm import ioi

TEMPLATES = ["When {A} and {B} went to the shop, {S} gave a cup to",
             "After {A} and {B} sat in the park, {S} threw a ball to"]
NAMES = ["Ann", "Bob", "Cat", "Dan", "Eve", "Fay"]


class WordTokenizer:
    """One id per word (with its leading space) or punctuation mark, ids 2.. in order of first
    sight; id 1 is left for a BOS token. Fits the tiny model's 64-token vocabulary."""

    def __init__(self, vocab: int = 64):
        self.ids: dict[str, int] = {}
        self.vocab = vocab

    def __call__(self, text: str) -> list[int]:
        out = []
        for piece in re.findall(r" ?[A-Za-z]+|[^\sA-Za-z]", text):
            if piece not in self.ids:
                self.ids[piece] = 2 + len(self.ids)
                assert self.ids[piece] < self.vocab
            out.append(self.ids[piece])
        return out


@pytest.fixture()
def spec():
    return ioi.check_spec(TEMPLATES, NAMES)


@pytest.fixture()
def data(spec):
    return ioi.build_ioi(WordTokenizer(), 40, spec, bos=1, seed=0)


# ---- templates and prompts ---------------------------------------------------------------
def test_packaged_templates_are_valid():
    spec = ioi.load_spec()
    assert len(spec.templates) >= 8 and len(spec.names) >= 20
    assert all(sorted(ioi._slots(t)) == ["A", "B", "S"] for t in spec.templates)
    assert ioi.default_templates_path().name == "ioi_templates.json"


def test_prompts_are_abb_with_bab_or_aba_sources(spec):
    enc = WordTokenizer()
    order = ioi.build_ioi(enc, 12, spec, source="order", bos=1, seed=3)
    roles = ioi.build_ioi(enc, 12, spec, source="roles", bos=1, seed=3)
    assert order.base_text == roles.base_text  # same draw for the same seed
    for k in range(12):
        base, src = order.base_NT[k].tolist(), order.source_NT[k].tolist()
        io, s = int(order.io_N[k]), int(order.s_N[k])
        assert base[0] == 1 and io != s
        # ABB: IO once, S twice, the repeat last of the three; BAB: the first two swap.
        slots = [t for t in base if t in (io, s)]
        assert slots == [io, s, s] and [t for t in src if t in (io, s)] == [s, io, s]
        assert [t for t in roles.source_NT[k].tolist() if t in (io, s)] == [io, s, io]
    assert torch.equal(order.source_answer_N, order.io_N)  # BAB: the IO is still the answer
    assert torch.equal(roles.source_answer_N, roles.s_N)  # ABA: the other name is
    assert order.pos == order.base_NT.shape[1] - 1 == len(enc(order.base_text[0]))
    # Distinct (template, IO, S) triples; a different seed draws others.
    triples = set(zip(order.template_N.tolist(), order.io_N.tolist(), order.s_N.tolist(),
                      strict=True))
    assert len(triples) == 12
    assert ioi.build_ioi(enc, 12, spec, seed=4).base_text != order.base_text


def test_split_is_disjoint_and_covers(data):
    train, test = data.split(25, seed=1)
    assert (len(train), len(test)) == (25, 15)
    assert not set(train.base_text) & set(test.base_text)
    assert sorted(train.base_text + test.base_text) == sorted(data.base_text)
    with pytest.raises(CltEvalError, match="n_train=40"):
        data.split(40)


def test_bad_templates_and_names_are_refused(spec):
    enc = WordTokenizer()
    with pytest.raises(CltEvalError, match="one token"):
        ioi.build_ioi(lambda t: enc(t.replace("Ann", "An n")), 4, spec)
    uneven = ioi.check_spec(TEMPLATES + ["When {A} met {B} , {S} waved to"], NAMES)
    with pytest.raises(CltEvalError, match="one length"):
        ioi.build_ioi(enc, 60, uneven, seed=0)
    with pytest.raises(CltEvalError, match="slots"):
        ioi.check_spec(["When {A} and {B} left, {A} said to"], NAMES)
    with pytest.raises(CltEvalError, match="source='swap'"):
        ioi.build_ioi(enc, 4, spec, source="swap")
    with pytest.raises(CltEvalError, match="n=1000"):
        ioi.build_ioi(enc, 1000, spec)
    assert ioi.single_token_names(lambda t: enc(t.replace("Ann", "An n")), NAMES) == NAMES[1:]


# ---- metrics by hand -----------------------------------------------------------------------
def test_name_logits_read_the_last_position(data):
    logits = torch.zeros(2, data.base_NT.shape[1], 64)
    part = data.take([0, 1])
    for k in range(2):
        logits[k, -1, part.io_N[k]] = 5.0 + k
        logits[k, -1, part.s_N[k]] = 1.0
        logits[k, 0, part.io_N[k]] = -100.0  # an earlier position is ignored
    assert torch.equal(ioi.name_logits(logits, part), torch.tensor([[5.0, 1.0], [6.0, 1.0]]))


def test_fldd_and_interchange_accuracy_by_hand():
    clean = torch.tensor([2.0, 4.0])  # mean LD 3
    # Patched LDs 1 and −1: mean 0, FLDD = 1 − 0/3 = 100%; one of two prefers S.
    got = ioi.score(torch.tensor([[3.0, 2.0], [0.0, 1.0]]), clean)
    assert got == {"fldd": pytest.approx(1.0), "interchange_accuracy": 0.5}
    # Fully reversed (−3 on average): FLDD 1 − (−3)/3 = 200%, every pair flips.
    got = ioi.score(torch.tensor([[0.0, 2.0], [0.0, 4.0]]), clean)
    assert got == {"fldd": pytest.approx(2.0), "interchange_accuracy": 1.0}
    # Strengthened to LD 6: FLDD 1 − 6/3 = −100%; a tie does not count as S.
    got = ioi.score(torch.tensor([[6.0, 0.0], [6.0, 0.0]]), clean)
    assert got["fldd"] == pytest.approx(-1.0)
    assert ioi.score(torch.tensor([[1.0, 1.0]]), clean[:1])["interchange_accuracy"] == 0.0


# ---- hooks and the row/kernel split on the tiny model -----------------------------------------
def test_mlp_hook_is_what_w_out_reads(tiny_lm):
    tokens = torch.arange(12)[None] % 64
    _, cache = tiny_lm.run_with_cache(tokens)
    for layer in (0, 2):
        mlp = tiny_lm.blocks[layer].mlp
        out = cache[ioi.mlp_hook(layer)] @ mlp.W_out + mlp.b_out
        torch.testing.assert_close(out, cache[f"blocks.{layer}.hook_mlp_out"])


def test_row_and_kernel_parts_sum_to_the_direction(tiny_lm):
    v = torch.randn(64)
    v = v / v.norm()
    row, ker = ioi.split_mlp_direction(tiny_lm, 1, v)
    W = ioi.mlp_W_out(tiny_lm, 1)  # [64, 32]: a kernel of dimension 32
    torch.testing.assert_close(row + ker, v)
    assert float((ker @ W).abs().max()) < 1e-4  # the kernel part writes nothing
    assert abs(float(row @ ker)) < 1e-5
    assert math.isclose(float(row.norm() ** 2 + ker.norm() ** 2), 1.0, rel_tol=1e-5)
    assert 0.3 < float(ker.norm()) < 0.95  # a random unit vector has both parts


@pytest.mark.parametrize("start", [0, 2])
def test_last_token_runner_matches_full_passes(tiny_lm, data, start):
    from clt_eval.patching import run_patched

    runner = ioi.ioi_runner(tiny_lm, data, start_layer=start, chunk=16)  # rows over chunks
    with torch.no_grad():
        full = tiny_lm(torch.cat([data.base_NT, data.source_NT]))[:, -1:]
    rows = torch.tensor([0, 5, 39, 40, 79])
    torch.testing.assert_close(runner(rows), full[rows], atol=1e-5, rtol=1e-5)
    # A patch at or after the start block, at the last position, as with full passes.
    v = torch.randn(64)
    for hook, V in ((ioi.mlp_hook(2), v), (ioi.resid_hook(3), None)):
        want = run_patched(tiny_lm, data.base_NT, data.source_NT, hook, V, pos=-1)[:, -1]
        got = run_patched(runner, data.base_ids, data.source_ids, hook, V, pos=-1)[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(CltEvalError, match="row ids 0..79"):
        runner(torch.tensor([80]))


def test_whole_patch_of_the_last_residual_gives_the_source_logits(tiny_lm, data):
    n = tiny_lm.cfg.n_layers
    runner = ioi.ioi_runner(tiny_lm, data, start_layer=n - 1)
    patched = ioi.patched_name_logits(runner, data, ioi.resid_hook(n - 1), chunk=16)
    with torch.no_grad():
        src = ioi.name_logits(tiny_lm(data.source_NT), data)
    torch.testing.assert_close(patched, src, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ioi.clean_name_logits(runner, data, "source"), src)
    # Patching from the base itself changes nothing: FLDD 0.
    same = ioi.IoiData(data.base_NT, data.base_NT, data.io_N, data.s_N, data.io_N,
                       data.template_N, data.base_text, data.base_text, "order")
    runner = ioi.ioi_runner(tiny_lm, same, start_layer=1)
    clean = ioi.ioi_logit_diff(ioi.clean_name_logits(runner, same))
    two = ioi.patched_name_logits(runner, same, ioi.mlp_hook(1))
    assert ioi.score(two, clean)["fldd"] == pytest.approx(0.0, abs=1e-5)


def test_table_on_the_tiny_model(tiny_lm, data):
    train, test = data.split(24, seed=0)
    lines = []
    table = ioi.ioi_table(tiny_lm, train, test, layer=1, steps=6, batch_size=8,
                          log=lines.append)
    assert [r["component"] for r in table.rows] == list(ioi.COMPONENTS)
    for r in table.rows:
        assert math.isfinite(r["fldd"]) and 0.0 <= r["interchange_accuracy"] <= 1.0
        assert r["n"] == 16
    assert table.row("mlp_das")["hook"] == "blocks.1.mlp.hook_post"
    assert table.row("resid_das")["hook"] == "blocks.1.hook_resid_post"
    f = table.figures
    assert f["norm_row"] ** 2 + f["norm_kernel"] ** 2 == pytest.approx(1.0, rel=1e-5)
    assert 0.0 <= table.clean_accuracy <= 1.0 and (table.n_train, table.n_test) == (24, 16)
    assert table.markdown().count("\n") == 6 and lines[1].startswith("clean:")
    assert table.as_dict()["layer"] == 1


# ---- SmolLM2-135M (slow) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    skip_without_smollm2()
    from clt_eval.lm.models import load_model

    return load_model("smollm2-135m")


@pytest.mark.slow
def test_packaged_templates_fit_the_smollm2_tokenizer(smollm2):
    spec = ioi.load_spec()
    enc = ioi.tokenizer_encoder(smollm2.tokenizer)
    assert ioi.single_token_names(enc, spec.names) == list(spec.names)
    data = ioi.build_ioi_for_model(smollm2, 300, source="order")
    assert data.base_NT.shape[1] == 1 + 15  # BOS + the 15 tokens every template has
    # The gated MLP: hook_post is what W_out reads.
    _, cache = smollm2.run_with_cache(data.base_NT[:2])
    mlp = smollm2.blocks[15].mlp
    torch.testing.assert_close(cache[ioi.mlp_hook(15)] @ mlp.W_out + mlp.b_out,
                               cache["blocks.15.hook_mlp_out"], atol=1e-4, rtol=1e-4)
    # The last-token runner (rotary positions, grouped keys) gives the full pass's logits.
    part = data.take(torch.arange(4))
    runner = ioi.ioi_runner(smollm2, part, start_layer=20)
    with torch.no_grad():
        full = smollm2(part.base_NT)[:, -1:]
    torch.testing.assert_close(runner(part.base_ids), full, atol=2e-3, rtol=1e-4)


@pytest.mark.slow
def test_table_on_smollm2(smollm2):
    train, test = ioi.build_ioi_for_model(smollm2, 64, seed=0).split(40, seed=0)
    table = ioi.ioi_table(smollm2, train, test, layer=20, steps=10, batch_size=16)
    assert [r["component"] for r in table.rows] == list(ioi.COMPONENTS)
    assert all(math.isfinite(r["fldd"]) and math.isfinite(r["interchange_accuracy"])
               for r in table.rows)
    print(f"\nSmolLM2-135M clean IOI accuracy {table.clean_accuracy:.3f} "
          f"(mean LD {table.clean_logit_diff:.2f})\n{table.markdown()}")
    assert 0.5 < table.clean_accuracy <= 1.0  # the model does the task
    assert table.clean_logit_diff > 0
