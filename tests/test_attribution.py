"""Attribution graphs on a tiny random language model: the edges predict interventions in the
local replacement model; pruning, scores and JSON on hand-made graphs."""

import dataclasses
import json

import pytest
import torch

from clt_eval.config import TranscoderConfig
from clt_eval.errors import CltEvalError
from clt_eval.lm import graph as G
from clt_eval.lm.attribution import (
    attribute,
    build_local_replacement,
    local_forward,
    logit_targets,
    tokenize_prompt,
)
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

# (arch, window, skip): a CLT over the whole model, a skip PLT on a window of it.
SETUPS = {"clt-all": ("clt", (0, 1, 2, 3), False), "plt-window": ("plt", (1, 2), True)}


def _tc(arch, layers, skip=False, **kw) -> Transcoder:
    cfg = TranscoderConfig(d_model=32, n_layers=len(layers), n_features=16, arch=arch,
                           skip=skip, **kw)
    tc = Transcoder([cfg])
    with torch.no_grad():  # sparse-ish features whose decoders matter downstream
        tc.b_enc.fill_(-0.2)
        for W in tc.decoder_params():
            W.mul_(30)
        if skip:
            tc.W_skip.normal_(0, 0.1)
    return tc.eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request, tiny_lm, tokens):
    torch.manual_seed(0)
    arch, layers, skip = SETUPS[request.param]
    tc, window = _tc(arch, layers, skip), LayerWindow(layers)
    g = attribute(tiny_lm, tc, window, tokens, batch_size=7, conventions="clt-eval")
    return tc, window, g, build_local_replacement(tiny_lm, tc, window, tokens)


def _pre(g, pre_PLF, nodes):
    return pre_PLF[[g.position[i] for i in nodes], [g.tc_layer[i] for i in nodes],
                   [g.feature[i] for i in nodes]]


def _centred(g, logits_PV, nodes):
    last = logits_PV[-1] - logits_PV[-1].mean()
    return last[[g.token[i] for i in nodes]]


def _targets(g, pre_PLF, logits_PV):
    """Every target node's value: feature pre-activations, then centred logits."""
    feats, logits = g.mask("feature").nonzero()[:, 0], g.mask("logit").nonzero()[:, 0]
    return torch.cat([_pre(g, pre_PLF, feats), _centred(g, logits_PV, logits)]), \
        torch.cat([feats, logits])


def test_local_replacement_reproduces_the_model(tiny_lm, setup):
    tc, window, g, ctx = setup
    for acts in (ctx.acts_PLF, None):  # features held fixed, or responding
        pre, logits = local_forward(tiny_lm, tc, window, ctx, acts_PLF=acts)
        torch.testing.assert_close(logits, ctx.logits_PV, atol=1e-5, rtol=0)
        torch.testing.assert_close(pre, ctx.pre_PLF, atol=1e-5, rtol=0)
    assert g.mask("feature").sum() > 10 and g.mask("logit").sum() >= 1


def test_edges_predict_direct_effects(tiny_lm, setup):
    """Scaling one source by (1 + ε), other features fixed, moves every target by ε·A."""
    tc, window, g, ctx = setup
    eps = 0.5
    base, rows = _targets(g, *local_forward(tiny_lm, tc, window, ctx, acts_PLF=ctx.acts_PLF))
    feats = g.mask("feature").nonzero()[:, 0].tolist()
    checked = 0
    for i in feats[::4]:
        acts = ctx.acts_PLF.clone()
        acts[g.position[i], g.tc_layer[i], g.feature[i]] *= 1 + eps
        new, _ = _targets(g, *local_forward(tiny_lm, tc, window, ctx, acts_PLF=acts))
        torch.testing.assert_close(new - base, eps * g.A_NN[rows, i], atol=2e-6, rtol=1e-4)
        checked += bool(g.A_NN[rows, i].abs().max() > 1e-2)
    assert checked >= 3  # the test has teeth: some edges are far from zero
    # Error nodes and embeddings too.
    m, p = window.layers[0], 2
    err = ctx.error_MPD.clone()
    err[m, p] *= 1 + eps
    new, _ = _targets(g, *local_forward(tiny_lm, tc, window,
                                        dataclasses.replace(ctx, error_MPD=err),
                                        acts_PLF=ctx.acts_PLF))
    col = g.mask("error").nonzero()[0, 0] + m * len(g.prompt_tokens) + p
    assert g.kind[col] == "error" and (g.layer[col], g.position[col]) == (m, p)
    torch.testing.assert_close(new - base, eps * g.A_NN[rows, col], atol=2e-6, rtol=1e-4)
    emb = ctx.resid0_PD.clone()
    emb[1] *= 1 + eps
    new, _ = _targets(g, *local_forward(tiny_lm, tc, window,
                                        dataclasses.replace(ctx, resid0_PD=emb),
                                        acts_PLF=ctx.acts_PLF))
    col = g.mask("embedding").nonzero()[1, 0]
    torch.testing.assert_close(new - base, eps * g.A_NN[rows, col], atol=2e-6, rtol=1e-4)


def test_edges_predict_total_effects(tiny_lm, setup):
    """With downstream features responding, the effect is (I − J)⁻¹ A[:, s] (J = A·diag(1/a)),
    wherever no feature crosses its threshold (the linear regime)."""
    tc, window, g, ctx = setup
    eps = 0.2
    base, rows = _targets(g, *local_forward(tiny_lm, tc, window, ctx))
    acts_N, is_feat = torch.tensor(g.activation), g.mask("feature")
    n_linear = n_indirect = 0
    for i in is_feat.nonzero()[:, 0].tolist()[::3]:
        ell, p, f = g.tc_layer[i], g.position[i], g.feature[i]

        def edit(layer, a, ell=ell, p=p, f=f):
            if layer != ell:
                return a
            a = a.clone()
            a[p, f] *= 1 + eps
            return a

        pre, logits = local_forward(tiny_lm, tc, window, ctx, edit=edit)
        if bool(((pre > 0) != (ctx.pre_PLF > 0)).any()):
            continue  # a feature switched on or off: outside the linear regime
        new, _ = _targets(g, pre, logits)
        want = eps * G.total_effect(g.A_NN, acts_N, is_feat, i)[rows]
        torch.testing.assert_close(new - base, want, atol=2e-6, rtol=1e-4)
        n_linear += 1
        n_indirect += bool((want - eps * g.A_NN[rows, i]).abs().max() > 1e-2)
    assert n_linear >= 5
    if tc.cfg.arch == "clt":
        assert n_indirect >= 1  # features responding matters, and is predicted


def test_batch_size_does_not_change_the_graph(tiny_lm, tokens):
    tc, window = _tc("clt", (1, 2, 3)), LayerWindow((1, 2, 3))
    a = attribute(tiny_lm, tc, window, tokens, batch_size=1, target_tokens=[5, 7])
    b = attribute(tiny_lm, tc, window, tokens, batch_size=64, target_tokens=[5, 7])
    torch.testing.assert_close(a.A_NN, b.A_NN, atol=1e-6, rtol=1e-5)
    assert [a.token[i] for i in a.mask("logit").nonzero()[:, 0]] == [5, 7]


def test_graph_structure(setup):
    tc, window, g, ctx = setup
    P = len(g.prompt_tokens)
    assert g.mask("error").sum() == 4 * P and g.mask("embedding").sum() == P
    # Nothing flows into embeddings or error nodes, nor out of logits, nor backwards in time.
    assert not g.A_NN[g.mask("embedding") | g.mask("error")].any()
    assert not g.A_NN[:, g.mask("logit")].any()
    pos = torch.tensor(g.position)
    assert not g.A_NN[pos[:, None] < pos[None, :]].any()
    for key in ("replacement", "completeness"):
        assert 0 <= g.scores[key] <= 1
        # Counting out-of-window MLPs as inputs can only raise a score; equal on all layers.
        if window.n_layers == 4:
            assert g.scores[f"window_{key}"] == pytest.approx(g.scores[key])
        else:
            assert g.scores[key] < g.scores[f"window_{key}"] <= 1


def test_skip_first(tiny_lm, tokens):
    """Position 0 without features: its MLP outputs are error nodes, and the local replacement
    model still reproduces the model, whether features are fixed or respond."""
    tc, window = _tc("clt", (0, 1, 2, 3)), LayerWindow((0, 1, 2, 3))
    ctx = build_local_replacement(tiny_lm, tc, window, tokens, skip_first=True)
    assert not ctx.acts_PLF[0].any() and ctx.acts_PLF[1:].any()
    for acts in (ctx.acts_PLF, None):
        _, logits = local_forward(tiny_lm, tc, window, ctx, acts_PLF=acts)
        torch.testing.assert_close(logits, ctx.logits_PV, atol=1e-5, rtol=0)
    g = attribute(tiny_lm, tc, window, tokens, skip_first=True)
    assert all(p > 0 for p, k in zip(g.position, g.kind, strict=True) if k == "feature")
    assert g.meta["skip_first"] is True


def test_tokenize_prompt(tiny_lm):
    ids = tokenize_prompt(tiny_lm, "hi")  # the tiny model has no tokenizer: UTF-8 bytes
    assert ids.tolist() == [ord("h") % 64, ord("i") % 64]
    with pytest.raises(CltEvalError, match="non-empty"):
        tokenize_prompt(tiny_lm, "")


def test_logit_targets():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert logit_targets(logits, max_logits=10, logit_prob=0.75) == [0, 1]
    assert logit_targets(logits, max_logits=1, logit_prob=0.95) == [0]
    assert logit_targets(logits, target_tokens=[3]) == [3]
    with pytest.raises(CltEvalError, match="outside the vocabulary"):
        logit_targets(logits, target_tokens=[4])


# ---- scores, influence and pruning on hand-made graphs ------------------------------------
def _hand_graph():
    """Nodes [feature, error, embedding, logit]: t→f (3), f→l (2), e→l (1), t→l (1)."""
    A = torch.zeros(4, 4)
    A[0, 2], A[3, 0], A[3, 1], A[3, 2] = 3.0, 2.0, -1.0, 1.0
    kinds = ["feature", "error", "embedding", "logit"]
    w = torch.tensor([0.0, 0.0, 0.0, 1.0])
    return A, kinds, w, torch.tensor([k == "error" for k in kinds]), \
        torch.tensor([k == "embedding" for k in kinds])


def test_scores_by_hand():
    A, _, w, is_err, is_emb = _hand_graph()
    # Â's logit row: f 2/4, e 1/4, t 1/4; f's row: t 1. Influence: f .5, e .25, t .25 + .5.
    torch.testing.assert_close(G.influence(G.normalize_rows(A), w),
                               torch.tensor([0.5, 0.25, 0.75, 0.0]))
    s = G.graph_scores(A, w, is_err, is_emb)
    assert s["replacement"] == pytest.approx(0.75)  # .75 / (.75 + .25)
    # Non-error share 1 everywhere except the logit (.75); weights I + w = .5, .25, .75, 1.
    assert s["completeness"] == pytest.approx((0.5 + 0.25 + 0.75 + 0.75) / 2.5)
    A[3, 1] = 0.0  # no error input: both scores are 1
    assert G.graph_scores(A, w, is_err, is_emb) == {"replacement": 1.0, "completeness": 1.0}


def test_influence_is_the_inverse_series():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 12, generator=g).tril(-1)  # a random DAG
    w = torch.rand(12, generator=g)
    An = G.normalize_rows(A)
    want = w @ (torch.linalg.inv(torch.eye(12) - An) - torch.eye(12))
    torch.testing.assert_close(G.influence(An, w), want, atol=1e-5, rtol=1e-5)


def test_prune_by_hand():
    # t0 → f0 (strong) → logit; t1 → f1 (weak) → logit; error e → logit (weak).
    kinds = ["feature", "feature", "error", "embedding", "embedding", "logit"]
    A = torch.zeros(6, 6)
    A[0, 3], A[1, 4] = 1.0, 1.0
    A[5, 0], A[5, 1], A[5, 2] = 10.0, 0.1, 0.2
    w = torch.tensor([0, 0, 0, 0, 0, 1.0])
    node_mask, edge_mask, inf = G.prune(A, w, kinds, node_threshold=0.8, edge_threshold=0.98)
    assert node_mask.tolist() == [True, False, False, True, True, True]
    assert edge_mask[5, 0] and edge_mask[0, 3] and not edge_mask[5, 1] and not edge_mask[1, 4]
    assert not (edge_mask & (A == 0)).any()
    node_mask, edge_mask, _ = G.prune(A, w, kinds, node_threshold=1.0, edge_threshold=1.0)
    assert node_mask.all() and (edge_mask == (A != 0)).all()
    with pytest.raises(CltEvalError, match="node_threshold"):
        G.prune(A, w, kinds, node_threshold=1.5)


def test_cycle_is_an_error():
    A = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(CltEvalError, match="cycle"):
        G.influence(A, torch.tensor([1.0, 0.0]))


# ---- files ------------------------------------------------------------------------------------
def test_json_round_trip(setup, tmp_path):
    _, _, g, _ = setup
    path = G.save_graph(g, tmp_path / "g.json", torch.arange(g.n_nodes, dtype=torch.float))
    back = G.load_graph(path)
    assert [back.node_id(i) for i in range(back.n_nodes)] == \
        [g.node_id(i) for i in range(g.n_nodes)]
    for name in ("kind", "layer", "tc_layer", "position", "feature", "token", "prompt_tokens"):
        assert getattr(back, name) == getattr(g, name)
    torch.testing.assert_close(back.A_NN, g.A_NN, atol=0, rtol=0)
    assert back.scores == g.scores and back.meta == json.loads(json.dumps(g.meta))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]  # no temporary left


def test_write_graph_prunes_and_draws(setup, tmp_path):
    from clt_eval.training.graph_plot import write_graph

    _, _, g, _ = setup
    paths = write_graph(g, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert 0 < len(data["nodes"]) <= g.n_nodes
    assert {"replacement", "completeness", "pruned_replacement", "pruned_completeness"} \
        <= set(data["scores"])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["graph.json", "graph.png", "graph.viewer.json"]
    assert paths["png"].stat().st_size < 300_000


def test_bad_input_is_one_line(tiny_lm, tokens):
    for tc, window, needle in (
            (_tc("clt", (1, 2)), LayerWindow((1, 2, 3)), "n_layers=2"),
            (_tc("clt", (1, 2)), LayerWindow((1, 9)), "window layers [9]"),
            (_tc("clt", (1, 2)), LayerWindow((1, 2), output_hook="blocks.{layer}.nope"),
             "'blocks.1.nope'")):
        with pytest.raises(CltEvalError) as exc:
            attribute(tiny_lm, tc, window, tokens)
        assert needle in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(CltEvalError, match="1-D tensor"):
        attribute(tiny_lm, _tc("clt", (1, 2)), LayerWindow((1, 2)), tokens[None])


def test_make_graph_writes_files_or_nothing(tmp_path):
    """`clt-eval graph`'s job: a saved windowed transcoder, a model by name, a prompt."""
    from clt_eval.formats.native import save_native
    from clt_eval.training.graph_plot import make_graph

    good = save_native(_tc("clt", (1, 2)), LayerWindow((1, 2)), tmp_path / "good")
    paths = make_graph(good, "tiny", "To be or not", tmp_path / "out", max_logits=3)
    data = json.loads(paths["json"].read_text())
    assert data["meta"]["prompt"] == "To be or not" and data["meta"]["skip_first"] is True
    assert len([n for n in data["nodes"] if n["kind"] == "logit"]) <= 3
    narrow = Transcoder([TranscoderConfig(d_model=16, n_layers=2, n_features=4)])
    for folder, window, needle in (
            ("d16", LayerWindow((1, 2)), "d_model=16"),
            ("far", LayerWindow((2, 7)), "window layers [7]"),
            ("hook", LayerWindow((1, 2), input_hook="blocks.{layer}.mlp.hook_nope"),
             "'blocks.1.mlp.hook_nope'")):
        tc = narrow if folder == "d16" else _tc("clt", (1, 2))
        path = save_native(tc, window, tmp_path / folder)
        with pytest.raises(CltEvalError) as exc:
            make_graph(path, "tiny", "To be", tmp_path / f"out-{folder}")
        assert needle in str(exc.value) and "\n" not in str(exc.value)
        assert not (tmp_path / f"out-{folder}").exists()


# ---- conventions: circuit-tracer's (default) and clt-eval's earlier ones -------------------
def test_circuit_tracer_convention_zeroes_position_0(tiny_lm, tokens):
    """circuit-tracer's convention: no features at position 0 and its error nodes carry no
    edges; every other edge is the one clt-eval's skip_first graph has (gradients do not depend
    on what the constants are), and the local replacement model still reproduces the model."""
    tc, window = _tc("clt", (0, 1, 2, 3)), LayerWindow((0, 1, 2, 3))
    ct = attribute(tiny_lm, tc, window, tokens, target_tokens=[5, 7])
    old = attribute(tiny_lm, tc, window, tokens, target_tokens=[5, 7], conventions="clt-eval",
                    skip_first=True)
    assert ct.meta["conventions"] == "circuit-tracer" and ct.meta["zero_first_errors"] is True
    assert ct.kind == old.kind and ct.position == old.position
    first_err = torch.tensor([k == "error" and p == 0 for k, p in zip(ct.kind, ct.position,
                                                                     strict=True)])
    assert first_err.sum() == 4 and old.A_NN[:, first_err].abs().sum() > 1e-3
    assert not ct.A_NN[:, first_err].any()
    torch.testing.assert_close(ct.A_NN[:, ~first_err], old.A_NN[:, ~first_err], atol=0, rtol=0)
    # Taking the error at position 0 out of the graph can only raise the replacement score.
    assert ct.scores["replacement"] >= old.scores["replacement"]
    ctx = build_local_replacement(tiny_lm, tc, window, tokens, True, True)
    _, logits = local_forward(tiny_lm, tc, window, ctx, acts_PLF=ctx.acts_PLF)
    torch.testing.assert_close(logits, ctx.logits_PV, atol=1e-5, rtol=0)
    keep = attribute(tiny_lm, tc, window, tokens, target_tokens=[5], skip_first=False)
    assert any(p == 0 for p, k in zip(keep.position, keep.kind, strict=True) if k == "feature")
    with pytest.raises(CltEvalError, match="conventions='anthropic'"):
        attribute(tiny_lm, tc, window, tokens, conventions="anthropic")


def test_prune_conventions_by_hand():
    """circuit-tracer ranks token nodes too: a token with a strong direct edge to the logit
    takes most of the node threshold's share, so the weaker feature f1 is cut; ranking only
    features and errors (clt-eval's earlier convention) keeps it."""
    kinds = ["feature", "feature", "embedding", "embedding", "embedding", "logit"]
    A = torch.zeros(6, 6)
    A[0, 2], A[1, 3] = 1.0, 1.0  # t0 -> f0, t1 -> f1
    A[5, 0], A[5, 1], A[5, 4] = 3.0, 2.0, 15.0  # f0, f1, t2 -> logit
    w = torch.tensor([0, 0, 0, 0, 0, 1.0])
    # Influence: t2 .75, f0 = t0 .15, f1 = t1 .10. All nodes: .75 + .15 reaches 0.8 of 1.25
    # only with t0 (cumulative .6, .72, .84), so the cut-off is .15; features only: 0.8 of .25
    # needs both features.
    ct, _, inf = G.prune(A, w, kinds, 0.8, 1.0)
    torch.testing.assert_close(inf, torch.tensor([0.15, 0.10, 0.15, 0.10, 0.75, 0.0]))
    assert ct.tolist() == [True, False, True, True, True, True]
    old, _, _ = G.prune(A, w, kinds, 0.8, 1.0, conventions="clt-eval")
    assert old.tolist() == [True] * 6


# ---- the Python API: Graph and attribute(transcoder, model, prompt) -----------------------
def test_graph_api(tiny_lm, tmp_path, capsys):
    from clt_eval.formats.native import save_native

    tc, window = _tc("clt", (1, 2)), LayerWindow((1, 2))
    g = G.attribute(tc, tiny_lm, "To be or not", window=window, max_logits=3, progress=True)
    assert isinstance(g, G.Graph) and g.meta["prompt"] == "To be or not"
    assert "attribution" in capsys.readouterr().err  # the progress bar, on stderr
    assert g.adjacency is g.A_NN and len(g.nodes) == g.n_nodes
    assert {"id", "kind", "layer", "feature", "activation"} <= set(g.nodes[0])
    small = g.prune(0.5, 0.9)
    assert isinstance(small, G.Graph) and 0 < small.n_nodes < g.n_nodes
    assert small.scores["n_nodes_pruned"] == small.n_nodes and "pruned_replacement" in small.scores
    back = G.from_json(json.loads(json.dumps(small.to_json())))
    assert [back.node_id(i) for i in range(back.n_nodes)] == \
        [small.node_id(i) for i in range(small.n_nodes)]
    # A path (any format load_any reads) and a model object give the same graph.
    path = save_native(tc, window, tmp_path / "tc")
    again = G.attribute(str(path), tiny_lm, g.prompt_tokens, max_logits=3)
    torch.testing.assert_close(again.A_NN, g.A_NN, atol=0, rtol=0)
    assert again.meta["transcoder_path"] == str(path)


def test_many_prompts_resume(tmp_path):
    """One graph per prompt; a rerun keeps the finished ones (not recomputed, not rewritten)
    and computes only the new or edited prompts."""
    from clt_eval.formats.native import save_native
    from clt_eval.training.graph_plot import make_graphs, prompt_folder, read_prompts

    good = save_native(_tc("clt", (1, 2)), LayerWindow((1, 2)), tmp_path / "tc")
    (tmp_path / "prompts.txt").write_text("To be\n\nor not\n")
    prompts = read_prompts(tmp_path / "prompts.txt")
    assert prompts == ["To be", "or not"]
    out = tmp_path / "graphs"
    first = make_graphs(good, "tiny", prompts, out, max_logits=2)
    assert (first["computed"], first["kept"]) == (2, 0)
    done = out / prompt_folder(0, "To be") / "graph.json"
    stamp, text = done.stat().st_mtime_ns, done.read_text()
    again = make_graphs(good, "tiny", [*prompts, "again"], out, max_logits=2)
    assert (again["computed"], again["kept"]) == (1, 2)
    assert done.stat().st_mtime_ns == stamp and done.read_text() == text
    index = json.loads((out / "graphs.json").read_text())["graphs"]
    assert [e["resumed"] for e in index] == [True, True, False]
    assert sorted(p.name for p in (out / index[2]["folder"]).iterdir()) == \
        ["graph.json", "graph.png", "graph.viewer.json"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    with pytest.raises(CltEvalError, match="no prompts"):
        (tmp_path / "empty.txt").write_text("\n")
        read_prompts(tmp_path / "empty.txt")
