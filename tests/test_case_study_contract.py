"""The shared contract every registered case study must meet (GUIDE §8.8)."""

import pytest
import torch

import case_studies  # noqa: F401  (registers the built-in case studies)
from clt_eval.case_study import case_study_names, load_case_study
from clt_eval.errors import CltEvalError

NAMES = sorted(case_study_names())


def test_at_least_one_case_study_is_registered():
    assert "boolean_two_step" in NAMES
    assert all(isinstance(d, str) and d for d in case_study_names().values())


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    study = load_case_study(request.param)
    return request.param, study, study.model()


def test_model_is_hooked_root_module(loaded):
    from transformer_lens import HookedRootModule

    name, study, model = loaded
    assert study.name == name
    assert isinstance(model, HookedRootModule)


def test_hooks_exist_and_layer_counts_agree(loaded):
    _, study, model = loaded
    assert study.n_layers == len(study.input_hooks) == len(study.output_hooks)
    for hook in (*study.input_hooks, *study.output_hooks):
        assert hook in model.hook_dict, hook


def test_ground_truth_is_well_formed(loaded):
    _, study, model = loaded
    layers = study.ground_truth()
    assert layers
    for g in layers:
        assert 0 <= g.layer < study.n_layers
        assert g.hook in model.hook_dict, g.hook
        assert g.directions_GD.shape == (len(g.names), study.d_model)
        assert len(set(g.names)) == len(g.names)
    gt_layers = {g.layer for g in layers}
    assert study.middle_layer in gt_layers and study.output_layer in gt_layers


def test_circuit_edges_connect_known_nodes(loaded):
    _, study, _ = loaded
    circuit = study.circuit()
    nodes = set(circuit.nodes)
    assert len(nodes) == len(circuit.nodes)
    assert circuit.edges
    for src, dst in circuit.edges:
        assert src in nodes and dst in nodes, (src, dst)
    for node, layer in circuit.node_layers.items():
        assert node in nodes
        assert -1 <= layer < study.n_layers
    # Every ground-truth feature is a node of the circuit.
    for g in study.ground_truth():
        assert set(g.names) <= nodes


def test_middle_layer_precedes_output_layer(loaded):
    _, study, _ = loaded
    assert 0 <= study.middle_layer < study.output_layer < study.n_layers


def test_inputs_run_through_model(loaded):
    _, study, model = loaded
    inputs = study.inputs()
    n = inputs.shape[0]
    assert n > 0
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs)
        out = model(inputs)
    value = study.output_value(out)
    assert value.shape == (n,)
    assert torch.isfinite(value).all()
    for hook in (*study.input_hooks, *study.output_hooks):
        assert cache[hook].shape == (n, study.d_model), hook
    for g in study.ground_truth():
        assert cache[g.hook].shape == (n, len(g.names)), g.hook
    off = study.off_distribution_inputs(8, 0)
    assert off.shape[0] == 8
    with torch.no_grad():
        assert study.output_value(model(off)).shape == (8,)


def test_unknown_name_raises_with_allowed_names():
    with pytest.raises(CltEvalError) as info:
        load_case_study("no_such_case_study")
    message = str(info.value)
    assert "no_such_case_study" in message
    for name in NAMES:
        assert name in message
