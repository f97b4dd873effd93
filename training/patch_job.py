"""`clt-eval patch`: subspace activation patching on a case study, each direction judged by the
illusion check (Makelov, Lange & Nanda, ICLR 2024; ``clt_eval.illusion``).

Two families of directions are patched in the *true* model:

1. The case study's own, when it names an MLP hidden space (``mlp_hook``, ``mlp_W_out``,
   ``pairs``, ``counterfactual``; optionally ``illusory_direction``, ``faithful_hook`` with
   ``faithful_direction`` and ``faithful_W_out``, ``reader_hook`` with
   ``residual_direction`` and ``W_read``): a DAS direction learned in that hidden space, the
   known illusory direction and the faithful one(s). Case studies without them skip this.
2. Transcoder features. A few PLT and CLT runs are trained on the case study; every feature
   matched (recovered) to a ground-truth feature of a middle step is patched along its
   decoder direction (what it writes into its layer's MLP output) at that layer's output hook,
   and along its encoder direction (what it reads) at that layer's input hook. The
   counterfactual is the true output when that ground-truth feature alone takes the source's
   value. Readers, whose row space the check splits a direction against:
   - decoder: the input weights of every MLP after the layer up to the next step's. A write
     reaches all of them before the next step reads it; with the next step's weights alone an
     MLP in between (the toy's MLP in the middle reads the bias dimension) turns a faithful
     write into a false "illusion".
   - encoder: the input weights of the layer's own MLP, the one reader of that hook whose
     computation the encoder imitates (the next step's weights need not read the inputs at
     all, which flags every encoder as an illusion).
   A model that exposes no ``blocks[i].mlp.W_in`` is checked against the case study's
   ``W_read()`` if it has one, else the identity (the kernel is then empty, and the check
   rests on the whole-component and variation tests).

Writes ``patching.json``, ``report.md`` and ``effects.png`` under ``out`` (each atomically,
after everything is computed) and logs one wandb run.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clt_eval.errors import CltEvalError, check_choice, require
from clt_eval.training.config import WANDB_MODES, RunSpec, TrainConfig

ARCHS = ("plt", "clt")
KINDS = ("decoder", "encoder")
EFFECTS = ("whole", "direction", "row_space_part", "kernel_part")
# A ground-truth activation counts as changed between two inputs above this.
ACT_TOL = 1e-6
# Pairs isolate a ground-truth feature when the step's other features change by at most this
# share of its change (continuous inputs never give exactly-unchanged others).
ISOLATION = 0.1
MIN_PAIRS = 8  # fewer pairs than this in a selection tier: try the next, looser tier
CANDIDATES = 40_000  # ordered pairs screened when a case study names none


@dataclass(frozen=True)
class PatchConfig:
    """What `clt-eval patch` runs. The transcoder runs are seeds × λ × (PLT, CLT), trained
    together as one ensemble; ``steps`` is kept short (the toys train in seconds)."""

    case_study: str = "mlp_in_the_middle"
    seeds: int = 5
    steps: int = 500
    wandb_mode: str = "offline"
    penalty: str = "tanh"
    decoder_norm: str = "concatenated"
    # One λ where both architectures keep the middle feature, one where the sparsity term
    # starts to bite (measured on mlp_in_the_middle and boolean_two_step at 500 steps).
    sparsity_coefs: tuple[float, ...] = (0.03, 0.3)
    n_features: int = 16
    das_steps: int = 300  # train_das's default; 200 already reaches 0.94 on the distilled toy
    das_k: int = 1
    das_seed: int = 0
    max_pairs: int = 512  # (base, source) pairs patched per ground-truth feature, at most
    # The toys' tensors are tiny: a second torch thread only adds synchronisation (a 2-thread
    # run of this job took 116 s beside another job, a 1-thread run 48 s, imports included).
    threads: int = 1

    def __post_init__(self) -> None:
        require(isinstance(self.case_study, str) and self.case_study.strip() != "",
                f"case_study={self.case_study!r}: expected a registered name or "
                "module.path:Factory")
        for name, low in (("seeds", 1), ("steps", 1), ("n_features", 1), ("das_steps", 1),
                          ("das_k", 1), ("das_seed", 0), ("max_pairs", 2),
                          ("threads", 1)):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= low,
                    f"{name}={v!r}: expected an integer >= {low}")
        check_choice("wandb_mode", self.wandb_mode, WANDB_MODES)
        coefs = self.sparsity_coefs
        require(isinstance(coefs, tuple | list) and len(coefs) > 0 and all(
            isinstance(c, int | float) and not isinstance(c, bool) and math.isfinite(c)
            and c >= 0 for c in coefs), f"sparsity_coefs={coefs!r}: expected a non-empty "
            "list of finite numbers >= 0")
        self.run_specs()  # penalty and decoder_norm are checked by RunSpec, naming the field

    def run_specs(self) -> list[RunSpec]:
        return [RunSpec(arch=a, penalty=self.penalty, decoder_norm=self.decoder_norm,
                        sparsity_coef=float(c), seed=s, n_features=self.n_features)
                for a in ARCHS for c in self.sparsity_coefs for s in range(self.seeds)]


# ---- one direction -----------------------------------------------------------------------
def study_direction(model, hook: str, v: torch.Tensor, base, source, cf: torch.Tensor,
                    value_fn, meta: dict, *, W_out=None, W_read=None) -> dict:
    """The illusion check of ``v`` at ``hook`` as one record (``meta`` plus figures). A bad
    hook, direction, weight or pair set fails as one line that names the direction."""
    from clt_eval.illusion import WORKS, illusion_check

    try:
        verdict = illusion_check(model, hook, v, base, source, cf, value_fn,
                                 W_out=W_out, W_read=W_read)
    except CltEvalError as exc:
        raise CltEvalError(f"{meta['label']}: {exc}") from None
    f = verdict.figures
    return meta | {
        "hook": hook, "n_pairs": len(base),
        "effects": {"whole": f["fraction_whole"], "direction": f["fraction_v"],
                    "row_space_part": f["fraction_row"], "kernel_part": f["fraction_kernel"]},
        "variation": {"std_direction": f["std_v"], "std_row_space_part": f["std_row"],
                      "std_kernel_part": f["std_kernel"],
                      "row_variation_ratio": f["row_variation_ratio"]},
        "norms": {"row_space_part": f["norm_row"], "kernel_part": f["norm_kernel"]},
        "works": bool(f["fraction_v"] >= WORKS),  # NaN (nothing to change) does not work
        "illusion": verdict.illusion, "reason": verdict.reason}


def _meta(source: str, label: str, space: str, reader: str, **extra) -> dict:
    base = {"source": source, "label": label, "space": space, "reader": reader,
            "run_id": None, "arch": None, "sparsity_coef": None, "seed": None, "layer": None,
            "feature": None, "ground_truth_feature": None, "kind": None}
    return base | extra


def layer_of(hook: str) -> int | None:
    """The block index in a TransformerLens hook name (``blocks.3.mlp.hook_post`` -> 3)."""
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else None


# ---- 1. the case study's own directions ----------------------------------------------------
def names_hidden_space(case) -> bool:
    return all(hasattr(case, a) for a in ("mlp_hook", "mlp_W_out", "pairs", "counterfactual"))


def case_directions(case, model, cfg: PatchConfig) -> list[dict]:
    """DAS, the known illusory and the faithful directions of a case study that names them."""
    from clt_eval.patching import mse_loss, train_das

    base, source = case.pairs()
    cf = case.counterfactual(base, source)
    value, hook, W_out = case.output_value, case.mlp_hook, case.mlp_W_out()
    run = (base, source, cf, value)
    layer = layer_of(hook)
    try:
        das = train_das(model, hook, base, source, mse_loss(value, cf), k=cfg.das_k,
                        steps=cfg.das_steps, seed=cfg.das_seed)
    except CltEvalError as exc:
        raise CltEvalError(f"DAS at {hook!r}: {exc}") from None
    known = case.illusory_direction() if hasattr(case, "illusory_direction") else None
    recs = []
    for i in range(das.V_DK.shape[1]):
        v = das.V_DK[:, i]
        extra = {"das_final_loss": das.final_loss}
        if known is not None and known.shape == v.shape:
            extra["cos_to_known_illusory"] = abs(float(v @ known) / float(known.norm()))
        label = "DAS" if das.V_DK.shape[1] == 1 else f"DAS column {i}"
        recs.append(study_direction(model, hook, v, *run, _meta(
            "das", label, "mlp_hidden", "W_out", layer=layer, **extra), W_out=W_out))
    if known is not None:
        recs.append(study_direction(model, hook, known, *run, _meta(
            "known", "known illusory", "mlp_hidden", "W_out", layer=layer), W_out=W_out))
    if all(hasattr(case, a) for a in ("faithful_hook", "faithful_direction", "faithful_W_out")):
        recs.append(study_direction(model, case.faithful_hook, case.faithful_direction(), *run,
                                    _meta("faithful", "faithful", "mlp_hidden", "W_out",
                                          layer=layer_of(case.faithful_hook)),
                                    W_out=case.faithful_W_out()))
    if all(hasattr(case, a) for a in ("reader_hook", "residual_direction", "W_read")):
        recs.append(study_direction(model, case.reader_hook, case.residual_direction(), *run,
                                    _meta("faithful", "faithful (residual)", "residual",
                                          "the reader's W_in (case study)",
                                          layer=layer_of(case.reader_hook)),
                                    W_read=case.W_read()))
    return recs


# ---- 2. transcoder features ------------------------------------------------------------------
def mlp_W_in(model, layer: int) -> torch.Tensor | None:
    """Layer ``layer``'s MLP input weights [D, H], where the model exposes them."""
    try:
        W = model.blocks[layer].mlp.W_in
    except (AttributeError, IndexError, TypeError):
        return None
    return W.detach() if isinstance(W, torch.Tensor) and W.dim() == 2 else None


def reader(case, model, layers: list[int]) -> tuple[str, torch.Tensor]:
    """(description, W_read [D, H]): the MLP input weights of ``layers`` side by side, else
    the case study's ``W_read()``, else the identity."""
    Ws = [mlp_W_in(model, ell) for ell in layers]
    if Ws and all(W is not None and W.shape[0] == case.d_model for W in Ws):
        return f"W_in of MLP layer(s) {layers}", torch.cat(Ws, dim=1)
    if callable(getattr(case, "W_read", None)):
        return "the case study's W_read()", case.W_read().detach()
    return "identity (the model exposes no MLP input weights)", torch.eye(case.d_model)


def candidate_pairs(case, max_candidates: int = CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """The case study's own pairs, else ordered pairs of distinct inputs: all of them, or a
    seeded sample of ``max_candidates`` when there are more."""
    if callable(getattr(case, "pairs", None)):
        return case.pairs()
    x = case.inputs()
    N = len(x)
    require(N >= 2, f"case study {case.name!r}: inputs() has {N} row(s); expected >= 2 to "
            "form (base, source) pairs")
    if N * (N - 1) <= max_candidates:
        i, j = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
        keep = i != j
        return x[i[keep]], x[j[keep]]
    gen = torch.Generator().manual_seed(0)
    i, j = torch.randint(0, N, (2, max_candidates), generator=gen)
    keep = i != j
    return x[i[keep]], x[j[keep]]


def feature_pairs(case, model, step, j: int, base, source, max_pairs: int):
    """(base, source, counterfactual [P], selection, isolated) for ground-truth feature ``j``
    of ``step``, or None when it never changes.

    The counterfactual is the true output when feature j alone takes the source's value. The
    whole-component patch and the row-space part (when the reader sums several features)
    carry every feature's change, so they are only comparable with it on pairs where the
    step's other features stay put: pairs where only j changes are preferred, then pairs
    where the others change by under ``ISOLATION`` of j's change, then any pair where j
    changes (``isolated`` False: the record says so)."""
    from clt_eval.patching import cache_hook, run_patched

    a_base, a_src = cache_hook(model, base, step.hook), cache_hook(model, source, step.hook)
    G = len(step.names)
    require(a_base.shape[-1] == G, f"case study {case.name!r}: hook {step.hook!r} holds "
            f"{a_base.shape[-1]} values; expected its {G} ground-truth feature(s)")
    delta = (a_src - a_base).abs().reshape(len(base), G)
    dj = delta[:, j]
    # The largest change among the other features (0 when the step has one feature).
    others = torch.cat([delta[:, :j], delta[:, j + 1:], torch.zeros_like(dj)[:, None]],
                       dim=1).amax(dim=1)
    moves = dj > ACT_TOL
    tiers = [(moves & (others <= ACT_TOL), "only this ground-truth feature changes", True),
             (moves & (others <= ISOLATION * dj), "the step's other features change by "
              f"under {ISOLATION:g} of this one's change", True),
             (moves, "the step's other features change too", False)]
    usable = [t for t in tiers if int(t[0].sum()) >= MIN_PAIRS] or \
        [t for t in tiers if bool(t[0].any())]
    if not usable:
        return None
    keep, selection, isolated = usable[0]
    idx = keep.nonzero()[:, 0]
    if len(idx) > max_pairs:
        pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))
        idx = idx[pick[:max_pairs]].sort().values
    b, s = base[idx], source[idx]
    unit = torch.zeros(G)
    unit[j] = 1.0
    cf = case.output_value(run_patched(model, b, s, step.hook, unit))
    return b, s, cf, selection, isolated


def train_runs(case, model, cfg: PatchConfig, progress: bool):
    """[(spec, record, transcoder of that ensemble, index in it)] for every run."""
    from tqdm.auto import tqdm

    from clt_eval.training.experiment import case_data, group_specs, train_group

    data, runs = case_data(case, model), []
    groups = group_specs(cfg.run_specs())
    with tqdm(total=len(groups) * cfg.steps, desc="training transcoders", unit="step",
              disable=not progress) as bar:
        for group in groups:
            res = train_group(case, model, group, TrainConfig(steps=cfg.steps), data,
                              progress=bar)
            runs += [(s, rec, res.transcoder, i)
                     for i, (s, rec) in enumerate(zip(group, res.records, strict=True))]
    return runs


def transcoder_directions(case, model, runs, middle: list[int], next_step: dict,
                          base_all, source_all, max_pairs: int) -> tuple[list[dict], list[dict]]:
    """(records, one summary per run): every matched middle-step feature's decoder and
    encoder direction, patched and checked; runs without a match say so."""
    from clt_eval.case_study import step_at
    from clt_eval.evaluate import CORR_MIN, COS_MIN

    readers = {ell: {"decoder": reader(case, model, list(range(ell + 1, next_step[ell] + 1))),
                     "encoder": reader(case, model, [ell])} for ell in middle}
    pairs_cache, records, summaries = {}, [], []
    for spec, rec, tc, r in runs:
        W_enc = tc.W_enc.detach()
        own_dec = {ell: tc.decoder_block(ell, ell).detach() for ell in middle}
        found, missed = 0, []
        for m in rec["metrics"]["matches"]:
            ell = m["layer"]
            if ell not in middle:
                continue
            step = step_at(case, ell)
            for j, (f, ok) in enumerate(zip(m["index"], m["recovered"], strict=True)):
                if not ok:
                    missed.append(f"{m['names'][j]} (corr {_num(m['corr'][j])}, "
                                  f"cos {_num(m['cos'][j])})")
                    continue
                if (ell, j) not in pairs_cache:
                    pairs_cache[ell, j] = feature_pairs(case, model, step, j, base_all,
                                                        source_all, max_pairs)
                found += 1
                records += _feature_records(model, case, spec, rec, step, j, f,
                                            own_dec[ell][r, f], W_enc[r, ell, :, f],
                                            readers[ell], pairs_cache[ell, j])
        summaries.append({"run_id": rec["run_id"], "arch": spec.arch,
                          "sparsity_coef": spec.sparsity_coef, "seed": spec.seed,
                          "matched": found, "not_matched": missed,
                          "note": None if found else "no middle-step feature matched: "
                          + ", ".join(missed) + f" (needs corr >= {CORR_MIN} and "
                          f"cos >= {COS_MIN})"})
    return records, summaries


def _num(x) -> str:
    return "undefined" if x is None else f"{x:.2f}"


def _feature_records(model, case, spec, rec, step, j, f, dec_D, enc_D, readers, pairs):
    ell, name = step.layer, step.names[j]
    hooks = {"decoder": case.output_hooks[ell], "encoder": case.input_hooks[ell]}
    out = []
    for kind, v in (("decoder", dec_D), ("encoder", enc_D)):
        desc, W = readers[kind]
        meta = _meta("transcoder", f"{spec.arch.upper()} λ{spec.sparsity_coef:g} s{spec.seed} "
                     f"{kind} {name}", "residual", desc, run_id=rec["run_id"], arch=spec.arch,
                     sparsity_coef=spec.sparsity_coef, seed=spec.seed, layer=ell, feature=f,
                     ground_truth_feature=name, kind=kind)
        if pairs is None or float(v.norm()) == 0.0:
            why = ("the ground-truth feature never changes between the pairs"
                   if pairs is None else f"its {kind} direction is zero")
            out.append(meta | {"hook": hooks[kind], "n_pairs": 0, "skipped": why,
                               "effects": dict.fromkeys(EFFECTS), "variation": None,
                               "norms": None, "works": False, "illusion": False,
                               "reason": f"not patched: {why}."})
            continue
        b, s, cf, selection, isolated = pairs
        out.append(study_direction(model, hooks[kind], v, b, s, cf, case.output_value,
                                   meta | {"pair_selection": selection,
                                           "pairs_isolate_feature": isolated}, W_read=W))
    return out


def summarise(records: list[dict], runs: list[dict]) -> dict:
    """Per architecture: runs, matches, and how many working directions are illusions."""
    out = {}
    for arch in ARCHS:
        mine = [r for r in records if r["source"] == "transcoder" and r["arch"] == arch]
        own = [r for r in runs if r["arch"] == arch]
        row = {"runs": len(own), "runs_without_match": sum(r["matched"] == 0 for r in own),
               "features_matched": sum(r["matched"] for r in own)}
        for kind in (*KINDS, "all"):
            sel = [r for r in mine if kind == "all" or r["kind"] == kind]
            works = [r for r in sel if r["works"]]
            ill = sum(r["illusion"] for r in works)
            row[kind] = {"directions": len(sel), "works": len(works), "illusions": ill,
                         "illusion_share_of_working": ill / len(works) if works else None}
        out[arch] = row
    return out


# ---- the job ---------------------------------------------------------------------------------
def run_patch(case_study: str = "mlp_in_the_middle", out: Path | str = "runs/patch",
              wandb_mode: str = "offline", seeds: int = 5, steps: int = 500,
              progress: bool = True, **options) -> dict:
    """Run the patching study (``options``: further ``PatchConfig`` fields) and write
    ``patching.json``, ``report.md``, ``effects.png`` and a wandb run under ``out``.
    Returns the written paths, the PLT/CLT summary, the number of directions studied and
    the seconds taken (model-library import, training, patching and writing)."""
    from clt_eval.atomic import write_json_atomic
    from clt_eval.training import patch_report

    started = time.perf_counter()
    out = Path(out)
    require(not out.exists() or out.is_dir(), f"out={str(out)!r}: is an existing file; "
            "expected a folder to write into (new or existing)")
    try:
        cfg = PatchConfig(case_study=case_study, seeds=seeds, steps=steps,
                          wandb_mode=wandb_mode, **options)
    except TypeError as exc:  # an unknown option
        raise CltEvalError(f"run_patch: {exc}; expected PatchConfig fields") from None
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        payload = _study(cfg, progress)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, whatever happened
    paths = patch_report.write_outputs(out, payload)
    paths["patching"] = write_json_atomic(out / "patching.json", payload)
    patch_report.log_wandb(out, cfg, payload, paths["figure"])
    return {"paths": paths, "summary": payload["summary"], "records": len(payload["records"]),
            "seconds": round(time.perf_counter() - started, 2)}


def _study(cfg: PatchConfig, progress: bool) -> dict:
    """Everything the job computes, as the JSON-ready content of patching.json."""
    from clt_eval.atomic import nan_to_none
    from clt_eval.case_study import load_case_study, middle_layers
    from clt_eval.case_study import steps as case_steps

    started = time.perf_counter()
    case = load_case_study(cfg.case_study, validate=True)
    middle = middle_layers(case)
    require(len(middle) > 0, f"case_study={cfg.case_study!r}: has no middle step; expected "
            "a ground-truth step before the output to patch")
    model = case.model()
    st = case_steps(case)
    next_step = {g.layer: st[i + 1].layer for i, g in enumerate(st[:-1])}
    own = case_directions(case, model, cfg) if names_hidden_space(case) else []
    base, source = candidate_pairs(case)
    runs = train_runs(case, model, cfg, progress)
    feats, run_rows = transcoder_directions(case, model, runs, middle, next_step, base, source,
                                            cfg.max_pairs)
    records = own + feats
    return nan_to_none({
        "case_study": cfg.case_study, "config": asdict(cfg),
        "case_directions_studied": names_hidden_space(case), "middle_layers": middle,
        "summary": summarise(records, run_rows), "runs": run_rows, "records": records,
        "seconds": round(time.perf_counter() - started, 2)})
