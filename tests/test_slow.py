"""The main job on its defaults (about 80 s on 2 cores): run with `pytest -m slow`."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from training.cli import main


@pytest.mark.slow
def test_reproduce_defaults(tmp_path):
    out = tmp_path / "repro"
    assert main(["reproduce", "--out", str(out), "--wandb-mode", "disabled"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    per_setting = Counter((r["setting"], r["arch"], r["sparsity_coef"], r["k"]) for r in runs)
    assert min(per_setting.values()) >= 10  # at least 10 seeds everywhere
    for r in runs:
        if r["arch"] == "plt":
            assert r["metrics"]["skip_fraction"] in (0.0, None)
    # Most runs reconstruct: the comparison is between working transcoders.
    good = sum(r["metrics"]["nmse"] <= 0.05 for r in runs) / len(runs)
    assert good > 0.8
    report = (out / "report.md").read_text()
    for setting in {r["setting"] for r in runs}:
        assert f"| {setting} | clt |" in report
