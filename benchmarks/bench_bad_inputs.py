"""Bad-input battery: malformed files, bad option values and faulty environments, across
every command, each checked against the promise for bad input.

The promise: exit code 2, exactly one line on stderr (``clt-eval: error: ...``), no
traceback, nothing written (no output folder created, no file beside the inputs changed),
and a pickle payload is never unpickled (its marker never appears).

Cases run in forked workers, two at a time, each with its own folder and a time limit: most
call ``main()`` in the worker (an environment fault such as a full disk is simulated there
by patching the write functions); the rest run ``.venv/bin/clt-eval`` as a subprocess, for
faults that need a real environment (HF_HUB_OFFLINE with a hub id, a missing model file).

    .venv/bin/python benchmarks/bench_bad_inputs.py [--only SUBSTRING] [--workers 2] [-v]

Prints PASS/FAIL per case with the reason, then the share of cases meeting the promise.
The builders and mutations below are shared with tests/test_fuzz.py.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import errno
import io
import json
import multiprocessing as mp
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / ".venv" / "bin" / "clt-eval"
TIMEOUT_S = 60
MARKER = "UNPICKLED"  # a folder a pickle payload would create if it were ever loaded
CASE = "boolean_two_step"  # n_layers 2, d_model 10
L, D, F = 2, 10, 4


# ---- valid transcoder folders in every format ----------------------------------------------
def transcoder(activation: str = "relu", arch: str = "clt", skip: bool = False, k=None,
               d_model: int = D, n_layers: int = L):
    import torch

    from clt_eval.config import TranscoderConfig
    from clt_eval.transcoder import Transcoder

    cfg = TranscoderConfig(d_model=d_model, n_layers=n_layers, n_features=F, arch=arch,
                           activation=activation, skip=skip, k=k)
    tc = Transcoder([cfg])
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in tc.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return tc.eval()


def native_folder(path: Path, case_study=CASE, **kw) -> Path:
    from clt_eval.io import save_transcoder

    return save_transcoder(transcoder(**kw), path, extra={"case_study": case_study})


def circuit_tracer_folder(path: Path, **kw) -> Path:
    from clt_eval.formats import circuit_tracer as ct
    from clt_eval.lm.window import LayerWindow

    config, files = ct.circuit_tracer_files(transcoder(**kw), LayerWindow((0, 1)))
    path.mkdir(parents=True)
    ct.write_circuit_tracer(config, files, path)
    return path


def sae_lens_folder(path: Path, jump: bool = False) -> Path:
    """One layer of a sae_lens transcoder, written by hand (importing sae_lens costs ~10 s)."""
    import safetensors.torch
    import torch

    path.mkdir(parents=True)
    cfg = {"architecture": "jumprelu_transcoder" if jump else "transcoder", "d_in": D,
           "d_sae": F, "d_out": D, "dtype": "float32", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"hook_name": "blocks.0.ln2.hook_normalized",
                        "hook_name_out": "blocks.0.hook_mlp_out"}}
    (path / "cfg.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(D, F, generator=g), "b_enc": torch.zeros(F),
         "W_dec": torch.randn(F, D, generator=g), "b_dec": torch.zeros(D)}
    if jump:
        t["threshold"] = torch.rand(F, generator=g)
    safetensors.torch.save_file(t, str(path / "sae_weights.safetensors"))
    return path


FOLDERS: dict[str, Callable[[Path], Path]] = {
    "native": native_folder,
    "native-jumprelu": lambda p: native_folder(p, activation="jumprelu", skip=True),
    "ct-clt": circuit_tracer_folder,
    "ct-set": lambda p: circuit_tracer_folder(p, arch="plt", activation="jumprelu"),
    "sae-lens": lambda p: sae_lens_folder(p, jump=True),
}
CONFIG_FILES = {"native": "config.json", "native-jumprelu": "config.json",
                "ct-clt": "config.yaml", "ct-set": "config.yaml", "sae-lens": "cfg.json"}


# ---- mutations of a folder -----------------------------------------------------------------
class Payload:
    """A pickle whose loading would create the marker folder: never loaded, never created."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_payload(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _rewrite(path: Path, change: Callable[[dict], dict]) -> None:
    import safetensors.torch

    tensors = dict(safetensors.torch.load_file(str(path)))
    safetensors.torch.save_file(change(tensors), str(path))


def _first(t: dict) -> str:
    return sorted(t)[0]


def _set(t: dict, name: str, value) -> dict:
    return t | {name: value}


def tensor_mutations() -> dict[str, Callable[[dict], dict]]:
    import torch

    return {
        "drop-tensor": lambda t: {k: v for k, v in t.items() if k != _first(t)},
        "rename-tensor": lambda t: {(k + "_x" if k == _first(t) else k): v for k, v in t.items()},
        "extra-tensor": lambda t: t | {"mystery": torch.zeros(3)},
        "wrong-shape": lambda t: _set(t, _first(t),
                                      torch.zeros(*[s + 1 for s in t[_first(t)].shape])),
        "flat-shape": lambda t: _set(t, _first(t), t[_first(t)].flatten()),
        "int-dtype": lambda t: _set(t, _first(t), t[_first(t)].to(torch.int32)),
        "bool-dtype": lambda t: _set(t, _first(t), t[_first(t)] > 0),
        "nan": lambda t: _set(t, _first(t), t[_first(t)].clone().fill_(float("nan"))),
        "one-nan": lambda t: _set(t, _first(t), t[_first(t)].clone().flatten().index_fill(
            0, torch.tensor([0]), float("nan")).view(t[_first(t)].shape)),
        "inf": lambda t: _set(t, _first(t), t[_first(t)].clone().fill_(float("inf"))),
        "neg-inf": lambda t: _set(t, _first(t), t[_first(t)].clone().fill_(-float("inf"))),
    }


def file_mutations(marker: Path) -> dict[str, Callable[[Path], None]]:
    return {
        "truncated-half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "truncated-8": lambda p: p.write_bytes(p.read_bytes()[:8]),
        "empty": lambda p: p.write_bytes(b""),
        "garbage": lambda p: p.write_bytes(random.Random(0).randbytes(256)),
        "missing": lambda p: p.unlink(),
        "a-folder": lambda p: (p.unlink(), p.mkdir()),
        "pickle": lambda p: write_payload(p, marker),
        "bad-utf8": lambda p: p.write_bytes(b"\xff\xfe\x00bad"),
    }


def _edit_json(path: Path, change: Callable[[dict], object]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _edit_yaml(path: Path, change: Callable[[dict], object]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(change(yaml.safe_load(path.read_text()))))


def _tc(change):  # a change to the "transcoder" object of clt-eval's config.json
    return lambda d: d | {"transcoder": change(d["transcoder"])}


def _window(**kw):
    win = {"layers": [0, 1], "input_hook": "blocks.{layer}.ln2.hook_normalized",
           "output_hook": "blocks.{layer}.hook_mlp_out"}
    return lambda d: d | {"extra": d["extra"] | {"window": win | kw}}


NATIVE_CONFIG = {
    "drop-format": lambda d: {k: v for k, v in d.items() if k != "format"},
    "drop-transcoder": lambda d: {k: v for k, v in d.items() if k != "transcoder"},
    "version-2": lambda d: d | {"version": 2},
    "version-str": lambda d: d | {"version": "1"},
    "top-list": lambda d: [d],
    "extra-list": lambda d: d | {"extra": ["x"]},
    "unknown-field": _tc(lambda t: t | {"colour": "red"}),
    "drop-d_model": _tc(lambda t: {k: v for k, v in t.items() if k != "d_model"}),
    "d_model-str": _tc(lambda t: t | {"d_model": "10"}),
    "d_model-float": _tc(lambda t: t | {"d_model": 10.0}),
    "d_model-bool": _tc(lambda t: t | {"d_model": True}),
    "n_layers-list": _tc(lambda t: t | {"n_layers": [2]}),
    "n_features-neg": _tc(lambda t: t | {"n_features": -4}),
    "n_features-disagrees": _tc(lambda t: t | {"n_features": 5}),
    "skip-no": _tc(lambda t: t | {"skip": "no"}),
    "skip-int": _tc(lambda t: t | {"skip": 0}),
    "arch-list": _tc(lambda t: t | {"arch": ["clt"]}),
    "arch-unknown": _tc(lambda t: t | {"arch": "mlp"}),
    "activation-unknown": _tc(lambda t: t | {"activation": "gelu"}),
    "k-with-relu": _tc(lambda t: t | {"k": 2}),
    "bandwidth-str": _tc(lambda t: t | {"jumprelu_bandwidth": "0.05"}),
    "bandwidth-nan": _tc(lambda t: t | {"jumprelu_bandwidth": float("nan")}),
    "transcoder-null": _tc(lambda t: None),
    "window-unknown-placeholder": _window(input_hook="blocks.{layer}.{x}"),
    "window-positional": _window(output_hook="blocks.{}.hook_mlp_out"),
    "window-no-layer": _window(input_hook="blocks.0.ln2.hook_normalized"),
    "window-open-brace": _window(input_hook="blocks.{layer"),
    "window-layers-str": _window(layers="01"),
    "window-too-few": _window(layers=[0]),
}
# Only evaluate reads the case study a transcoder was trained on.
EVALUATE_CONFIG = {
    "case-study-list": lambda d: d | {"extra": {"case_study": ["x"]}},
    "case-study-int": lambda d: d | {"extra": {"case_study": 3}},
    "case-study-unknown": lambda d: d | {"extra": {"case_study": "no_such_case"}},
    "case-study-missing": lambda d: d | {"extra": {}},
    "case-study-module": lambda d: d | {"extra": {"case_study": "no.such.module:Factory"}},
    "n_layers-disagrees": _tc(lambda t: t | {"n_layers": 3}),
    "d_model-disagrees": _tc(lambda t: t | {"d_model": 7}),
}
CT_CONFIG = {
    "kind-unknown": lambda d: d | {"model_kind": "sae"},
    "drop-kind": lambda d: {k: v for k, v in d.items() if k != "model_kind"},
    "drop-input-hook": lambda d: {k: v for k, v in d.items() if k != "feature_input_hook"},
    "hook-int": lambda d: d | {"feature_output_hook": 3},
    "hook-unknown-placeholder": lambda d: d | {"feature_input_hook": "blocks.{layer}.{x}"},
    "hook-absolute": lambda d: d | {"feature_input_hook": "blocks.3.hook_resid_mid"},
    "layers-too-many": lambda d: d | {"clt_eval_layers": [0, 1, 2]},
    "layers-str": lambda d: d | {"clt_eval_layers": "0,1"},
    "layers-negative": lambda d: d | {"clt_eval_layers": [-1, 0]},
    "top-list": lambda d: [d],
}
# Keys only a transcoder set (circuit-tracer's per-layer layout) reads.
CT_SET_CONFIG = {
    "activation-unknown": lambda d: d | {"activation": "gelu"},
    "activation-relu-with-threshold": lambda d: d | {"activation": "relu"},
    "transcoders-remote": lambda d: d | {"transcoders": ["hf://x/layer_0.safetensors",
                                                        "layer_1.safetensors"]},
    "transcoders-str": lambda d: d | {"transcoders": "layer_0.safetensors"},
    "transcoders-missing-file": lambda d: d | {"transcoders": ["layer_0.safetensors",
                                                              "layer_9.safetensors"]},
    "topk-without-k": lambda d: d | {"activation": "topk"},
}
SAE_CONFIG = {
    "arch-unknown": lambda d: d | {"architecture": "standard"},
    "d_in-str": lambda d: d | {"d_in": "10"},
    "d_sae-zero": lambda d: d | {"d_sae": 0},
    "d_out-differs": lambda d: d | {"d_out": 11},
    "d_sae-disagrees": lambda d: d | {"d_sae": 5},
    "b_dec-to-input": lambda d: d | {"apply_b_dec_to_input": True},
    "hook-missing": lambda d: d | {"metadata": {}},
    "hook-unknown-placeholder": lambda d: d | {"metadata": d["metadata"] | {
        "hook_name": "blocks.0.{x}", "hook_name_out": "blocks.0.{x}"}},
    "hook-layers-differ": lambda d: d | {"metadata": d["metadata"] | {
        "hook_name_out": "blocks.1.hook_mlp_out"}},
    "top-list": lambda d: [d],
}


# ---- the promise ---------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, p.is_dir())
    return out


def written(before: dict, after: dict) -> list[str]:
    """Paths created or changed between two snapshots (removed ones are not 'written')."""
    return sorted(k for k, v in after.items() if k not in before or
                  (before[k] != v and not v[2]))


def verdict(rc, stderr: str, wrote: list[str], crashed: str | None) -> tuple[bool, str]:
    lines = [x for x in stderr.splitlines() if x.strip()]
    why = []
    if crashed:
        why.append(f"raised {crashed}")
    if rc != 2:
        why.append(f"rc={rc}")
    if len(lines) != 1:
        why.append(f"{len(lines)} stderr lines")
    elif not lines[0].startswith("clt-eval: error: "):
        why.append("stderr line does not start 'clt-eval: error: '")
    if "Traceback" in stderr:
        why.append("traceback")
    if any(Path(w).name == MARKER for w in wrote):
        why.append("PICKLE WAS LOADED")
    if wrote:
        why.append(f"wrote {wrote[:3]}")
    detail = lines[-1][:160] if lines else ""
    return not why, ("; ".join(why) + (f" | {detail}" if detail else "")) if why else detail


# ---- simulated faulty environments (in-process patches) ------------------------------------
@contextlib.contextmanager
def failing_writes(root: Path, err: int):
    """Writes under ``root`` fail with ``err`` (ENOSPC: a full disk; EACCES: read-only)."""
    import safetensors.torch

    root = str(root.resolve())
    real_open, real_save = builtins.open, safetensors.torch.save_file
    real_mkdir, real_mkstemp, real_mkdtemp = os.mkdir, tempfile.mkstemp, tempfile.mkdtemp
    real_replace, real_rename = os.replace, os.rename

    def under(p) -> bool:
        return str(Path(os.fspath(p)).resolve()).startswith(root)

    def fail(p):
        raise OSError(err, os.strerror(err), str(p))

    def fake_open(file, mode="r", *a, **kw):
        if isinstance(file, str | os.PathLike) and any(c in mode for c in "wax+") and under(file):
            fail(file)
        return real_open(file, mode, *a, **kw)

    def guard(real, pos=0):
        def wrapped(*a, **kw):
            target = a[pos] if len(a) > pos else kw.get("dir")
            if target is not None and under(target):
                fail(target)
            return real(*a, **kw)
        return wrapped

    patches = [(builtins, "open", fake_open), (io, "open", fake_open),
               (safetensors.torch, "save_file", guard(real_save, 1)),
               (os, "replace", guard(real_replace, 1)), (os, "rename", guard(real_rename, 1))]
    if err == errno.EACCES:  # a read-only folder refuses new entries too
        patches += [(os, "mkdir", guard(real_mkdir)),
                    (tempfile, "mkstemp", lambda *a, **kw: (_ for _ in ()).throw(
                        OSError(err, os.strerror(err), kw.get("dir"))) if kw.get("dir") and
                     under(kw["dir"]) else real_mkstemp(*a, **kw)),
                    (tempfile, "mkdtemp", lambda *a, **kw: (_ for _ in ()).throw(
                        OSError(err, os.strerror(err), kw.get("dir"))) if kw.get("dir") and
                     under(kw["dir"]) else real_mkdtemp(*a, **kw))]
    old = [(m, n, getattr(m, n)) for m, n, _ in patches]
    for m, n, f in patches:
        setattr(m, n, f)
    try:
        yield
    finally:
        for m, n, f in old:
            setattr(m, n, f)


# ---- cases ---------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]  # builds inputs in the case folder, returns argv
    subprocess: bool = False
    env: dict = field(default_factory=dict)
    patch: Callable[[Path], contextlib.AbstractContextManager] | None = None


def _folder_case(kind: str, mutate: Callable[[Path], None], command: str) -> Callable:
    def setup(ws: Path) -> list[str]:
        src = FOLDERS[kind](ws / "src")
        mutate(src)
        if command == "evaluate":
            return ["evaluate", str(src)]
        if command == "graph":
            return ["graph", str(src), "--model", "tiny", "--prompt", "hi", "--out",
                    str(ws / "out")]
        return ["convert", str(src), str(ws / "out"), "--to", "clt-eval"]
    return setup


def _config_mutation(kind: str, change) -> Callable[[Path], None]:
    edit = _edit_yaml if CONFIG_FILES[kind].endswith(".yaml") else _edit_json
    return lambda src: edit(src / CONFIG_FILES[kind], change)


def folder_cases() -> list[Case]:
    cases = []
    for kind in FOLDERS:
        files = (lambda k: lambda src: weight_files(src)[0])(kind)
        for name, change in tensor_mutations().items():
            mut = (lambda f, c: lambda src: _rewrite(f(src), c))(files, change)
            cases.append(Case(f"convert {kind}: {name}", _folder_case(kind, mut, "convert")))
        for target in ("weights", "config"):
            for name in ("truncated-half", "empty", "garbage", "missing", "pickle"):
                def mut(src, target=target, name=name, kind=kind):
                    p = weight_files(src)[0] if target == "weights" else src / CONFIG_FILES[kind]
                    file_mutations(src.parent / MARKER)[name](p)
                cases.append(Case(f"convert {kind}: {target} {name}",
                                  _folder_case(kind, mut, "convert")))
    table = {"native": NATIVE_CONFIG, "ct-clt": CT_CONFIG, "ct-set": CT_SET_CONFIG,
             "sae-lens": SAE_CONFIG}
    for kind, changes in table.items():
        for name, change in changes.items():
            cases.append(Case(f"convert {kind}: config {name}",
                              _folder_case(kind, _config_mutation(kind, change), "convert")))
    for name, change in EVALUATE_CONFIG.items():
        cases.append(Case(f"evaluate native: config {name}",
                          _folder_case("native", _config_mutation("native", change), "evaluate")))
    for dims in ({"d_model": 7}, {"n_layers": 3}, {"d_model": 7, "n_layers": 1}):
        def other_shape(ws, dims=dims):
            native_folder(ws / "src", **dims)  # consistent in itself, not with its case study
            return ["evaluate", str(ws / "src")]
        cases.append(Case(f"evaluate native: trained for another shape {dims}", other_shape))
    for name in ("nan", "wrong-shape", "drop-tensor"):
        mut = (lambda c: lambda src: _rewrite(weight_files(src)[0], c))(tensor_mutations()[name])
        cases.append(Case(f"evaluate native: {name}", _folder_case("native", mut, "evaluate")))
        cases.append(Case(f"graph ct-clt: {name}", _folder_case("ct-clt", mut, "graph")))
    for name in ("weights pickle", "config skip-no"):
        def mut(src, name=name):
            if name == "weights pickle":
                write_payload(weight_files(src)[0], src.parent / MARKER)
            else:
                _edit_json(src / "config.json", NATIVE_CONFIG["skip-no"])
        cases.append(Case(f"evaluate native: {name}", _folder_case("native", mut, "evaluate")))
    return cases


def pickle_only_cases() -> list[Case]:
    """Folders that hold nothing but a pickled checkpoint: refused, never loaded."""
    cases = []
    for fname in ("pytorch_model.bin", "model.pt", "weights.ckpt"):
        def setup(ws, fname=fname, cmd="convert"):
            src = ws / "src"
            src.mkdir()
            write_payload(src / fname, ws / MARKER)
            return ["convert", str(src), str(ws / "out"), "--to", "clt-eval"]
        cases.append(Case(f"convert pickle-only folder: {fname}", setup))

    def evaluate_setup(ws):
        src = ws / "src"
        src.mkdir()
        write_payload(src / "pytorch_model.bin", ws / MARKER)
        return ["evaluate", str(src)]
    cases.append(Case("evaluate pickle-only folder", evaluate_setup))
    return cases


def spec_text(data: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data)
    if fmt == "yaml":
        import yaml
        return yaml.safe_dump(data)
    return toml_dumps(data)


def toml_dumps(data: dict) -> str:
    """Just enough TOML for the specs below (scalars, lists, tables, arrays of tables)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        return repr(v)
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append(f"[{k}]\n" + "".join(f"{a} = {val(b)}\n" for a, b in v.items()))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables += [f"[[{k}]]\n" + "".join(f"{a} = {val(b)}\n" for a, b in x.items())
                       for x in v]
        else:
            lines.append(f"{k} = {val(v)}")
    return "\n".join(lines) + "\n\n" + "\n".join(tables)


BASE_SPEC = {"name": "t", "case_study": CASE, "train": {"steps": 5},
             "grid": [{"arch": ["plt", "clt"], "penalty": "l1", "sparsity_coef": [0.1],
                       "seeds": 1}]}


def _grid(**kw):
    return lambda d: d | {"grid": [d["grid"][0] | kw]}


SPEC_MUTATIONS = {
    "seed-str": _grid(seed=["a"]), "seed-float": _grid(seed=[0.5]),
    "seed-negative": _grid(seed=[-1]), "seed-2**64": _grid(seed=[2**64]),
    "skip-no": _grid(skip="no"), "n_features-str": _grid(n_features="16"),
    "sparsity-str": _grid(sparsity_coef=["0.1"]), "seeds-huge": _grid(seeds=10**9),
    "arch-list-of-lists": _grid(arch=[["plt"]]), "unknown-grid-key": _grid(colour=1),
    "log-n-huge": _grid(sparsity_coef={"log": [0.1, 1.0, 10**9]}),
    "absurd-product": _grid(n_features=list(range(1, 400)), seeds=400),
    "steps-str": lambda d: d | {"train": {"steps": "5"}},
    "steps-negative": lambda d: d | {"train": {"steps": -5}},
    "steps-bool": lambda d: d | {"train": {"steps": True}},
    "drop-grid": lambda d: {k: v for k, v in d.items() if k != "grid"},
    "grid-scalar": lambda d: d | {"grid": 3},
    "unknown-top-key": lambda d: d | {"speed": 3},
    "case-study-list": lambda d: d | {"case_study": ["x"]},
    "case-study-unknown": lambda d: d | {"case_study": "no_such_case"},
    "matched-targets-str": lambda d: d | {"matched_l0": {"targets": ["1"]}},
}


def spec_cases() -> list[Case]:
    cases = []
    for fmt in ("toml", "yaml", "json"):
        for name, change in SPEC_MUTATIONS.items():
            def setup(ws, fmt=fmt, change=change):
                path = ws / f"spec.{fmt}"
                path.write_text(spec_text(change(BASE_SPEC), fmt))
                return ["sweep", str(path), "--out", str(ws / "out")]
            cases.append(Case(f"sweep {fmt}: {name}", setup))
    broken = {"toml": "grid = [", "yaml": "grid: [", "json": "{\"grid\": "}
    for fmt, text in broken.items():
        def setup(ws, fmt=fmt, text=text):
            (ws / f"spec.{fmt}").write_text(text)
            return ["sweep", str(ws / f"spec.{fmt}"), "--out", str(ws / "out")]
        cases.append(Case(f"sweep {fmt}: syntax error", setup))
    for fname, body in (("spec.txt", "x"), ("missing.toml", None), ("spec.yaml", "- 1\n- 2\n"),
                        ("spec.json", "null")):
        def setup(ws, fname=fname, body=body):
            if body is not None:
                (ws / fname).write_text(body)
            return ["sweep", str(ws / fname), "--out", str(ws / "out")]
        cases.append(Case(f"sweep file: {fname} {'missing' if body is None else 'bad'}",
                          setup))
    return cases


def _argv(*args) -> Callable[[Path], list[str]]:
    """argv with {ws} replaced by the case folder."""
    return lambda ws: [a.replace("{ws}", str(ws)) for a in args]


TRAIN = ("train", "--out", "{ws}/out", "--steps", "2")
OPTION_CASES = {
    # train: RunSpec / TrainConfig values
    "train seed negative": (*TRAIN, "--seed", "-1"),
    "train seed 2**64": (*TRAIN, "--seed", str(2**64)),
    "train seed float": (*TRAIN, "--seed", "1.5"),
    "train seed word": (*TRAIN, "--seed", "abc"),
    "train n-features 0": (*TRAIN, "--n-features", "0"),
    "train n-features negative": (*TRAIN, "--n-features", "-3"),
    "train n-features huge": (*TRAIN, "--n-features", str(10**12)),
    "train steps negative": ("train", "--out", "{ws}/out", "--steps", "-5"),
    "train steps 0": ("train", "--out", "{ws}/out", "--steps", "0"),
    "train lr negative": (*TRAIN, "--lr", "-1"),
    "train lr nan": (*TRAIN, "--lr", "nan"),
    "train lr inf": (*TRAIN, "--lr", "inf"),
    "train sparsity negative": (*TRAIN, "--sparsity-coef", "-1"),
    "train sparsity nan": (*TRAIN, "--sparsity-coef", "nan"),
    "train arch unknown": (*TRAIN, "--arch", "mlp"),
    "train penalty unknown": (*TRAIN, "--penalty", "l2"),
    "train decoder-norm unknown": (*TRAIN, "--decoder-norm", "max"),
    "train activation unknown": (*TRAIN, "--activation", "gelu"),
    "train topk k 0": (*TRAIN, "--penalty", "topk", "--decoder-norm", "none", "--k", "0"),
    "train k with l1": (*TRAIN, "--k", "2"),
    "train topk-mode unknown": (*TRAIN, "--topk-mode", "sometimes"),
    "train wandb-mode unknown": (*TRAIN, "--wandb-mode", "loud"),
    "train batch-size negative": (*TRAIN, "--batch-size", "-1"),
    "train divergence 0.5": (*TRAIN, "--divergence-factor", "0.5"),
    "train lambda-warmup 2": (*TRAIN, "--lambda-warmup-frac", "2"),
    "train bandwidth 0": (*TRAIN, "--penalty", "l0", "--decoder-norm", "none",
                          "--jumprelu-bandwidth", "0"),
    "train tanh-scale negative": (*TRAIN, "--tanh-scale", "-1"),
    "train cross-layer negative": (*TRAIN, "--cross-layer-coef", "-1"),
    "train case-study unknown": (*TRAIN, "--case-study", "no_such_case"),
    "train case-study bad module": (*TRAIN, "--case-study", "no.such:Factory"),
    "train case-study not a case": (*TRAIN, "--case-study", "os:getcwd"),
    "train case-study bad argument": (*TRAIN, "--case-study", "boolean_chain@k=-3"),
    "train case-study empty": (*TRAIN, "--case-study", ""),
    "train unknown option": (*TRAIN, "--colour", "red"),
    "train model without layers": (*TRAIN, "--model", "tiny"),
    "train model layer out of range": (*TRAIN, "--model", "tiny", "--layers", "99"),
    "train model layer negative": (*TRAIN, "--model", "tiny", "--layers", "-1"),
    "train model layers repeated": (*TRAIN, "--model", "tiny", "--layers", "1", "1"),
    "train model missing corpus": (*TRAIN, "--model", "tiny", "--layers", "0", "--corpus",
                                   "{ws}/nope.txt"),
    "train model n-tokens 0": (*TRAIN, "--model", "tiny", "--layers", "0", "--n-tokens", "0"),
    "train model n-ctx negative": (*TRAIN, "--model", "tiny", "--layers", "0", "--n-ctx", "-1"),
    "train model bad hook": (*TRAIN, "--model", "tiny", "--layers", "0", "--input-hook",
                             "blocks.{layer}.{x}"),
    "train model hook without layer": (*TRAIN, "--model", "tiny", "--layers", "0",
                                       "--output-hook", "blocks.0.hook_mlp_out"),
    "train model hook not in model": (*TRAIN, "--model", "tiny", "--layers", "0",
                                      "--output-hook", "blocks.{layer}.hook_nothing"),
    # sweep: grid flags
    "sweep seeds 0": ("sweep", "--out", "{ws}/out", "--seeds", "0"),
    "sweep seeds negative": ("sweep", "--out", "{ws}/out", "--seeds", "-2"),
    "sweep seeds huge": ("sweep", "--out", "{ws}/out", "--seeds", str(10**9)),
    "sweep steps negative": ("sweep", "--out", "{ws}/out", "--steps", "-1"),
    "sweep arch unknown": ("sweep", "--out", "{ws}/out", "--arch", "mlp"),
    "sweep lambda-log reversed": ("sweep", "--out", "{ws}/out", "--lambda-log", "1", "0.1", "3"),
    "sweep lambda-log fraction": ("sweep", "--out", "{ws}/out", "--lambda-log", "0.1", "1",
                                  "2.5"),
    "sweep lambda-log huge": ("sweep", "--out", "{ws}/out", "--lambda-log", "0.1", "1", "1e9"),
    "sweep lambda-log nan": ("sweep", "--out", "{ws}/out", "--lambda-log", "nan", "1", "3"),
    "sweep n-features absurd grid": ("sweep", "--out", "{ws}/out", "--n-features",
                                     *map(str, range(1, 400)), "--seeds", "400"),
    "sweep case-study unknown": ("sweep", "--out", "{ws}/out", "--case-study", "nope"),
    "sweep sparsity negative": ("sweep", "--out", "{ws}/out", "--sparsity-coef", "-1"),
    # reproduce
    "reproduce seeds 0": ("reproduce", "--out", "{ws}/out", "--seeds", "0"),
    "reproduce steps negative": ("reproduce", "--out", "{ws}/out", "--steps", "-3"),
    "reproduce n-features 0": ("reproduce", "--out", "{ws}/out", "--n-features", "0"),
    "reproduce case unknown": ("reproduce", "--out", "{ws}/out", "--case-study", "nope"),
    "reproduce wandb unknown": ("reproduce", "--out", "{ws}/out", "--wandb-mode", "loud"),
    # patch
    "patch seeds 0": ("patch", "--out", "{ws}/out", "--seeds", "0"),
    "patch steps negative": ("patch", "--out", "{ws}/out", "--steps", "-1"),
    "patch case unknown": ("patch", "--out", "{ws}/out", "--case-study", "nope"),
    # evaluate / convert / graph / compare / case-studies: paths and choices
    "evaluate missing folder": ("evaluate", "{ws}/nope"),
    "evaluate empty folder": ("evaluate", "{ws}"),
    "convert format unknown": ("convert", "{ws}", "{ws}/out", "--to", "onnx"),
    "convert missing source": ("convert", "{ws}/nope", "{ws}/out", "--to", "clt-eval"),
    "convert empty source": ("convert", "{ws}", "{ws}/out", "--to", "clt-eval"),
    "graph missing transcoder": ("graph", "{ws}/nope", "--model", "tiny", "--prompt", "hi",
                                 "--out", "{ws}/out"),
    "graph node-threshold 2": ("graph", "{ws}", "--model", "tiny", "--prompt", "hi",
                               "--node-threshold", "2", "--out", "{ws}/out"),
    "graph max-logits 0": ("graph", "{ws}", "--model", "tiny", "--prompt", "hi",
                           "--max-logits", "0", "--out", "{ws}/out"),
    "compare missing transcoders": ("compare", "{ws}/a", "{ws}/b", "--model", "tiny",
                                    "--out", "{ws}/out"),
    "compare threads 0": ("compare", "{ws}/a", "{ws}/b", "--model", "tiny", "--threads", "0",
                          "--out", "{ws}/out"),
    "compare missing prompts": ("compare", "{ws}/a", "{ws}/b", "--model", "tiny", "--prompts",
                                "{ws}/nope.json", "--out", "{ws}/out"),
    "case-studies new bad name": ("case-studies", "new", "1bad-name", "--out", "{ws}/out"),
    "case-studies new keyword": ("case-studies", "new", "class", "--out", "{ws}/out"),
    "case-studies new no out": ("case-studies", "new", "my_case"),
    "case-studies unknown action": ("case-studies", "delete"),
    "no command": (),
    "unknown command": ("frobnicate",),
}


def option_cases() -> list[Case]:
    return [Case(name, _argv(*argv)) for name, argv in OPTION_CASES.items()]


def _valid_graph_pair(ws: Path) -> None:
    """A windowed PLT and CLT for the tiny model (4 layers, d_model 32), in ws/a and ws/b."""
    from clt_eval.formats import native
    from clt_eval.lm.window import LayerWindow

    win = LayerWindow((0, 1))
    native.save_native(transcoder(arch="plt", d_model=32), win, ws / "a")
    native.save_native(transcoder(arch="clt", d_model=32), win, ws / "b")


def environment_cases() -> list[Case]:
    cases = []
    # --out is a file, or lies under a file
    outs = {"out is a file": "{ws}/file", "out under a file": "{ws}/file/sub"}
    commands = {
        "train": ("train", "--steps", "1", "--out"),
        "sweep": ("sweep", "--steps", "1", "--seeds", "1", "--arch", "plt", "--out"),
        "reproduce": ("reproduce", "--quick", "--out"),
        "patch": ("patch", "--steps", "1", "--seeds", "1", "--out"),
        "case-studies new": ("case-studies", "new", "my_case", "--out"),
    }
    for label, out in outs.items():
        for cmd, args in commands.items():
            def setup(ws, args=args, out=out):
                (ws / "file").write_text("keep me")
                return [*args, out.replace("{ws}", str(ws))]
            cases.append(Case(f"{cmd}: {label}", setup, subprocess=cmd == "reproduce"))

        def convert_setup(ws, out=out):
            native_folder(ws / "src")
            (ws / "file").write_text("keep me")
            return ["convert", str(ws / "src"), out.replace("{ws}", str(ws)), "--to", "clt-eval"]
        cases.append(Case(f"convert: {label}", convert_setup))

        def graph_setup(ws, out=out):
            _valid_graph_pair(ws)
            (ws / "file").write_text("keep me")
            return ["graph", str(ws / "a"), "--model", "tiny", "--prompt", "hi", "--out",
                    out.replace("{ws}", str(ws))]
        cases.append(Case(f"graph: {label}", graph_setup))

        def compare_setup(ws, out=out):
            _valid_graph_pair(ws)
            (ws / "file").write_text("keep me")
            return ["compare", str(ws / "a"), str(ws / "b"), "--model", "tiny", "--out",
                    out.replace("{ws}", str(ws))]
        cases.append(Case(f"compare: {label}", compare_setup))

    def convert_into_folder(ws):
        native_folder(ws / "src")
        (ws / "out").mkdir()
        (ws / "out" / "notes.txt").write_text("keep me")
        return ["convert", str(ws / "src"), str(ws / "out"), "--to", "clt-eval"]
    cases.append(Case("convert: dst holds unrelated files", convert_into_folder))

    def convert_onto_itself(ws):
        native_folder(ws / "src")
        return ["convert", str(ws / "src"), str(ws / "src"), "--to", "circuit-tracer"]
    cases.append(Case("convert: dst is the source", convert_onto_itself))

    # full disk and read-only folders, simulated by patching the write functions
    for err, label in ((errno.ENOSPC, "disk full"), (errno.EACCES, "read-only out")):
        def convert_fault(ws):
            native_folder(ws / "src")
            (ws / "dst").mkdir()
            return ["convert", str(ws / "src"), str(ws / "dst" / "out"), "--to", "clt-eval"]
        patch = (lambda e: lambda ws: failing_writes(ws / "dst", e))(err)
        cases.append(Case(f"convert: {label}", convert_fault, patch=patch))

        def train_fault(ws):
            (ws / "dst").mkdir()
            return ["train", "--steps", "1", "--wandb-mode", "disabled", "--out",
                    str(ws / "dst" / "out")]
        cases.append(Case(f"train: {label}", train_fault, patch=patch))

        def scaffold_fault(ws):
            (ws / "dst").mkdir()
            return ["case-studies", "new", "my_case", "--out", str(ws / "dst" / "out")]
        cases.append(Case(f"case-studies new: {label}", scaffold_fault, patch=patch))

        def evaluate_fault(ws):
            (ws / "dst").mkdir()
            native_folder(ws / "dst" / "tc")
            return ["evaluate", str(ws / "dst" / "tc")]
        cases.append(Case(f"evaluate: {label}", evaluate_fault, patch=patch))

    # the network is off (HF_HUB_OFFLINE=1): a hub id, and a model file that is not there
    for model in ("gpt2", "HuggingFaceTB/SmolLM2-135M", "{ws}/missing.json", "{ws}/bad.json"):
        def graph_model(ws, model=model):
            _valid_graph_pair(ws)
            (ws / "bad.json").write_text("{\"n_layers\": ")
            return ["graph", str(ws / "a"), "--model", model.replace("{ws}", str(ws)),
                    "--prompt", "hi", "--out", str(ws / "out")]
        cases.append(Case(f"graph: model {model}", graph_model, subprocess=True))

        def train_model(ws, model=model):
            (ws / "bad.json").write_text("{\"n_layers\": ")
            return ["train", "--steps", "1", "--out", str(ws / "out"), "--model",
                    model.replace("{ws}", str(ws)), "--layers", "0"]
        cases.append(Case(f"train: model {model}", train_model, subprocess=True))

    def compare_hub(ws):
        _valid_graph_pair(ws)
        return ["compare", str(ws / "a"), str(ws / "b"), "--model", "gpt2", "--out",
                str(ws / "out")]
    cases.append(Case("compare: model gpt2 offline", compare_hub, subprocess=True))

    def plt_clt_swapped(ws):
        _valid_graph_pair(ws)
        return ["compare", str(ws / "b"), str(ws / "a"), "--model", "tiny", "--out",
                str(ws / "out")]
    cases.append(Case("compare: PLT and CLT swapped", plt_clt_swapped))

    def graph_window_too_deep(ws):
        from clt_eval.formats import native
        from clt_eval.lm.window import LayerWindow

        native.save_native(transcoder(arch="plt", d_model=32), LayerWindow((6, 7)), ws / "a")
        return ["graph", str(ws / "a"), "--model", "tiny", "--prompt", "hi", "--out",
                str(ws / "out")]
    cases.append(Case("graph: window beyond the model's layers", graph_window_too_deep))

    def graph_wrong_width(ws):
        from clt_eval.formats import native
        from clt_eval.lm.window import LayerWindow

        native.save_native(transcoder(arch="plt", d_model=10), LayerWindow((0, 1)), ws / "a")
        return ["graph", str(ws / "a"), "--model", "tiny", "--prompt", "hi", "--out",
                str(ws / "out")]
    cases.append(Case("graph: d_model differs from the model's", graph_wrong_width))

    def plugin_raises(ws):
        (ws / "badplugin.py").write_text("def Factory():\n    raise RuntimeError('boom')\n")
        return ["train", "--steps", "1", "--out", str(ws / "out"), "--case-study",
                "badplugin:Factory"]
    cases.append(Case("train: plugin factory raises", plugin_raises, subprocess=True,
                      env={"PYTHONPATH": "{ws}"}))
    return cases


def all_cases() -> list[Case]:
    return (folder_cases() + pickle_only_cases() + spec_cases() + option_cases()
            + environment_cases())


# ---- running -------------------------------------------------------------------------------
def run_in_process(case: Case, ws: Path, argv: list[str]) -> tuple:
    from clt_eval.training.cli import main

    out, err = io.StringIO(), io.StringIO()
    rc, crashed = None, None
    patch = case.patch(ws) if case.patch else contextlib.nullcontext()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with patch:
                rc = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - any escape breaks the promise
            crashed = type(exc).__name__
            err.write(traceback.format_exc())
    return rc, err.getvalue(), crashed


def run_subprocess(case: Case, ws: Path, argv: list[str]) -> tuple:
    env = os.environ | {k: v.replace("{ws}", str(ws)) for k, v in case.env.items()}
    try:
        p = subprocess.run([str(CLI), *argv], cwd=ws, env=env, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, "", f"timeout after {TIMEOUT_S} s"
    return p.returncode, p.stderr, None


def run_case(case: Case, ws: Path) -> tuple[bool, str]:
    """Set up, run and judge one case (in the calling process)."""
    ws.mkdir(parents=True)
    os.chdir(ws)  # default output folders (runs/...) land here, where they are seen
    argv = case.setup(ws)
    before = snapshot(ws)
    runner = run_subprocess if case.subprocess else run_in_process
    rc, stderr, crashed = runner(case, ws, argv)
    return verdict(rc, stderr, written(before, snapshot(ws)), crashed)


def _worker(case: Case, ws: Path, conn) -> None:
    try:
        import torch
        torch.set_num_threads(1)
        conn.send(run_case(case, ws))
    except BaseException as exc:  # noqa: BLE001 - a broken setup is reported, not hidden
        conn.send((False, f"case setup failed: {type(exc).__name__}: {exc}"))


def run_all(cases: list[Case], root: Path, workers: int, verbose: bool) -> list[tuple]:
    ctx = mp.get_context("fork")
    pending = list(enumerate(cases))
    running: dict = {}
    results: list = [None] * len(cases)
    while pending or running:
        while pending and len(running) < workers:
            i, case = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(case, root / f"case{i:03d}", send))
            proc.start()
            running[i] = (proc, recv, time.monotonic())
        for i, (proc, recv, t0) in list(running.items()):
            if recv.poll():
                results[i] = recv.recv()
            elif not proc.is_alive():
                results[i] = (False, f"worker died (exit {proc.exitcode})")
            elif time.monotonic() - t0 > TIMEOUT_S + 30:
                proc.kill()
                results[i] = (False, "timed out")
            else:
                continue
            proc.join()
            del running[i]
            ok, why = results[i]
            print(f"{'PASS' if ok else 'FAIL'}  {time.monotonic() - t0:5.1f}s  {cases[i].name}"
                  + (f"  [{why}]" if (verbose or not ok) else ""), flush=True)
        time.sleep(0.02)
    return results


def warm_up() -> None:
    """Import what the commands import, once in the parent: each forked case then starts
    warm instead of paying seconds of imports (transformer_lens alone takes ~9 s)."""
    import importlib

    for name in ("torch", "yaml", "safetensors.torch", "clt_eval.training.cli",
                 "clt_eval.formats", "clt_eval.formats.convert", "clt_eval.io",
                 "clt_eval.evaluate", "clt_eval.lm.models", "clt_eval.training.runs",
                 "clt_eval.training.sweep", "clt_eval.training.reproduce",
                 "clt_eval.training.patch_job", "clt_eval.training.graph_plot",
                 "clt_eval.training.compare", "clt_eval.training.scaffold"):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a case will report the same failure
            print(f"warm-up: {name} does not import ({type(exc).__name__}: {exc})")
    from clt_eval.case_study import load_case_study

    load_case_study(CASE).model()  # builds the model class hierarchy once


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="run the cases whose name contains this")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("-v", "--verbose", action="store_true", help="print each passing case's "
                   "error line too")
    args = p.parse_args()
    # No network (a hub id must fail at once) and no wandb runs, in every case.
    os.environ |= {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    warm_up()

    cases = [c for c in all_cases() if args.only in c.name]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp:
        results = run_all(cases, Path(tmp), args.workers, args.verbose)
    passed = sum(ok for ok, _ in results)
    print(f"\n{passed}/{len(cases)} cases meet the promise ({100 * passed / len(cases):.1f}%) "
          f"in {time.perf_counter() - t0:.0f} s")
    failed = [(c.name, why) for c, (ok, why) in zip(cases, results, strict=True) if not ok]
    if failed:
        print("failing cases:")
        for name, why in failed:
            print(f"  {name}: {why}")
    sys.exit(0 if not failed else 1)


if __name__ == "__main__":
    main()
