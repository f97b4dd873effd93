"""Malformed inputs through the real CLI: every loader and the sweep-spec parser.

Each case builds a valid input (a transcoder folder in clt-eval, circuit-tracer or sae_lens
format, or a sweep spec in TOML/YAML/JSON), breaks it in one way, and runs
``clt_eval.training.cli.main`` in-process. The promise for bad input: exit code 2, exactly
one stderr line ``clt-eval: error: ...``, no output folder, and a pickle is never loaded.

The breakages are listed or drawn from a fixed seed, so the cases are the same every run.
The builders and mutations live in benchmarks/bench_bad_inputs.py (the wider battery that
also covers faulty environments), loaded from there so the two cannot drift apart.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_bad_inputs",
                                               ROOT / "benchmarks" / "bench_bad_inputs.py")
B = importlib.util.module_from_spec(_spec)
sys.modules.setdefault(_spec.name, B)  # its dataclasses look their module up there
_spec.loader.exec_module(B)

SEED = 20240601  # fixed: the drawn mutations are the same in every run
N_RANDOM_SPECS = 45
N_RANDOM_CONFIGS = 30

# Cases known to fail, each with the file to fix (strict: once fixed they pass, and the mark
# must go). None today.
KNOWN: dict[str, str] = {}


def _xfail(case_id: str):
    reason = KNOWN.get(case_id)
    return pytest.param(case_id, marks=pytest.mark.xfail(strict=True, reason=reason)) \
        if reason else case_id


def run_cli(argv, capsys) -> tuple[int, list[str]]:
    from clt_eval.training.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def assert_promise(rc, lines, tmp_path: Path, out: Path | None) -> None:
    assert rc == 2, f"rc={rc}, stderr={lines}"
    assert len(lines) == 1, lines
    assert lines[0].startswith("clt-eval: error: "), lines
    assert not (tmp_path / B.MARKER).exists(), "a pickle payload was loaded"
    if out is not None:
        assert not out.exists(), f"{out} was written"


@pytest.fixture(autouse=True)
def _no_training(monkeypatch):
    """A spec that slipped through would start a sweep: fail loudly instead of training."""
    import clt_eval.training.sweep as sweep

    def refuse(*a, **kw):
        raise AssertionError("a malformed spec reached run_sweep")
    monkeypatch.setattr(sweep, "run_sweep", refuse)


# ---- transcoder folders: tensors and files ---------------------------------------------------
FOLDER_CASES = [f"{kind}|tensor|{m}" for kind in B.FOLDERS for m in B.tensor_mutations()] + [
    f"{kind}|{target}|{m}" for kind in B.FOLDERS for target in ("weights", "config")
    for m in ("truncated-half", "truncated-8", "empty", "garbage", "missing", "a-folder",
              "pickle", "bad-utf8")]


def _break_folder(src: Path, kind: str, target: str, mutation: str, tmp_path: Path) -> None:
    if target == "tensor":
        B._rewrite(B.weight_files(src)[0], B.tensor_mutations()[mutation])
        return
    path = B.weight_files(src)[0] if target == "weights" else src / B.CONFIG_FILES[kind]
    B.file_mutations(tmp_path / B.MARKER)[mutation](path)


@pytest.mark.parametrize("case_id", [_xfail(c) for c in FOLDER_CASES])
def test_broken_transcoder_folder_fails_in_one_line(case_id, tmp_path, capsys):
    kind, target, mutation = case_id.split("|")
    src = B.FOLDERS[kind](tmp_path / "src")
    _break_folder(src, kind, target, mutation, tmp_path)
    out = tmp_path / "out"
    rc, lines = run_cli(["convert", src, out, "--to", "clt-eval"], capsys)
    assert_promise(rc, lines, tmp_path, out)


def test_float16_weights_load_as_their_exact_float32_values(tmp_path, capsys):
    """A half-precision file is not malformed: it converts, and every value survives."""
    import safetensors.torch
    import torch

    src = B.native_folder(tmp_path / "src")
    path = B.weight_files(src)[0]
    half = {k: v.half() for k, v in safetensors.torch.load_file(str(path)).items()}
    safetensors.torch.save_file(half, str(path))
    rc, lines = run_cli(["convert", src, tmp_path / "out", "--to", "clt-eval"], capsys)
    assert rc == 0 and lines == []
    back = safetensors.torch.load_file(str(tmp_path / "out" / "weights.safetensors"))
    for name, t in half.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], t.float()), name


# ---- transcoder folders: config files ----------------------------------------------------------
CONFIG_TABLES = {"native": B.NATIVE_CONFIG, "ct-clt": B.CT_CONFIG, "ct-set": B.CT_SET_CONFIG,
                 "sae-lens": B.SAE_CONFIG}
CONFIG_CASES = [f"{kind}|{name}" for kind, table in CONFIG_TABLES.items() for name in table]


@pytest.mark.parametrize("case_id", [_xfail(c) for c in CONFIG_CASES])
def test_broken_config_fails_in_one_line(case_id, tmp_path, capsys):
    kind, name = case_id.split("|")
    src = B.FOLDERS[kind](tmp_path / "src")
    B._config_mutation(kind, CONFIG_TABLES[kind][name])(src)
    out = tmp_path / "out"
    rc, lines = run_cli(["convert", src, out, "--to", "clt-eval"], capsys)
    assert_promise(rc, lines, tmp_path, out)


# Values that no field of the given type accepts.
BAD_VALUES = {
    "int": ["16", 1.5, True, [4], {"n": 4}, None, -3],
    "float": ["0.1", True, [0.1], None, float("nan")],
    "bool": ["no", "true", 0, 1, None, [True]],
    "choice": [3, True, "nope", ["clt"], None],
}
TRANSCODER_FIELDS = {"d_model": "int", "n_layers": "int", "n_features": "int", "skip": "bool",
                     "arch": "choice", "activation": "choice", "topk_mode": "choice",
                     "jumprelu_bandwidth": "float", "jumprelu_threshold_init": "float"}


def _random_config_cases() -> list[str]:
    rng = random.Random(SEED)
    cases = []
    for _ in range(N_RANDOM_CONFIGS):
        field = rng.choice(sorted(TRANSCODER_FIELDS))
        value = rng.choice(BAD_VALUES[TRANSCODER_FIELDS[field]])
        cases.append(f"{field}={json.dumps(value)}")
    return list(dict.fromkeys(cases))


@pytest.mark.parametrize("case_id", [_xfail(c) for c in _random_config_cases()])
def test_random_wrong_types_in_config_json_fail_in_one_line(case_id, tmp_path, capsys):
    field, value = case_id.split("=", 1)
    src = B.native_folder(tmp_path / "src")
    B._edit_json(src / "config.json", B._tc(lambda t: t | {field: json.loads(value)}))
    out = tmp_path / "out"
    rc, lines = run_cli(["convert", src, out, "--to", "clt-eval"], capsys)
    assert_promise(rc, lines, tmp_path, out)


@pytest.mark.parametrize("case_id", [_xfail(f"evaluate|{c}") for c in B.EVALUATE_CONFIG])
def test_evaluate_refuses_configs_that_do_not_fit_their_case_study(case_id, tmp_path, capsys):
    name = case_id.split("|")[1]
    src = B.native_folder(tmp_path / "src")
    B._config_mutation("native", B.EVALUATE_CONFIG[name])(src)
    before = sorted(p.name for p in src.iterdir())
    rc, lines = run_cli(["evaluate", src], capsys)
    assert_promise(rc, lines, tmp_path, None)
    assert sorted(p.name for p in src.iterdir()) == before  # no metrics.json


@pytest.mark.parametrize("dims", [{"d_model": 7}, {"n_layers": 3}, {"n_layers": 1}])
def test_evaluate_refuses_a_transcoder_shaped_for_another_case_study(dims, tmp_path, capsys):
    src = B.native_folder(tmp_path / "src", **dims)  # consistent in itself
    rc, lines = run_cli(["evaluate", src], capsys)
    assert_promise(rc, lines, tmp_path, None)
    name = next(iter(dims))
    assert f"{name}={dims[name]} but case study 'boolean_two_step' has {name}=" in lines[0]
    assert not (src / "metrics.json").exists()


# ---- pickles are refused, never loaded --------------------------------------------------------
@pytest.mark.parametrize("layout", ["pickle-only", "as-clt-eval-weights", "as-sae-lens-weights",
                                    "as-circuit-tracer-weights", "as-config"])
def test_a_pickle_payload_is_never_loaded(layout, tmp_path, capsys):
    marker = tmp_path / B.MARKER
    src = tmp_path / "src"
    if layout == "pickle-only":
        src.mkdir()
        B.write_payload(src / "pytorch_model.bin", marker)
    else:
        kind = {"as-clt-eval-weights": "native", "as-sae-lens-weights": "sae-lens",
                "as-circuit-tracer-weights": "ct-clt", "as-config": "native"}[layout]
        B.FOLDERS[kind](src)
        target = src / "config.json" if layout == "as-config" else B.weight_files(src)[0]
        B.write_payload(target, marker)
    for argv in (["convert", src, tmp_path / "out", "--to", "clt-eval"], ["evaluate", src]):
        rc, lines = run_cli(argv, capsys)
        assert_promise(rc, lines, tmp_path, tmp_path / "out")
        assert not marker.exists()


# ---- sweep specs ----------------------------------------------------------------------------
SPEC_CASES = [f"{fmt}|{name}" for fmt in ("toml", "yaml", "json") for name in B.SPEC_MUTATIONS]


def _run_spec(data_or_text, fmt: str, tmp_path: Path, capsys):
    path = tmp_path / f"spec.{fmt}"
    text = data_or_text if isinstance(data_or_text, str) else B.spec_text(data_or_text, fmt)
    path.write_text(text)
    out = tmp_path / "out"
    rc, lines = run_cli(["sweep", path, "--out", out], capsys)
    assert_promise(rc, lines, tmp_path, out)


@pytest.mark.parametrize("case_id", [_xfail(c) for c in SPEC_CASES])
def test_broken_sweep_spec_fails_in_one_line(case_id, tmp_path, capsys):
    fmt, name = case_id.split("|")
    _run_spec(B.SPEC_MUTATIONS[name](B.BASE_SPEC), fmt, tmp_path, capsys)


RUN_FIELD_KINDS = {"arch": "choice", "penalty": "choice", "decoder_norm": "choice",
                   "sparsity_coef": "float", "n_features": "int", "skip": "bool",
                   "tanh_scale": "float", "preact_coef": "float", "cross_layer_coef": "float",
                   "jumprelu_bandwidth": "float", "topk_mode": "choice"}
SEED_BAD = [["a"], [0.5], [-1], [2**64], [True], "0", [[0]]]
TRAIN_BAD = {"steps": ["5", 2.5, True, -1, None], "lr": ["1e-3", True, None, -1.0],
             "batch_size": [1.5, "0", False]}


def _random_spec_cases() -> list[str]:
    """Each draw breaks one thing a valid spec has, so every draw must be refused."""
    rng = random.Random(SEED + 1)
    cases = []
    for _ in range(N_RANDOM_SPECS):
        fmt, what = rng.choice(["toml", "yaml", "json"]), rng.randrange(5)
        if what == 0:
            field = rng.choice(sorted(RUN_FIELD_KINDS))
            value = rng.choice(BAD_VALUES[RUN_FIELD_KINDS[field]])
            # A list is a grid of values in a spec: a list of lists is what no field takes.
            change = ["grid", field, [value] if isinstance(value, list) else value]
        elif what == 1:
            change = ["grid", "seed", rng.choice(SEED_BAD)]
        elif what == 2:
            field = rng.choice(sorted(TRAIN_BAD))
            change = ["train", field, rng.choice(TRAIN_BAD[field])]
        elif what == 3:
            change = ["drop", rng.choice(["grid"]), None]
        else:
            change = [rng.choice(["top", "grid", "train"]), f"unknown_{rng.randrange(99)}", 1]
        if fmt == "toml" and None in (change[2],) and change[0] != "drop":
            fmt = "json"  # TOML has no null
        cases.append(f"{fmt}|{json.dumps(change)}")
    return list(dict.fromkeys(cases))


def _apply(change: list) -> dict:
    where, key, value = change
    data = json.loads(json.dumps(B.BASE_SPEC))
    if where == "drop":
        del data[key]
    elif where == "top":
        data[key] = value
    elif where == "train":
        data["train"][key] = value
    else:
        data["grid"][0][key] = value
        if key == "seed":
            data["grid"][0].pop("seeds")
    return data


@pytest.mark.parametrize("case_id", [_xfail(c) for c in _random_spec_cases()])
def test_random_spec_mutations_fail_in_one_line(case_id, tmp_path, capsys):
    fmt, change = case_id.split("|", 1)
    _run_spec(_apply(json.loads(change)), fmt, tmp_path, capsys)


@pytest.mark.parametrize("fmt,text", [("toml", "grid = ["), ("yaml", "grid: ["),
                                      ("json", '{"grid": '), ("yaml", "- 1\n- 2\n"),
                                      ("json", "null"), ("toml", "\xff")])
def test_unparsable_spec_files_fail_in_one_line(fmt, text, tmp_path, capsys):
    _run_spec(text, fmt, tmp_path, capsys)


def test_the_base_spec_is_valid(tmp_path):
    """The mutations start from a valid spec in every format, so each failure is the
    mutation's own."""
    from clt_eval.training.sweep_spec import load_spec

    for fmt in ("toml", "yaml", "json"):
        path = tmp_path / f"spec.{fmt}"
        path.write_text(B.spec_text(B.BASE_SPEC, fmt))
        assert len(load_spec(path).runs()) == 2, fmt
    assert len(_random_spec_cases()) >= 30 and len(_random_config_cases()) >= 15


# ---- case-study plugins that break the contract -------------------------------------------
PLUGIN_BREAKS = {
    "ground-truth-ints": "def ground_truth(self):\n        return [1, 2]",
    "directions-list": "def ground_truth(self):\n        return [dataclasses.replace(g, "
                       "directions_GD=g.directions_GD.tolist()) for g in super().ground_truth()]",
    "output-value-raises": "def output_value(self, out):\n        raise RuntimeError('boom')",
    "output-value-list": "def output_value(self, out):\n        return [0.0] * out.shape[0]",
    "input-directions-list": "def input_directions(self):\n        return [[1.0]]",
    "off-distribution-raises": "def off_distribution_inputs(self, n=512, seed=0):\n"
                               "        raise ValueError('no such data')",
    "circuit-none": "def circuit(self):\n        return None",
    "n-layers-str": "n_layers = '2'",
}


@pytest.mark.parametrize("name", sorted(PLUGIN_BREAKS))
def test_a_plugin_that_breaks_the_contract_fails_in_one_line(name, tmp_path, capsys,
                                                              monkeypatch):
    module = "fuzz_plugin_" + name.replace("-", "_")
    (tmp_path / f"{module}.py").write_text(
        "import dataclasses\n"
        "from clt_eval.case_studies.boolean_two_step import BooleanTwoStep\n\n\n"
        "class Broken(BooleanTwoStep):\n    " + PLUGIN_BREAKS[name] + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    src = B.native_folder(tmp_path / "src", case_study=f"{module}:Broken")
    rc, lines = run_cli(["evaluate", src], capsys)
    assert_promise(rc, lines, tmp_path, None)
    assert f"{module}:Broken" in lines[0]
    assert not (src / "metrics.json").exists()
