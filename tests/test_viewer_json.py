"""The graph JSON for circuit-tracer's local viewer and Neuronpedia: every field circuit-tracer's
create_graph_files writes (metadata, qParams, nodes, links), with its types and id scheme, and
ids consistent between nodes and links."""

from __future__ import annotations

import json
import re

import pytest
import torch

from clt_eval.config import TranscoderConfig
from clt_eval.lm import graph as G
from clt_eval.lm.attribution import attribute
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

# The fields circuit-tracer writes, with their JSON types (None: null allowed).
METADATA = {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list,
            "prompt": str, "node_threshold": (float, type(None))}
QPARAMS = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str,
           "sg_pos": str}
NODE = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str,
        "token_prob": float, "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int,
        "jsNodeId": str, "clerp": str, "influence": (float, type(None)),
        "activation": (float, type(None))}
LINK = {"source": str, "target": str, "weight": float}
TYPES = {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}


def check_fields(obj: dict, spec: dict, where: str) -> None:
    assert set(obj) == set(spec), f"{where}: keys {sorted(obj)} != {sorted(spec)}"
    for key, typ in spec.items():
        v = obj[key]
        ok = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
        if typ is float:  # JSON has one number type; an integral weight may come back as int
            ok = isinstance(v, int | float) and not isinstance(v, bool)
        assert ok, f"{where}: field {key!r} = {v!r}, expected {typ}"


def validate_viewer_json(data: dict, n_model_layers: int, n_pos: int) -> None:
    """Every check a reader of circuit-tracer's graph files relies on."""
    json.dumps(data, allow_nan=False)  # plain JSON, no NaN
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    check_fields(data["metadata"], METADATA, "metadata")
    assert all(isinstance(t, str) for t in data["metadata"]["prompt_tokens"])
    assert len(data["metadata"]["prompt_tokens"]) == n_pos
    check_fields(data["qParams"], QPARAMS, "qParams")
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)), "node ids must be unique"
    for n in data["nodes"]:
        check_fields(n, NODE, n["node_id"])
        assert n["feature_type"] in TYPES and 0 <= n["ctx_idx"] < n_pos
        kind, layer = n["feature_type"], n["layer"]
        if kind == "cross layer transcoder":
            assert re.fullmatch(rf"{layer}_{n['feature']}_{n['ctx_idx']}", n["node_id"])
            assert 0 <= int(layer) < n_model_layers and isinstance(n["activation"], float)
            assert n["jsNodeId"] == f"{layer}_{n['feature']}-0"
        elif kind == "mlp reconstruction error":
            assert n["node_id"] in (f"0_{layer}_{n['ctx_idx']}", f"err_{layer}_{n['ctx_idx']}")
            assert n["feature"] == -1 and 0 <= int(layer) < n_model_layers
        elif kind == "embedding":
            assert layer == "E" and n["node_id"] == f"E_{n['jsNodeId'][2:].split('-')[0]}_" \
                f"{n['ctx_idx']}" and n["feature"] == n["ctx_idx"]
        else:
            assert layer == str(n_model_layers + 1) and n["ctx_idx"] == n_pos - 1
            assert n["node_id"] == f"{layer}_{n['feature']}_{n['ctx_idx']}"
            assert 0 < n["token_prob"] <= 1 and n["clerp"].startswith("Output ")
        if n["influence"] is not None:
            assert 0 <= n["influence"] <= 1 + 1e-6  # a cumulative share
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    known = set(ids)
    linked = set()
    for link in data["links"]:
        check_fields(link, LINK, "link")
        assert link["source"] in known and link["target"] in known, link
        assert link["weight"] != 0
        linked |= {link["source"], link["target"]}
    kinds = {n["node_id"]: n["feature_type"] for n in data["nodes"]}
    for node_id, kind in kinds.items():  # only embeddings and logits may stand alone
        assert node_id in linked or kind in ("embedding", "logit"), node_id
    assert not any(kinds[link["source"]] == "logit" for link in data["links"])
    assert not any(kinds[link["target"]] in ("embedding", "mlp reconstruction error")
                   for link in data["links"])


def _tc(arch, layers) -> Transcoder:
    cfg = TranscoderConfig(d_model=32, n_layers=len(layers), n_features=16, arch=arch)
    tc = Transcoder([cfg])
    with torch.no_grad():
        tc.b_enc.fill_(-0.2)
        for W in tc.decoder_params():
            W.mul_(30)
    return tc.eval()


@pytest.mark.parametrize("arch, layers", [("clt", (0, 1, 2, 3)), ("plt", (1, 2))])
def test_viewer_json_has_circuit_tracers_fields(tiny_lm, tmp_path, arch, layers):
    tokens = torch.randint(0, 64, (7,), generator=torch.Generator().manual_seed(3))
    g = attribute(tiny_lm, _tc(arch, layers), LayerWindow(layers), tokens, max_logits=4)
    path = G.save_viewer_json(g, tmp_path / "g.viewer.json", 0.9, 0.98, scan="my-scan")
    data = json.loads(path.read_text())
    validate_viewer_json(data, 4, len(tokens))
    assert data["metadata"]["scan"] == "my-scan" and data["metadata"]["slug"] == "g"
    feats = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feats and {int(n["layer"]) for n in feats} <= set(layers)  # model layers
    # Link weights are the graph's direct effects.
    ids = {g.node_id(i): i for i in range(g.n_nodes)}
    by_viewer = {}
    for i in range(g.n_nodes):
        k, ly, p = g.kind[i], g.layer[i], g.position[i]
        vid = {"feature": f"{ly}_{g.feature[i]}_{p}", "error": f"0_{ly}_{p}",
               "embedding": f"E_{g.token[i]}_{p}", "logit": f"5_{g.token[i]}_{p}"}[k]
        by_viewer.setdefault(vid, i)
    for link in data["links"][:50]:
        s, t = by_viewer.get(link["source"]), by_viewer.get(link["target"])
        if s is not None and t is not None and g.kind[s] != "error":
            assert link["weight"] == pytest.approx(float(g.A_NN[t, s]))
    assert ids  # the graph had nodes to map


def test_error_ids_never_collide_with_features():
    """circuit-tracer names an error node 0_<layer>_<pos>, as it names the layer-0 feature
    <layer> at <pos>; both kept, the error node gets another id."""
    kinds = ["feature", "error", "embedding", "logit"]
    A = torch.zeros(4, 4)
    A[0, 2], A[3, 0], A[3, 1] = 1.0, 2.0, 1.0
    g = G.AttributionGraph(kind=kinds, layer=[0, 1, -1, 2], tc_layer=[0, -1, -1, -1],
                           position=[1, 1, 1, 1], feature=[1, -1, -1, -1],
                           activation=[0.5, 1.0, 1.0, 0.9], token=[-1, -1, 4, 7], A_NN=A,
                           prompt_tokens=[3, 4], prompt_strs=["a", "b"],
                           meta={"n_model_layers": 2, "logit_strs": ["c"]})
    data = g.to_viewer_json(1.0, 1.0)
    ids = sorted(n["node_id"] for n in data["nodes"])
    assert ids == ["0_1_1", "3_7_1", "E_4_1", "err_1_1"]
    validate_viewer_json(data, 2, 2)
