"""Summaries over seeds, and the read-share metric, on hand-made values."""

from __future__ import annotations

import math

import torch

from clt_eval.metrics import read_share
from clt_eval.training.analysis import summarize


def test_summarize_skips_undefined_values():
    s = summarize([1.0, None, float("nan"), 3.0])
    assert s["n"] == 2 and s["mean"] == 2.0 and math.isclose(s["sd"], math.sqrt(2))
    assert summarize([None])["mean"] is None


def test_read_share_by_hand():
    # D = 2: dim 0 holds A, dim 1 holds B. One feature reads A with weight 1, B with weight 3.
    P_a, P_b = torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    w = torch.tensor([[1.0], [3.0]])
    acts = torch.tensor([[1.0], [0.0]])  # only the first sample counts
    assert read_share(x, w, acts, P_a, P_b) == 1 / 4
    assert math.isnan(read_share(x, w, torch.zeros(2, 1), P_a, P_b))


# ---- matched L0 that the search could not match -------------------------------------------
def test_crossing_finds_the_neighbouring_points_around_the_target_nearest_the_knob_found():
    from clt_eval.training.sweep_analysis import crossing

    # L0 falls with λ and jumps from 1.6 to 0.5 between λ 1 and 1.2 (a CLT dropping features).
    tried = [(0.1, 3.0), (3.0, 0.0), (1.0, 1.6), (1.2, 0.5), (0.5, 2.2)]
    assert crossing(tried, 1.0, near=1.2) == [1.0, 1.6, 1.2, 0.5]
    assert crossing(tried, 2.5, near=0.1) == [0.1, 3.0, 0.5, 2.2]
    assert crossing(tried, 4.0, near=0.1) is None  # never reached
    # TopK: L0 rises with k.
    assert crossing([(1, 1.0), (2, 1.9), (3, 2.9)], 1.5, near=1) == [1.0, 1.0, 2.0, 1.9]


def test_report_names_the_points_whose_l0_missed_the_target_and_why():
    from clt_eval.training.sweep_analysis import MATCH_TOL, unmatched
    from clt_eval.training.sweep_report import _unmatched_note

    def row(arch, target, reached, search, cross):
        return {"setting": "l1/concatenated", "arch": arch, "target": target, "recs": [{}],
                "n": 10, "l0_total": reached, "search_l0": search, "crossing": cross}

    jump = row("clt", 1.0, 0.61, 0.56, [1.0, 1.56, 1.15, 0.56])
    noisy = row("plt", 2.0, 2.48, 1.95, [0.9, 2.41, 1.0, 1.88])
    close = row("plt", 1.0, 1.0 + MATCH_TOL / 2, 1.0, None)
    assert unmatched([jump, noisy, close]) == [jump, noisy]
    note = _unmatched_note([jump, noisy, close])
    assert "l1/concatenated CLT, target 1: L0 reached 0.61; L0 jumps over the target, from " \
           "1.56 at λ 1 to 0.56 at λ 1.15" in note
    assert "l1/concatenated PLT, target 2: L0 reached 2.48; the search's seeds averaged 1.95" \
        in note
    assert "target 1: L0 reached 1.05" not in note
    assert _unmatched_note([close]) == ""
