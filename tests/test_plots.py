"""Every figure the reports save has labelled axes: each saved figure is inspected at
``savefig`` time (plots drawn from small synthetic records, so no training is needed)."""

import random

import pytest


@pytest.fixture()
def saved(monkeypatch):
    """The figures saved while the test runs: [(path, [(xlabel, ylabel, title)], figure)]."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    seen = []
    real = Figure.savefig

    def check(fig, fname, *a, **kw):
        seen.append((str(fname), [_axes_labels(ax) for ax in fig.axes if ax.axison], fig))
        return real(fig, fname, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", check)
    return seen


def _axes_labels(ax):
    """(xlabel, ylabel) of ``ax``; an axis shared with a labelled one (matplotlib's sharex /
    sharey, where only the outer panels carry the label) counts as labelled."""
    def shared_label(group, get):
        return get(ax) or next((get(o) for o in group.get_siblings(ax) if get(o)), "")

    x = shared_label(ax.get_shared_x_axes(), lambda a: a.get_xlabel())
    y = shared_label(ax.get_shared_y_axes(), lambda a: a.get_ylabel())
    return x, y, ax.get_title()


def _assert_labelled(saved, n_figures):
    assert len(saved) == n_figures
    for path, axes, _ in saved:
        assert axes, path
        for x, y, title in axes:
            assert x.strip() and y.strip(), (path, title, x, y)


# ---- compare ------------------------------------------------------------------------------------
def _metrics(rng, L):
    share = [rng.random() for _ in range(L)]
    return {"early_share": rng.random(), "direct_early_share": rng.random(),
            "influence_by_layer": share, "direct_by_layer": share,
            "l0_per_layer": [rng.random() * 9 for _ in range(L)], "l0_total": 10.0,
            "l0_cv": 0.3, "l0_entropy": 0.9, "l0_late_minus_early": 0.1,
            "mean_path_length": 2.0, "mean_feature_hops": 1.0, "window_replacement": 0.5,
            "window_completeness": 0.7, "replacement": 0.4, "completeness": 0.6,
            "n_features_active": 30, "n_features_pruned": 10, "n_features_pruned_all_errors": 5,
            "seconds": 0.1}


def _case(rng, kind):
    d = {"dlogprob": rng.uniform(-2, 2), "kl": 0.1, "target_prob": 0.2}
    return {"kind": kind, "scope": "all", "tc_layer": 1, "model_layer": 1, "true": dict(d),
            **{f"{n}_{v}": {**d, "dlogprob": rng.uniform(-2, 2)}
               for n in ("plt", "clt") for v in ("frozen", "whole")},
            "no_response": {**d, "dlogprob": 0.0}}


def compare_records(n_per_group=4, L=3):
    rng = random.Random(0)
    out = []
    for g in ("two-hop", "memorized", "novel"):
        for i in range(n_per_group):
            out.append({"group": g, "text": f"prompt {i}", "n_tokens": 8, "target": 3,
                        "target_str": " x", "target_prob": 0.3, "answer": None,
                        "answer_correct": None, "patch_from": None, "patch_note": None,
                        "plt": _metrics(rng, L), "clt": _metrics(rng, L),
                        "overlap": {"jaccard": rng.random(), "cell_jaccard": rng.random(),
                                    "n_a": 3, "n_b": 4, "n_a_mappable": 3, "n_shared": 1},
                        "interventions": [_case(rng, "zero"), _case(rng, "patch")]})
    return out


def test_compare_plots_are_labelled_and_group_names_whole(tmp_path, saved):
    from clt_eval.training import compare_plots, compare_report

    records = compare_records()
    summary = compare_report.summarize(records, 0.05)
    paths = [compare_plots.layer_profiles(tmp_path, summary),
             compare_plots.prompt_metrics(tmp_path, records),
             compare_plots.interventions(tmp_path, records)]
    assert all(p.is_file() for p in paths)
    _assert_labelled(saved, 3)
    labels = compare_plots.prompt_labels(records)
    assert labels[:2] == ["two-hop 1", "two-hop 2"] and labels[-1] == "novel 4"


def test_no_tick_label_is_cut_off(tmp_path, saved):
    """Every tick label of the prompt plot lies inside the figure's canvas."""
    from clt_eval.training import compare_plots

    compare_plots.prompt_metrics(tmp_path, compare_records(n_per_group=9))
    fig = saved[-1][2]
    renderer = fig.canvas.get_renderer()
    W, H = fig.bbox.width, fig.bbox.height
    n = 0
    for ax in fig.axes:
        for t in ax.get_xticklabels() + [ax.xaxis.label, ax.yaxis.label, ax.title]:
            if t.get_text() and t.get_visible():
                e = t.get_window_extent(renderer)
                assert e.x0 >= 0 and e.y0 >= 0 and e.x1 <= W and e.y1 <= H, t.get_text()
                n += 1
    assert n > 27


# ---- sweep --------------------------------------------------------------------------------------
def sweep_records():
    rng = random.Random(1)
    out = []
    for arch in ("plt", "clt"):
        for pen in ("l1", "tanh"):
            for lam in (1e-3, 1e-2, 1e-1):
                for seed in (0, 1, 2):
                    spec = {"penalty": pen, "decoder_norm": "none", "n_features": 16,
                            "activation": None, "cross_layer_coef": 0.0}
                    out.append({"arch": arch, "penalty": pen, "sparsity_coef": lam, "k": None,
                                "seed": seed, "spec": spec, "run_id": f"{arch}{pen}{lam}{seed}",
                                "metrics": {"skip_fraction": rng.random(),
                                            "middle_feature_recovery": rng.random(),
                                            "l0_total": rng.random() * 20,
                                            "nmse": rng.random(),
                                            "cross_layer_share": rng.random()}})
    return out


def test_sweep_plots_are_labelled(tmp_path, saved):
    from clt_eval.training import sweep_plots as P

    recs = sweep_records()
    P.phase_diagram(tmp_path, recs, 16, "lambda")
    P.phase_diagram(tmp_path, recs, 16, "l0")
    P.front(tmp_path, recs)
    P.width_plot(tmp_path, [{"setting": "l1", "knob": 0.01, "skip_share": {8: 0.0, 16: 0.5}}])
    P.cross_share_plot(tmp_path, recs, 16)
    rows = [{"setting": "l1", "target": 6.0, "arch": a, "recs": recs[:3]}
            for a in ("plt", "clt")]
    for r in recs[:3]:
        r["metrics"] |= {"circuit_edge_recall": 0.5, "shortcut_edges": 2}
    P.circuit_plot(tmp_path, rows)
    _assert_labelled(saved, 6)
    assert len(list(tmp_path.glob("*.png"))) == 6


def test_front_plot_draws_runs_that_keep_b(tmp_path, saved):
    """Each kind of run the legend names gets its points (a label mismatch once dropped the
    "keeps B" runs from the plot)."""
    from clt_eval.training import sweep_plots as P

    recs = sweep_records()
    for r in recs:
        r["metrics"] |= {"skip_fraction": 0.0, "middle_feature_recovery": 1.0}
    assert {P._kind(r["metrics"]) for r in recs} == {P.KEEPS_B}
    P.front(tmp_path, recs)
    fig = saved[-1][2]
    legend = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert f"{P.KEEPS_B}: 18" in legend


# ---- patching -----------------------------------------------------------------------------------
def test_patch_effects_plot_is_labelled(tmp_path, saved):
    from clt_eval.training import patch_report as R

    recs = [{"label": f"CLT enc L1 feature {i}", "source": "transcoder", "arch": "clt",
             "kind": "enc", "layer": 1, "ground_truth_feature": "b",
             "effects": {k: 0.1 * i for k, _, _ in R.EFFECT_BARS} | {"direction": 0.5}}
            for i in range(4)]
    R.effects_figure(tmp_path, recs)
    _assert_labelled(saved, 1)
