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
