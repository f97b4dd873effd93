"""Matched-L0 selection and summaries, and the read-share metric, on hand-made records."""

from __future__ import annotations

import math

import torch

from clt_eval.metrics import read_share
from training.analysis import matched_pair, matched_table, summarize


def _rec(arch, lam, seed, l0, nmse=0.0, skip=0.0):
    return {"arch": arch, "penalty": "tanh", "decoder_norm": "concatenated",
            "sparsity_coef": lam, "k": None, "seed": seed,
            "metrics": {"l0_total": l0, "nmse": nmse, "skip_fraction": skip, "skips": skip > 0.5,
                        "middle_feature_recovery": 1.0, "intervention_agreement": 1.0,
                        "output_accuracy": 1.0, "offdist_mae": 0.0, "sparsity_cost": 1.0,
                        "output_reads_inputs": 0.0}}


def test_matched_pair_picks_closest_l0_among_good_reconstructions():
    runs = {"plt": {0.1: [_rec("plt", 0.1, 0, 2.0)], 0.3: [_rec("plt", 0.3, 0, 1.5)]},
            "clt": {0.1: [_rec("clt", 0.1, 0, 1.5)],
                    0.3: [_rec("clt", 0.3, 0, 1.0, nmse=0.5)]}}  # too lossy to compare
    assert matched_pair(runs) == (0.3, 0.1)


def test_matched_pair_breaks_ties_toward_sparser_pair():
    runs = {"plt": {1: [_rec("plt", 1, 0, 1.0)], 2: [_rec("plt", 2, 0, 2.0)]},
            "clt": {1: [_rec("clt", 1, 0, 1.0)], 2: [_rec("clt", 2, 0, 2.0)]}}
    assert matched_pair(runs) == (1, 1)


def test_matched_table_reports_note_when_nothing_reconstructs():
    recs = [_rec("plt", 0.1, 0, 1.0, nmse=0.9), _rec("clt", 0.1, 0, 1.0, nmse=0.9)]
    (row,) = matched_table(recs)
    assert row["arch"] is None and "NMSE" in row["note"]


def test_matched_table_summarises_over_seeds():
    recs = [_rec(a, 0.1, s, 1.0, skip=v) for a in ("plt", "clt")
            for s, v in enumerate((0.0, 1.0, 1.0))]
    rows = {r["arch"]: r for r in matched_table(recs)}
    assert rows["clt"]["skips"]["mean"] == 2 / 3
    assert rows["clt"]["n_seeds"] == 3


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
