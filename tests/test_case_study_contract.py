"""The shared contract every registered case study must meet (docs/case_studies.md)."""

import pytest
import torch

from clt_eval.case_study import (
    case_study_names,
    case_study_targets,
    load_case_study,
    middle_layers,
    output_layer,
    steps,
)
from clt_eval.contract import check_case_study
from clt_eval.errors import CltEvalError

NAMES = sorted(case_study_targets())
# Trained in-package (cached after the first build): covered by its own tests.
HEAVY = {"two_hop_transformer"}


def test_built_in_case_studies_register_through_entry_points():
    assert "boolean_two_step" in NAMES
    assert all(isinstance(d, str) and d for d in case_study_names().values())


@pytest.fixture(scope="module", params=[n for n in NAMES if n not in HEAVY])
def loaded(request):
    study = load_case_study(request.param)
    return request.param, study, study.model()


def test_contract_check_passes(loaded):
    name, study, _ = loaded
    check_case_study(study, name)


def test_model_is_hooked_root_module(loaded):
    from transformer_lens import HookedRootModule

    name, study, model = loaded
    assert study.name == name
    assert isinstance(model, HookedRootModule)


def test_steps_are_ordered_and_end_in_the_output(loaded):
    _, study, _ = loaded
    layers = [g.layer for g in steps(study)]
    assert layers == sorted(layers) and len(layers) >= 2
    assert output_layer(study) == layers[-1]
    assert middle_layers(study) == layers[:-1]


def test_circuit_edges_go_forward(loaded):
    _, study, _ = loaded
    circuit = study.circuit()
    for src, dst in circuit.edges:
        assert circuit.node_layers[src] < circuit.node_layers[dst], (src, dst)
    for g in study.ground_truth():
        assert set(g.names) <= set(circuit.nodes)


def test_inputs_run_through_model(loaded):
    _, study, model = loaded
    inputs = study.inputs()
    with torch.no_grad():
        value = study.output_value(model(inputs))
        off = study.output_value(model(study.off_distribution_inputs(8, 0)))
    assert value.shape == (inputs.shape[0],) and torch.isfinite(value).all()
    assert off.shape == (8,)


def test_unknown_name_raises_with_allowed_names():
    with pytest.raises(CltEvalError) as info:
        load_case_study("no_such_case_study")
    message = str(info.value)
    assert "no_such_case_study" in message
    for name in NAMES:
        assert name in message


def test_a_false_batch_invariant_claim_is_refused():
    """A model that claims batch invariance but lets a sample's numbers depend on its batch
    (here: each output shifted by the batch mean) fails the contract check in one line."""
    case = load_case_study("boolean_two_step")
    model = case.model()

    class Leaky(type(model)):
        def forward(self, inputs):
            out = super().forward(inputs)
            return out + 1e-3 * out.mean(0, keepdim=True)

    leaky = Leaky.__new__(Leaky)
    leaky.__dict__ = model.__dict__
    case.model = lambda: leaky
    with pytest.raises(CltEvalError, match="declares batch_invariant"):
        check_case_study(case)
    # the honest model passes
    case.model = lambda: model
    check_case_study(case)
