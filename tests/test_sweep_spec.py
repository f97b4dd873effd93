"""Sweep specs: parsing in three formats, expansion, and one-line errors on bad input."""

import json

import pytest

from clt_eval.errors import CltEvalError
from clt_eval.training.sweep_spec import load_spec, log_grid, parse_spec

TOML = """
name = "t"
[train]
steps = 50
[matched_l0]
targets = [1.0, 2.0]
[[grid]]
arch = ["plt", "clt"]
penalty = ["l1", "tanh"]
decoder_norm = ["concatenated", "summed"]
sparsity_coef = { log = [0.01, 1.0, 3] }
seeds = 2
[[grid]]
penalty = "topk"
k = [1, 2]
"""


def test_toml_spec_expands_to_the_product_of_its_grids(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(TOML)
    spec = load_spec(path)
    runs = spec.runs()
    assert len(runs) == 2 * 2 * 2 * 3 * 2 + 2
    assert spec.train.steps == 50 and spec.matched_l0.targets == (1.0, 2.0)
    assert sorted({r.sparsity_coef for r in runs if r.penalty == "l1"}) == [0.01, 0.1, 1.0]
    topk = [r for r in runs if r.penalty == "topk"]
    assert {r.decoder_norm for r in topk} == {"none"}  # the block's own default
    assert {r.arch for r in topk} == {"clt"}


def test_yaml_and_json_specs_parse_to_the_same_runs(tmp_path):
    import tomllib

    import yaml

    data = tomllib.loads(TOML)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "s.json").write_text(json.dumps(data))
    (tmp_path / "s.toml").write_text(TOML)
    runs = [load_spec(tmp_path / f"s.{ext}").runs() for ext in ("toml", "yaml", "json")]
    assert runs[0] == runs[1] == runs[2]


def test_default_spec_ships_with_the_package_and_has_enough_runs():
    spec = load_spec()
    n_grid = len(spec.runs())
    m = spec.matched_l0
    assert n_grid >= 800
    assert len({r.n_features for r in spec.runs()}) >= 5  # a width sweep
    assert any(r.cross_layer_coef > 0 for r in spec.runs())  # a mitigation of our own
    assert m is not None and len(m.targets) == 3


def test_log_grid_spans_the_range_evenly_in_log_space():
    g = log_grid({"log": [0.001, 1.0, 4]}, "x")
    assert g == pytest.approx((0.001, 0.01, 0.1, 1.0))


@pytest.mark.parametrize("data, needle", [
    ({"grid": [{"arch": ["plt"], "colour": 1}]}, "grid[0]: unknown key(s) ['colour']"),
    ({"grid": [{"arch": []}]}, "grid[0].arch: empty grid; expected at least one value; "
                               "allowed: 'plt', 'clt'"),
    ({"grid": [{"arch": ["mlp"]}]}, "grid[0].arch: 'mlp' is not allowed; allowed: 'plt', 'clt'"),
    ({"grid": [{"sparsity_coef": {"log": [0.0, 1.0, 3]}}]}, "a log grid needs finite numbers > 0"),
    ({"grid": [{"sparsity_coef": {"log": [-1, 1.0, 3]}}]}, "grid[0].sparsity_coef.log"),
    ({"grid": [{"penalty": "topk", "k": 2, "decoder_norm": "summed"}]},
     "decoder_norm='summed' with penalty='topk'"),
    ({"grid": [{"n_features": 0}]}, "n_features=0: expected a positive integer"),
    ({"grid": [{"penalty": ["l1", "topk"]}]}, "put them in separate grid blocks"),
    ({"grid": []}, "grid: expected a non-empty list"),
    ({"grid": [{}], "speed": 3}, "spec: unknown key(s) ['speed']"),
    ({"grid": [{}], "train": {"stepz": 3}}, "train: unknown key(s) ['stepz']"),
    ({"grid": [{}], "matched_l0": {"targets": []}}, "matched_l0.targets: empty grid"),
    ({"grid": [{"seeds": 0}]}, "grid[0].seeds=0: expected an integer in 1..100000"),
    ({"grid": [{"seeds": 10**9}]}, "grid[0].seeds=1000000000: expected an integer in 1.."),
    ({"grid": [{"seed": ["a"]}]}, "grid[0].seed: 'a' is not a seed; expected an integer in "
                                 "0..2**63-1"),
    ({"grid": [{"seed": [0.5]}]}, "grid[0].seed: 0.5 is not a seed"),
    ({"grid": [{"seed": [-1]}]}, "grid[0].seed: -1 is not a seed"),
    ({"grid": [{"seed": [2**63]}]}, "grid[0].seed: 9223372036854775808 is not a seed"),
    ({"grid": [{"seed": [True]}]}, "grid[0].seed: True is not a seed"),
    ({"grid": [{"skip": "no"}]}, "grid[0].skip: 'no' is str; expected true or false"),
    ({"grid": [{"n_features": "16"}]}, "grid[0].n_features: '16' is str; expected an integer"),
    ({"grid": [{"n_features": [2.0]}]}, "grid[0].n_features: 2.0 is float; expected an integer"),
    ({"grid": [{"sparsity_coef": ["0.1"]}]}, "grid[0].sparsity_coef: '0.1' is str"),
    ({"grid": [{"sparsity_coef": [[0.1]]}]}, "grid[0].sparsity_coef: [0.1] is list"),
    ({"grid": [{"k": True, "penalty": "topk"}]}, "grid[0].k: True is bool; expected an integer"),
    ({"grid": [{"label": ["x"]}]}, "grid[0].label=['x']: expected a string"),
    ({"grid": [{"n_features": list(range(1, 500)), "seeds": 500}]},
     "grid[0]: expands to 249500 runs; expected at most 100000"),
    ({"grid": [{"sparsity_coef": {"log": [0.1, 1.0, 10**8]}}]}, "n=100000000; expected an "
                                                                "integer in 1..10000"),
    ({"grid": [{}], "train": {"steps": True}}, "train.steps: True is bool; expected an integer"),
    ({"grid": [{}], "train": {"lr": "1e-3"}}, "train.lr: '1e-3' is str; expected a number"),
    ({"grid": [{}], "matched_l0": {"targets": [True]}}, "matched_l0.targets: True is bool"),
    ({"grid": [{}], "matched_l0": {"seeds": 2.5}}, "matched_l0.seeds: 2.5 is float"),
])
def test_bad_specs_fail_in_one_line_naming_the_key(data, needle):
    with pytest.raises(CltEvalError) as exc:
        parse_spec(data)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg


def test_unreadable_spec_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("grid = [")
    with pytest.raises(CltEvalError, match="bad.toml: not valid TOML"):
        load_spec(bad)
    txt = tmp_path / "spec.txt"
    txt.write_text("")
    with pytest.raises(CltEvalError, match="unknown spec format '.txt'"):
        load_spec(txt)
    with pytest.raises(CltEvalError, match="no such spec file"):
        load_spec(tmp_path / "missing.toml")
