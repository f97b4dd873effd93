"""Loading case studies: registered names (entry points), module:Factory, factory arguments,
and one-line errors for plugins that do not import or break the contract."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from clt_eval.case_study import (
    ENTRY_POINT_GROUP,
    load_case_study,
    middle_layers,
    output_layer,
    parse_name,
)
from clt_eval.errors import CltEvalError
from clt_eval.training.cli import main

# A two-step plugin written against the first contract (middle_layer/output_layer), with
# switches that break one thing each.
PLUGIN = '''
import torch
from clt_eval.case_studies.boolean_two_step import BooleanTwoStep
from clt_eval.case_study import GroundTruthLayer


class Old(BooleanTwoStep):
    name = "old_style"

    def __init__(self, break_=None):
        self.break_ = break_
        if break_ == "raise":
            raise RuntimeError("boom")

    def ground_truth(self):
        gt = super().ground_truth()
        if self.break_ == "shape":
            g = gt[0]
            gt[0] = GroundTruthLayer(g.layer, g.hook, g.names, g.directions_GD[:, :3])
        if self.break_ == "hook":
            g = gt[0]
            gt[0] = GroundTruthLayer(g.layer, "blocks.0.hook_nope", g.names, g.directions_GD)
        return gt

    def circuit(self):
        c = super().circuit()
        if self.break_ == "circuit":
            return type(c)(c.nodes, c.edges + (("ghost", c.nodes[0]),), c.node_layers)
        return c

    @property
    def input_hooks(self):
        if self.break_ == "input_hooks":
            return ("blocks.0.hook_resid_mid", "blocks.1.hook_missing")
        return ("blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid")


def not_a_factory():
    pass

NOT_CALLABLE = 3
'''


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_plugin_mod.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_plugin_mod"
    sys.modules.pop("my_plugin_mod", None)


def test_built_ins_come_from_the_entry_point_group():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert {"boolean_two_step", "boolean_chain", "boolean_superposition",
            "continuous_two_step"} <= names


def test_parse_name_reads_factory_arguments():
    assert parse_name("boolean_chain@k=4") == ("boolean_chain", {"k": 4})
    assert parse_name("pkg.mod:F@a=0.5,b=x,c=true") == ("pkg.mod:F", {"a": 0.5, "b": "x",
                                                                      "c": True})
    with pytest.raises(CltEvalError, match="key=value"):
        parse_name("boolean_chain@4")


def test_factory_arguments_reach_the_factory():
    case = load_case_study("boolean_chain@k=4")
    assert case.n_layers == 4 and middle_layers(case) == [0, 1, 2] and output_layer(case) == 3
    assert case.clt_eval_spec == "boolean_chain@k=4"  # saved with transcoders, reloads them


def test_old_contract_plugin_loads_by_module_path(plugin):
    case = load_case_study(f"{plugin}:Old", validate=True)
    assert middle_layers(case) == [0] and output_layer(case) == 1


@pytest.mark.parametrize("target, needle", [
    ("no_such_pkg.mod:F", "does not import"),
    ("{p}:Missing", "has no attribute 'Missing'"),
    ("{p}:NOT_CALLABLE", "is not callable"),
    ("{p}:Old@break_=\"raise\"", "RuntimeError: boom"),
    ("{p}:Old@break_=\"shape\"", "directions_GD has shape (4, 3); expected [4, 10]"),
    ("{p}:Old@break_=\"hook\"", "'blocks.0.hook_nope' is not a hook point"),
    ("{p}:Old@break_=\"circuit\"", "edge ('ghost'"),
    ("{p}:Old@break_=\"input_hooks\"", "'blocks.1.hook_missing' is not a hook point"),
    ("{p}:not_a_factory", "the factory returned None"),
])
def test_broken_plugins_fail_in_one_line_naming_the_field(plugin, target, needle, tmp_path,
                                                          capsys):
    target = target.format(p=plugin)
    with pytest.raises(CltEvalError, match="case study") as info:
        load_case_study(target, validate=True)
    assert needle in str(info.value) and "\n" not in str(info.value)
    out = tmp_path / "out"
    for cmd in (["reproduce", "--quick"], ["train", "--steps", "5"]):
        code = main(cmd + ["--case-study", target, "--out", str(out), "--wandb-mode",
                           "disabled"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err
        assert not out.exists()


def test_unregistered_name_lists_the_registered_ones():
    with pytest.raises(CltEvalError, match="boolean_two_step") as info:
        load_case_study("nope")
    assert "module.path:Factory" in str(info.value)


@torch.no_grad()
def test_per_layer_metrics_on_hand_built_three_step_chains():
    """boolean_chain k=3: faithful writes every step at its own layer; skip_all writes both
    later steps from layer 0; skip_last computes the middle step faithfully but writes the
    output from earlier layers."""
    from clt_eval.evaluate import evaluate

    case = load_case_study("boolean_chain@k=3")
    model = case.model()
    dec = case.analytic_decompositions()
    m = {name: evaluate(case, tc, model)[0] for name, tc in dec.items()}
    assert m["faithful"]["skip_fraction_per_layer"] == [None, 0.0, 0.0]
    assert m["faithful"]["middle_feature_recovery_per_layer"][:2] == [1.0, 1.0]
    assert m["faithful"]["middle_feature_recovery"] == 1.0
    assert m["clt_skip_all"]["skip_fraction_per_layer"][1:] == [1.0, 1.0]
    assert m["clt_skip_all"]["skip_fraction"] == 1.0
    assert m["clt_skip_last"]["skip_fraction_per_layer"][2] == pytest.approx(1.0)
    for name in dec:
        assert m[name]["output_accuracy"] == 1.0  # all reconstruct exactly
        assert m[name]["nmse"] < 1e-6
    # Interventions at both middle steps; only the faithful one tracks the true model.
    kinds = m["faithful"]["intervention_agreement_by_kind"]
    assert any(k.startswith("L0:") for k in kinds) and any(k.startswith("L1:") for k in kinds)
    assert m["faithful"]["intervention_agreement"] == 1.0
    assert m["clt_skip_all"]["intervention_agreement"] == 0.0
    assert m["faithful"]["path_depth"] == 3 and m["clt_skip_all"]["path_depth"] < 3
