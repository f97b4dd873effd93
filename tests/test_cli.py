"""The command line: bad input gives one line and exit 2 with nothing written; the main job
runs end to end on --quick."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clt_eval.training.cli import main


def _run(args, capsys):
    """Exit code and stderr lines; a usage error (argparse exits) counts as its exit code."""
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("args, needle", [
    (["--penalty", "bogus"], "--penalty: invalid choice: 'bogus'"),
    (["--activation", "sigmoid"], "--activation: invalid choice: 'sigmoid'"),
    (["--decoder-norm", "max"], "--decoder-norm: invalid choice: 'max'"),
    (["--sparsity-coef", "-0.1"], "sparsity_coef=-0.1"),
    (["--sparsity-coef", "nan"], "sparsity_coef=nan"),
    (["--penalty", "topk", "--decoder-norm", "summed"], "decoder_norm='summed'"),
    (["--n-features", "0"], "n_features=0"),
    (["--n-features", "-5"], "n_features=-5"),
    (["--steps", "-1"], "steps=-1"),
    (["--seed", "1.5"], "seed='1.5'"),
    (["--seed", "-1"], "seed=-1"),
    (["--seed", "99999999999999999999"], "seed=99999999999999999999"),
    (["--k", "0"], "k=0"),
    (["--lr", "inf"], "lr=inf"),
    (["--lambda-warmup-frac", "2"], "lambda_warmup_frac=2"),
    (["--threads", "0"], "threads=0"),
    (["--device", "tpu"], "--device 'tpu': unknown device"),
    (["--dtype", "float16"], "--dtype: invalid choice: 'float16'"),
    (["--case-study", "nope", "--decoder-norm", "summed"], "case study 'nope'"),
])
def test_train_bad_input_one_line_exit_2_nothing_written(args, needle, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(["train", "--out", str(out), "--wandb-mode", "disabled"] + args, capsys)
    assert code == 2
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--wandb-mode", "sometimes"], "--wandb-mode: invalid choice: 'sometimes'"),
    (["--seeds", "0"], "seeds"),
    (["--steps", "0"], "steps"),
])
def test_reproduce_bad_config_one_line_exit_2_nothing_written(args, needle, tmp_path, capsys):
    code, err = _run(["reproduce", "--out", str(tmp_path / "o")] + args, capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_evaluate_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _run(["evaluate", str(tmp_path / "empty")], capsys)
    assert code == 2 and len(err) == 1 and "config.json" in err[0]
    assert list((tmp_path / "empty").iterdir()) == []


def test_evaluate_rejects_wrong_shaped_weights(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    from clt_eval.config import TranscoderConfig
    from clt_eval.io import save_transcoder
    from clt_eval.transcoder import Transcoder

    d = tmp_path / "tc"
    save_transcoder(Transcoder([TranscoderConfig(d_model=10, n_layers=2, n_features=4)]), d,
                    extra={"case_study": "boolean_two_step"})
    tensors = load_file(d / "weights.safetensors")
    tensors["W_enc"] = torch.zeros(2, 10, 5)
    save_file(tensors, d / "weights.safetensors")
    code, err = _run(["evaluate", str(d)], capsys)
    assert code == 2 and len(err) == 1 and "W_enc" in err[0]
    assert not (d / "metrics.json").exists()


def test_help_does_not_import_heavy_libraries():
    code = ("import sys, training.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformer_lens', 'sae_lens', 'wandb') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_case_studies_lists_the_toy(capsys):
    assert main(["case-studies"]) == 0
    assert "boolean_two_step" in capsys.readouterr().out


def test_reproduce_quick_end_to_end(tmp_path, capsys):
    """Two worker processes, whatever the machine's load: the forked paths end to end (the
    report's plots are drawn in two of them)."""
    out = tmp_path / "repro"
    assert main(["reproduce", "--quick", "--out", str(out), "--wandb-mode", "offline",
                 "--threads", "2"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["arch"] for r in runs} == {"plt", "clt"}
    for r in runs:
        assert {"arch", "penalty", "decoder_norm", "sparsity_coef", "seed", "metrics"} <= set(r)
        m = r["metrics"]
        for key in ("nmse", "l0_per_layer", "l0_total", "middle_feature_recovery",
                    "skip_fraction", "intervention_agreement", "output_accuracy"):
            assert key in m
        assert len(m["l0_per_layer"]) == 2
        assert (out / "transcoders" / r["run_id"] / "weights.safetensors").exists()
        if r["arch"] == "plt":  # a PLT has no cross-layer decoder, so it cannot skip
            assert m["skip_fraction"] in (0.0, None)
    analytic = json.loads((out / "analytic_costs.json").read_text())
    assert analytic["faithful"]["costs"]["l1/concatenated"] == pytest.approx(1.5)
    report = (out / "report.md").read_text()
    assert "matched L0" in report and "Analytic sparsity costs" in report
    assert "Attribution graphs against the true circuit" in report
    for png in ("phase_l0.png", "circuit.png"):
        assert (out / png).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "PLT skip" in printed  # the headline, printed
    _check_headline_l0(printed, out)
    assert list((out / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    # Re-evaluating a saved transcoder reproduces the metrics recorded at training time.
    rid = runs[0]["run_id"]
    assert main(["evaluate", str(out / "transcoders" / rid)]) == 0
    again = json.loads((out / "transcoders" / rid / "metrics.json").read_text())
    assert again["nmse"] == pytest.approx(runs[0]["metrics"]["nmse"], rel=1e-4, abs=1e-7)
    assert again["skip_fraction"] == runs[0]["metrics"]["skip_fraction"]


def test_train_refuses_duplicate_runs(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(["train", "--out", str(out), "--seed", "0", "0"], capsys)
    assert code == 2 and len(err) == 1 and "duplicated" in err[0]
    assert not out.exists()


def test_convert_round_trips_and_rejects_bad_input_in_one_line(tmp_path, capsys):
    import torch

    from clt_eval.config import TranscoderConfig
    from clt_eval.formats import load_any, save_as
    from clt_eval.lm.window import LayerWindow
    from clt_eval.training.cli import main
    from clt_eval.transcoder import Transcoder

    tc = Transcoder([TranscoderConfig(d_model=8, n_layers=3, n_features=5, arch="clt")])
    src = save_as(tc, LayerWindow((2, 3, 4)), tmp_path / "src", "clt-eval")
    assert main(["convert", str(src), str(tmp_path / "ct"), "--to", "circuit-tracer",
                 "--n-model-layers", "5"]) == 0
    assert main(["convert", str(src), str(tmp_path / "same"), "--to", "clt-eval"]) == 0
    back, window = load_any(tmp_path / "same")
    assert window.layers == (2, 3, 4)
    assert torch.equal(back.masked_W_dec(), tc.masked_W_dec())
    # Converting again onto the same folder replaces it (convert owns it).
    assert main(["convert", str(src), str(tmp_path / "same"), "--to", "clt-eval"]) == 0
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "x"), "--to", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clt-eval: error:") and "onnx" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("spec, flags, needle", [
    ('[[grid]]\narch = ["plt", "mlp"]\n', [], "grid[0].arch: 'mlp' is not allowed; allowed: "
                                              "'plt', 'clt'"),
    ('[[grid]]\npenalty = "topk"\nk = 1\ndecoder_norm = "summed"\n', [],
     "decoder_norm='summed' with penalty='topk'"),
    ('[[grid]]\n', ["--lambda-log", "0", "1", "3"], "a log grid needs finite numbers > 0"),
    ('[[grid]]\nn_features = [0]\n', [], "n_features=0: expected a positive integer"),
    ('[[grid]]\nwidth = [8]\n', [], "unknown key(s) ['width']"),
])
def test_sweep_bad_input_exits_2_in_one_line_and_starts_nothing(tmp_path, capsys, spec, flags,
                                                                needle):
    from clt_eval.training.cli import main

    path = tmp_path / "spec.toml"
    path.write_text(spec)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("flags, needle", [
    (["--model", "gpt2", "--layers", "1"], "model='gpt2': cannot be loaded offline"),
    (["--model", "tiny"], "--layers: required with --model"),
    (["--model", "tiny", "--layers", "9"], "9"),
])
def test_train_on_a_model_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, flags, needle):
    out = tmp_path / "out"
    assert main(["train", *flags, "--out", str(out), "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not out.exists()


def test_compare_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "nope_plt"), str(tmp_path / "nope_clt"),
                 "--model", "tiny", "--out", str(out), "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope_plt" in err and "\n" not in err
    assert not out.exists()


def test_sweep_from_flags_trains_exactly_the_runs_its_flags_describe(tmp_path):
    out = tmp_path / "grid"
    assert main(["sweep", "--arch", "plt", "clt", "--penalty", "tanh", "--lambda-log", "0.1",
                 "1", "2", "--seeds", "2", "--steps", "20", "--out", str(out),
                 "--wandb-mode", "disabled", "--no-save-transcoders"]) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["runs"]) == 2 * 2 * 2  # arch × λ × seeds, no matched-L0 search
    assert data["matched_l0"] is None


@pytest.mark.parametrize("args, needle", [
    (["train", "--seed", "1.5"], "--seed: seed='1.5': expected an integer >= 0"),
    (["convert", "a"], "required: dst, --to"),
    (["no-such-command"], "invalid choice"),
    (["sweep", "--n-features", "0"], "n_features=0: expected an integer >= 1"),
    (["sweep", "--seeds", "2.5"], "seeds='2.5'"),
    (["sweep", "--penalty", "l2"], "invalid choice: 'l2'"),
    (["sweep", "--lambda-log", "0.1", "nan", "3"], "lambda_log=nan"),
    (["graph", "tc", "--model", "tiny", "--prompt", "a", "--node-threshold", "2"],
     "node_threshold=2"),
    (["graph", "tc", "--model", "tiny", "--prompt", "a", "--batch-size", "0"], "batch_size=0"),
    (["patch", "--seeds", "-1"], "seeds=-1"),
    (["patch", "--device", "gpu"], "--device 'gpu'"),
    (["reproduce", "--seeds", "1e3"], "seeds='1e3'"),
    (["reproduce", "--threads", "many"], "threads='many'"),
    (["compare", "a", "b", "--model", "tiny", "--threads", "-2"], "threads=-2"),
    (["evaluate", "x", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["train", "--model", "tiny", "--layers", "-1"], "layers=-1"),
    (["convert", "a", "b", "--to", "clt-eval", "--n-model-layers", "0"], "n_model_layers=0"),
])
def test_usage_errors_are_one_line_with_a_hint(args, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert needle in err[0] and "--help`" in err[0]


def _check_headline_l0(printed: str, out) -> None:
    """The headline's L0 columns are the mean total L0 over each matched point's seeds."""
    sweep = json.loads((out / "sweep.json").read_text())
    l0 = {r["run_id"]: r["metrics"]["l0_total"] for r in sweep["runs"]}
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("setting"))
    table = [line.split() for line in lines[start + 1:lines.index("", start)]]
    checked = 0
    for p in sweep["matched_l0"]["points"]:
        if "run_ids" not in p or p["arch"] != "clt":
            continue
        mean = sum(l0[i] for i in p["run_ids"]) / len(p["run_ids"])
        rows = [row for row in table if float(row[1]) == p["target"]]
        assert any(f"{mean:.2f}" == row[3] for row in rows), (p["target"], mean, rows)
        checked += 1
    assert checked
