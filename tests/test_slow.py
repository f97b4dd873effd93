"""The main job on its defaults (about 2 minutes on 2 cores): run with `pytest -m slow`."""

from __future__ import annotations

import json

import pytest

from clt_eval.training.cli import main


@pytest.mark.slow
def test_reproduce_defaults(tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["reproduce", "--out", str(out), "--wandb-mode", "disabled"]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    by_id = {r["run_id"]: r for r in sweep["runs"]}
    found = [p for p in sweep["matched_l0"]["points"] if p["status"] == "found"]
    # Every penalty × norm (and l0, TopK) for both architectures at the three targets.
    assert len(found) == 8 * 2 * 3
    for p in found:
        assert len(p["run_ids"]) >= 10  # at least 10 seeds at every matched point
        for rid in p["run_ids"]:
            m = by_id[rid]["metrics"]
            if p["arch"] == "plt":  # no cross-layer decoder: a PLT cannot skip
                assert m["skip_fraction"] in (0.0, None)
            assert m["skip_fraction_per_layer"][0] is None
            assert 0.0 <= m["circuit_edge_recall"] <= 1.0
    headline = capsys.readouterr().out
    assert "PLT skip" in headline and "l1/concatenated" in headline
    report = (out / "report.md").read_text()
    assert "## Per layer, at matched L0" in report
    assert "## Attribution graphs against the true circuit" in report
