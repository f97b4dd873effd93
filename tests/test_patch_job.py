"""`clt-eval patch`: subspace patching, DAS and the illusion check run as one job."""

import json

import pytest
import torch

from clt_eval.errors import CltEvalError

# Short enough for the test budget: 200 DAS steps reach 0.94 of the counterfactual change on
# the distilled toy with seed 0 (tests/test_mlp_in_the_middle.py); one seed per λ.
FAST = {"seeds": 1, "steps": 300, "das_steps": 200}


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from clt_eval.training.patch_job import run_patch

    out = tmp_path_factory.mktemp("patch") / "out"
    result = run_patch("mlp_in_the_middle", out, wandb_mode="offline", progress=False, **FAST)
    return out, result, json.loads((out / "patching.json").read_text())


def _by_source(payload, source):
    return [r for r in payload["records"] if r["source"] == source]


def test_job_writes_its_files_and_a_wandb_run(job):
    out, result, _ = job
    for name in ("patching.json", "report.md", "effects.png"):
        assert (out / name).is_file(), name
    assert (out / "effects.png").stat().st_size > 5000
    assert list((out / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
    assert set(result["paths"]) == {"patching", "report", "figure"}
    report = (out / "report.md").read_text()
    for words in ("dormant", "kernel", "PLT vs CLT", "Every direction", "effects.png"):
        assert words in report


def test_das_on_the_distilled_toy_is_flagged(job):
    _, _, payload = job
    (das,) = _by_source(payload, "das")
    e = das["effects"]
    assert das["illusion"] is True and das["works"] is True
    assert e["direction"] >= 0.5 and e["whole"] < 0.05
    assert e["row_space_part"] < 0.05
    assert das["cos_to_known_illusory"] > 0.9
    (known,) = _by_source(payload, "known")
    assert known["illusion"] is True


def test_faithful_directions_pass(job):
    _, _, payload = job
    faithful = _by_source(payload, "faithful")
    assert {r["label"] for r in faithful} == {"faithful", "faithful (residual)"}
    for r in faithful:
        assert r["illusion"] is False, r["reason"]
        assert r["effects"]["direction"] == pytest.approx(1.0, abs=1e-4)


def test_patching_json_has_every_field(job):
    _, _, payload = job
    assert {"case_study", "config", "summary", "runs", "records", "middle_layers"} <= set(payload)
    fields = {"source", "label", "run_id", "arch", "layer", "feature", "kind", "hook",
              "reader", "effects", "variation", "norms", "works", "illusion", "reason"}
    for r in payload["records"]:
        assert fields <= set(r), fields - set(r)
        assert set(r["effects"]) == {"whole", "direction", "row_space_part", "kernel_part"}
        assert isinstance(r["illusion"], bool) and r["reason"].endswith(".")
        assert ". " not in r["reason"] and "\n" not in r["reason"]  # one sentence
    feats = _by_source(payload, "transcoder")
    for r in feats:
        assert r["kind"] in ("decoder", "encoder") and r["arch"] in ("plt", "clt")
        assert isinstance(r["feature"], int) and r["layer"] == 0 and r["run_id"]
        assert r["hook"] == ("blocks.0.hook_mlp_out" if r["kind"] == "decoder"
                             else "blocks.0.hook_resid_mid")
    for arch in ("plt", "clt"):
        row = payload["summary"][arch]
        assert row["runs"] == 2  # one seed at each of two λ
        assert row["all"]["directions"] == 2 * row["features_matched"]
    for run in payload["runs"]:  # a run without a match says so instead of vanishing
        assert (run["matched"] == 0) == (run["note"] is not None)


def test_matched_decoder_directions_are_no_illusion(job):
    """A matched feature's decoder writes b where the next step reads it: it works, and the
    MLP in the middle (which reads the bias dimension) must not make it look illusory."""
    _, _, payload = job
    decoders = [r for r in _by_source(payload, "transcoder") if r["kind"] == "decoder"]
    assert decoders, "no transcoder feature was matched in any run"
    for r in decoders:
        assert r["works"] and not r["illusion"], r["reason"]
        assert r["effects"]["row_space_part"] == pytest.approx(1.0, abs=0.05)


def test_an_out_that_is_a_file_is_refused(tmp_path):
    from clt_eval.training.patch_job import run_patch

    f = tmp_path / "taken"
    f.write_text("keep me")
    with pytest.raises(CltEvalError, match="out=") as exc:
        run_patch("mlp_in_the_middle", f, wandb_mode="disabled", progress=False)
    one_line(exc)
    assert f.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [f]


@pytest.mark.parametrize("kwargs, field", [
    ({"seeds": 0}, "seeds=0"), ({"steps": -1}, "steps=-1"), ({"das_k": 0}, "das_k=0"),
    ({"wandb_mode": "loud"}, "wandb_mode='loud'"), ({"sparsity_coefs": ()}, "sparsity_coefs"),
    ({"sparsity_coefs": (float("nan"),)}, "sparsity_coefs"), ({"penalty": "nope"}, "penalty"),
    ({"case_study": ""}, "case_study"), ({"max_pairs": 1}, "max_pairs=1"),
])
def test_config_is_validated(kwargs, field):
    from clt_eval.training.patch_job import PatchConfig

    with pytest.raises(CltEvalError, match=field) as exc:
        PatchConfig(**kwargs)
    one_line(exc)


def test_job_refuses_bad_options_before_writing(tmp_path):
    from clt_eval.training.patch_job import run_patch

    out = tmp_path / "out"
    with pytest.raises(CltEvalError, match="run_patch") as exc:
        run_patch("mlp_in_the_middle", out, progress=False, colour="red")
    one_line(exc)
    with pytest.raises(CltEvalError, match="not registered") as exc:
        run_patch("no_such_case", out, progress=False)
    one_line(exc)
    # k larger than the MLP's 2 hidden units: DAS refuses, naming k, and nothing is written.
    with pytest.raises(CltEvalError, match="DAS at 'blocks.1.mlp.hook_post': k=3") as exc:
        run_patch("mlp_in_the_middle", out, wandb_mode="disabled", progress=False, das_k=3)
    one_line(exc)
    assert not out.exists()


@pytest.fixture(scope="module")
def distilled():
    from clt_eval.case_studies.mlp_in_the_middle import MlpInTheMiddle

    case = MlpInTheMiddle()
    model = case.model()
    base, source = case.pairs()
    return case, model, base, source, case.counterfactual(base, source)


def test_bad_directions_fail_as_one_line_naming_the_argument(distilled):
    from clt_eval.training.patch_job import study_direction

    case, model, base, source, cf = distilled
    meta = {"label": "probe"}
    W = case.mlp_W_out()
    cases = [
        (("blocks.9.mlp.hook_post", torch.ones(2), base, source), "hook_name='blocks.9"),
        ((case.mlp_hook, torch.ones(3), base, source), "v: shape"),
        ((case.mlp_hook, torch.zeros(2), base, source), "v: is the zero vector"),
        ((case.mlp_hook, torch.ones(2), base, source[:5]), "source_inputs"),
    ]
    for (hook, v, b, s), expected in cases:
        with pytest.raises(CltEvalError, match=expected) as exc:
            study_direction(model, hook, v, b, s, cf, case.output_value, meta, W_out=W)
        assert one_line(exc).startswith("probe: ")


def test_a_case_study_naming_a_missing_hook_is_refused(distilled):
    from clt_eval.case_studies.mlp_in_the_middle import MlpInTheMiddle
    from clt_eval.training.patch_job import PatchConfig, case_directions

    class Broken(MlpInTheMiddle):
        mlp_hook = "blocks.1.mlp.hook_nowhere"

    case = Broken()
    with pytest.raises(CltEvalError, match="hook_name='blocks.1.mlp.hook_nowhere'") as exc:
        case_directions(case, case.model(), PatchConfig(das_steps=1))
    one_line(exc)


def test_readers_fall_back_to_the_case_study_then_the_identity(distilled):
    from clt_eval.training.patch_job import reader

    case, model, *_ = distilled
    desc, W = reader(case, model, [1, 2])
    assert W.shape == (5, 3) and "[1, 2]" in desc  # MLP1's 2 units, MLP2's 1
    no_weights = torch.nn.Module()
    desc, W = reader(case, no_weights, [2])
    assert torch.equal(W, case.W_read()) and "W_read" in desc

    class Bare:
        d_model = 5

    desc, W = reader(Bare(), no_weights, [2])
    assert torch.equal(W, torch.eye(5)) and "identity" in desc


def test_feature_pairs_isolate_one_feature(case, model):
    """Boolean two-step: for each half-XOR, pairs where only it changes, so patching the
    whole MLP0 output reproduces exactly that feature's counterfactual."""
    from clt_eval.case_study import step_at
    from clt_eval.training.patch_job import candidate_pairs, feature_pairs

    base, source = candidate_pairs(case)
    assert len(base) == 16 * 15  # no pairs named: every ordered pair of distinct inputs
    step = step_at(case, 0)
    for j in range(4):
        b, s, cf, selection, isolated = feature_pairs(case, model, step, j, base, source, 512)
        assert selection.startswith("only this") and isolated and len(b) > 0
        acts_b = model.run_with_cache(b)[1][step.hook]
        acts_s = model.run_with_cache(s)[1][step.hook]
        changed = (acts_s - acts_b).abs() > 1e-6
        assert bool(changed[:, j].all()) and not bool(changed[:, [k for k in range(4)
                                                                 if k != j]].any())
        assert cf.shape == (len(b),)


@pytest.mark.slow
def test_job_on_a_case_study_without_a_hidden_space(tmp_path):
    from clt_eval.training.patch_job import run_patch

    out = tmp_path / "bool"
    run_patch("boolean_two_step", out, wandb_mode="disabled", progress=False, seeds=1,
              steps=300)
    payload = json.loads((out / "patching.json").read_text())
    assert payload["case_directions_studied"] is False
    assert {r["source"] for r in payload["records"]} == {"transcoder"}
    assert (out / "report.md").is_file() and (out / "effects.png").is_file()
