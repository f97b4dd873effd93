"""The Python API mirrors the CLI: same parameter names and defaults, same files written."""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clt_eval import api
from clt_eval.errors import CltEvalError

# A grid small enough to train in about a second on the toy: both archs, one seed.
TINY = {"steps": 20, "n_features": 4, "log_every": 10}
TINY_FLAGS = ["--steps", "20", "--n-features", "4", "--log-every", "10"]


def _main(argv: list[str]) -> int:
    from clt_eval.training.cli import main

    return main(argv)


def _commands() -> dict[str, argparse.ArgumentParser]:
    from clt_eval.training.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if not isinstance(a, argparse._HelpAction)}


def test_import_clt_eval_does_not_import_torch():
    code = "import clt_eval, sys; print('torch' in sys.modules, 'wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]


def test_top_level_names_resolve_to_the_api():
    import clt_eval

    for name in ("train", "sweep", "reproduce", "load", "convert", "attribute", "graph",
                 "compare", "patch"):
        assert getattr(clt_eval, name) is getattr(api, name)
    with pytest.raises(AttributeError):
        clt_eval.no_such_function  # noqa: B018


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_command_has_an_api_function_with_its_options(command):
    """Same names, same defaults: a grid option's CLI default [v] is the API's v."""
    fn = getattr(api, command.replace("-", "_"))
    params = inspect.signature(fn).parameters
    options = _options(_commands()[command])
    assert set(params) == set(options), command
    for name, action in options.items():
        default = params[name].default
        if default is inspect.Parameter.empty:
            assert action.required or action.option_strings == [], (command, name)
            continue
        cli = action.default
        if action.nargs == "+" and isinstance(cli, list) and len(cli) == 1:
            cli = cli[0]
        assert default == cli, (command, name, default, cli)
        assert fn.__doc__, command


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The same tiny grid trained by the API and by the CLI."""
    import torch

    root = tmp_path_factory.mktemp("api")
    before = torch.get_num_threads()
    res = api.train(out=root / "api", arch=["plt", "clt"], wandb_mode="disabled", threads=1,
                    **TINY)
    assert torch.get_num_threads() == before  # `threads` holds for the call only
    assert res["results"] == (root / "api" / "results.json").absolute()
    assert _main(["train", "--out", str(root / "cli"), "--arch", "plt", "clt",
                  "--wandb-mode", "disabled", "--threads", "1", *TINY_FLAGS]) == 0
    return root


def test_train_api_equals_cli(trained):
    api_runs = json.loads((trained / "api" / "results.json").read_text())["runs"]
    cli_runs = json.loads((trained / "cli" / "results.json").read_text())["runs"]
    assert [r["run_id"] for r in api_runs] == [r["run_id"] for r in cli_runs]
    assert {r["arch"] for r in api_runs} == {"plt", "clt"}
    for a, c in zip(api_runs, cli_runs, strict=True):
        assert a["spec"] == c["spec"]
        assert a["metrics"] == c["metrics"]
        assert a["metrics"]["nmse"] > 0  # 20 steps cannot have fit the toy exactly


def test_evaluate_api_equals_cli(trained, capsys):
    capsys.readouterr()
    assert _main(["evaluate", str(trained / "cli")]) == 0
    printed = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines())
    from_api = api.evaluate(trained / "cli")
    assert sorted(printed) == sorted(from_api) and len(from_api) == 2
    for rid, text in printed.items():
        shown = json.loads(text)
        assert shown == {k: from_api[rid][k] for k in shown}


def test_convert_api_equals_cli(trained, tmp_path):
    src = next((trained / "api" / "transcoders").glob("clt-*"))
    a = api.convert(src, tmp_path / "api", "circuit-tracer")
    assert _main(["convert", str(src), str(tmp_path / "cli"), "--to", "circuit-tracer"]) == 0
    files = _files(a)
    assert files and files == _files(tmp_path / "cli")
    for rel in files:
        assert (a / rel).read_bytes() == (tmp_path / "cli" / rel).read_bytes(), rel
    tc, window = api.load(a)
    assert tc.cfg.arch == "clt" and window is not None


def _files(folder: Path) -> list[Path]:
    """Every file under ``folder`` but the job marker, which records when it was written."""
    from clt_eval.training.preflight import MARKER

    return sorted(p.relative_to(folder) for p in folder.rglob("*")
                  if p.is_file() and p.name != MARKER)


def test_load_a_native_folder(trained):
    import torch

    from clt_eval.io import load_transcoder

    folder = next((trained / "api" / "transcoders").glob("plt-*"))
    tc, window = api.load(folder)
    assert tc.cfg.arch == "plt" and (window is None or window.layers == (0, 1))
    ref = load_transcoder(folder).state_dict()
    assert list(tc.state_dict()) == list(ref)
    assert all(torch.equal(v, ref[k]) for k, v in tc.state_dict().items())


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    with pytest.raises(CltEvalError) as exc:
        api.train(out=tmp_path / "bad", arch="mlp", **TINY)
    assert "arch" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(CltEvalError, match="layers"):
        api.train(out=tmp_path / "bad", model="tiny", **TINY)
    with pytest.raises(CltEvalError, match="lambda-log"):
        api.sweep(out=tmp_path / "bad", lambda_log=(1e-3, 1e-1, 2.5))
    with pytest.raises(CltEvalError, match="list or new"):
        api.case_studies("remove")
    assert not (tmp_path / "bad").exists()


def test_another_jobs_folder_is_refused_untouched(tmp_path):
    """Like the command, the API checks its output folder before writing anything."""
    folder = tmp_path / "swept"
    folder.mkdir()
    (folder / "sweep.json").write_text("{}")
    with pytest.raises(CltEvalError) as exc:
        api.train(out=folder, wandb_mode="disabled", **TINY)
    assert "sweep.json" in str(exc.value) and "\n" not in str(exc.value)
    assert sorted(p.name for p in folder.iterdir()) == ["sweep.json"]


def test_case_studies_lists_what_the_cli_prints(capsys):
    listed = api.case_studies()
    assert "boolean_two_step" in listed
    capsys.readouterr()
    assert _main(["case-studies"]) == 0
    printed = capsys.readouterr().out
    for name, info in listed.items():
        assert name in printed and info["target"] in printed


def test_graph_and_attribute_agree_with_the_cli(tmp_path):
    """`graph` writes what the CLI writes; `attribute` returns the unpruned graph whose scores
    the written file carries."""
    import torch

    from clt_eval.config import TranscoderConfig
    from clt_eval.formats.native import save_native
    from clt_eval.lm.window import LayerWindow
    from clt_eval.transcoder import Transcoder

    torch.manual_seed(0)
    tc = Transcoder([TranscoderConfig(d_model=32, n_layers=2, n_features=8, arch="clt")])
    with torch.no_grad():
        tc.b_enc.fill_(-0.2)
        for W in tc.decoder_params():
            W.mul_(30)
    folder = save_native(tc.eval(), LayerWindow((1, 2)), tmp_path / "tc")
    opts = {"max_logits": 2, "batch_size": 4}
    paths = api.graph(folder, "tiny", "To be or not", tmp_path / "api", **opts)
    assert _main(["graph", str(folder), "--model", "tiny", "--prompt", "To be or not",
                  "--out", str(tmp_path / "cli"), "--max-logits", "2", "--batch-size",
                  "4"]) == 0
    assert paths["json"].read_bytes() == (tmp_path / "cli" / "graph.json").read_bytes()
    g = api.attribute(folder, "tiny", "To be or not", **opts)
    written = json.loads(paths["json"].read_text())
    assert g.n_nodes == written["scores"]["n_nodes_full"]
    assert g.scores["replacement"] == pytest.approx(written["scores"]["replacement"])


@pytest.mark.slow
def test_sweep_api_equals_cli(tmp_path):
    """A grid from keywords and the same grid from flags: the same runs and metrics."""
    api.sweep(out=tmp_path / "api", arch=["plt", "clt"], penalty=["l1"], sparsity_coef=[0.01],
              n_features=[4], seeds=1, steps=20, no_save_transcoders=True,
              wandb_mode="disabled")
    assert _main(["sweep", "--out", str(tmp_path / "cli"), "--arch", "plt", "clt",
                  "--penalty", "l1", "--sparsity-coef", "0.01", "--n-features", "4",
                  "--seeds", "1", "--steps", "20", "--no-save-transcoders",
                  "--wandb-mode", "disabled"]) == 0
    runs = [json.loads((tmp_path / side / "sweep.json").read_text())["runs"]
            for side in ("api", "cli")]
    assert len(runs[0]) == 2
    assert [(r["run_id"], r["metrics"]) for r in runs[0]] == \
        [(r["run_id"], r["metrics"]) for r in runs[1]]


@pytest.mark.parametrize("command", sorted(set(_commands()) - {"case-studies"}))
def test_the_command_is_a_thin_layer_over_its_function(command, monkeypatch, tmp_path):
    """Each command hands every parsed option to its API function, by name, and nothing else
    runs first: a stub that records its arguments stands in for the function."""
    seen = {}

    class Called(Exception):
        pass

    def stub(**kwargs):
        seen.update(kwargs)
        raise Called

    name = command.replace("-", "_")
    # The stub keeps the function's signature: the command asks it which options to pass.
    monkeypatch.setattr(api, name, functools.wraps(getattr(api, name))(stub))
    argv = {"reproduce": [], "train": ["--arch", "plt", "clt"], "sweep": [],
            "evaluate": [str(tmp_path)], "convert": [str(tmp_path), str(tmp_path / "d"),
                                                     "--to", "sae-lens"],
            "graph": [str(tmp_path), "--model", "tiny", "--prompt", "x"],
            "compare": [str(tmp_path), str(tmp_path), "--model", "tiny"],
            "patch": []}[command]
    with pytest.raises(Called):
        _main([command, *argv])
    options = set(_options(_commands()[command]))
    assert set(seen) == options
    if command == "train":
        assert seen["arch"] == ["plt", "clt"] and seen["steps"] == 3000
