"""Preflight: every writing job checks its output folder, takes its lock and sizes its grid
before anything heavy starts; a refusal is one line, exit 2, with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from clt_eval._api_setup import train_specs
from clt_eval.device import auto_threads, resolve_device, resolve_dtype
from clt_eval.errors import CltEvalError
from clt_eval.training import preflight
from clt_eval.training.cli import build_parser, main
from clt_eval.training.config import RunSpec
from clt_eval.training.preflight import LOCK, MARKER, OutputLock, check_output, job_output


def _cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this PID now (reuse within the test is unlikely)


# ---- the output folder ---------------------------------------------------------------------
def test_a_file_or_a_file_on_the_path_is_refused(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(CltEvalError, match=r"--out '.*/f': is a file"):
        check_output(f, "train")
    with pytest.raises(CltEvalError, match=r"on its path is a file"):
        check_output(f / "a" / "b", "train")
    assert _tree(tmp_path) == ["f"]


def test_an_unwritable_folder_is_refused(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: simulate what a user without rights sees
        monkeypatch.setattr(preflight.os, "access", lambda *a, **k: False)
    else:
        ro.chmod(0o500)
    try:
        with pytest.raises(CltEvalError, match="is not writable"):
            check_output(ro / "out", "train")
    finally:
        ro.chmod(0o700)
    assert _tree(tmp_path) == ["ro"]


def test_too_little_free_disk_names_both_sizes(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 3 * 2**20))
    with pytest.raises(CltEvalError, match=r"needs about 4\.0 MiB of disk but .* has 3\.0 MiB"):
        check_output(tmp_path / "out", "train", expect_bytes=4 * 2**20)
    check_output(tmp_path / "out", "train", expect_bytes=2 * 2**20)  # enough


def test_another_jobs_folder_is_refused_and_the_same_job_resumes(tmp_path):
    out = tmp_path / "out"
    with job_output(out, "train"):
        (out / "results.json").write_text("{}")
    assert json.loads((out / MARKER).read_text())["job"] == "train"
    with pytest.raises(CltEvalError, match=r"holds the results of `clt-eval train`"):
        check_output(out, "sweep")
    (out / "metrics.json").write_text("{}")  # what evaluate adds
    check_output(out, "train")
    # Without a marker (an older clt-eval) the files tell: train's results refuse a sweep.
    (out / MARKER).unlink()
    with pytest.raises(CltEvalError, match=r"results of another clt-eval job: results.json"):
        check_output(out, "sweep")
    check_output(out, "train")


def test_a_folder_of_unrelated_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CltEvalError, match=r"holds files clt-eval did not write \(notes.txt\)"):
        check_output(tmp_path, "sweep")


def test_nothing_is_created_when_a_check_fails(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "paper.tex").write_text("x")
    with pytest.raises(CltEvalError), job_output(tmp_path / "out" / ".." / "out", "patch"):
        pass
    assert _tree(tmp_path) == ["out", "out/paper.tex"]


def test_a_job_that_fails_before_writing_leaves_no_folder(tmp_path):
    with pytest.raises(CltEvalError, match="boom"), job_output(tmp_path / "a" / "b", "graph"):
        raise CltEvalError("boom")
    assert _tree(tmp_path) == []
    # convert replaces its folder whole: the parents it needed go too, and its lock.
    with pytest.raises(CltEvalError), job_output(tmp_path / "d" / "dst", "convert"):
        raise CltEvalError("bad source")
    assert _tree(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), job_output(tmp_path / "c", "sweep") as out:
        (out / "sweep.json").write_text("{}")  # partial results stay, to resume from
        raise KeyboardInterrupt
    assert _tree(tmp_path) == ["c", f"c/{MARKER}", "c/sweep.json"]


# ---- one writer per folder -----------------------------------------------------------------
def test_a_live_writer_is_refused_with_its_pid(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": os.getppid(), "started": "2026-01-01T00:00",
                                             "host": preflight._HOST, "command": "x"}))
    with pytest.raises(CltEvalError, match=rf"PID {os.getppid()}, started 2026-01-01T00:00"):
        OutputLock(tmp_path).acquire()
    assert (tmp_path / LOCK).exists()  # not ours to remove


def test_a_lock_held_by_another_process_is_refused(tmp_path):
    code = ("import sys, time; from clt_eval.training.preflight import OutputLock; "
            f"lock = OutputLock({str(tmp_path)!r}); lock.acquire(); print('held', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CltEvalError, match=rf"PID {holder.pid}"):
            OutputLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # Killed (as by SIGKILL): its lock is stale, and the next writer takes it over.
    assert (tmp_path / LOCK).exists()
    with OutputLock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()


def test_a_stale_lock_is_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": preflight._HOST}))
    with OutputLock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()


def test_the_lock_is_reentrant_and_released_on_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt), OutputLock(tmp_path):
        with OutputLock(tmp_path):  # the API inside the command line takes it again
            pass
        assert (tmp_path / LOCK).exists()  # still held by the outer one
        raise KeyboardInterrupt
    assert not (tmp_path / LOCK).exists()


def test_a_half_written_lock_counts_as_held_only_while_young(tmp_path):
    (tmp_path / LOCK).write_text("")
    with pytest.raises(CltEvalError, match="starting here"):
        OutputLock(tmp_path).acquire()
    old = time.time() - 60
    os.utime(tmp_path / LOCK, (old, old))
    with OutputLock(tmp_path):
        pass


# ---- what a grid costs ---------------------------------------------------------------------
def test_grid_bytes_counts_weights_optimiser_and_activations():
    # L=2, D=3, F=5: W_enc 30, dense W_dec 60, b_enc 10, b_dec 6 -> 106 floats per run.
    assert preflight.run_bytes(2, 3, 5) == 106 * 4
    assert preflight.run_bytes(2, 3, 5, skip=True) == (106 + 18) * 4
    # 7 runs: 4 copies of the weights each, plus 11 rows x 2 layers x 5 features x 4 copies.
    assert preflight.grid_bytes(2, 3, 5, runs=7, rows=11) == 106 * 4 * 4 * 7 + 11 * 10 * 7 * 16


def test_check_memory_names_need_and_availability():
    with pytest.raises(CltEvalError, match=r"needs about 2\.0 GiB .* has 1\.0 GiB available"):
        preflight.check_memory(2 * 2**30, "train", available=2**30)
    preflight.check_memory(2**30, "train", available=2**30)
    assert preflight.available_memory() > 0


def test_spec_runs_are_counted_without_expanding_them():
    data = {"grid": [{"arch": ["plt", "clt"], "sparsity_coef": {"log": [1e-3, 10, 10**6]},
                      "seeds": 10**5}, {"penalty": "l1"}]}
    assert preflight.count_spec_runs(data) == 2 * 10**6 * 10**5 + 1
    for malformed in (3, "grid", {"arch": "plt"}, None):  # left for the spec parser to name
        assert preflight.count_spec_runs({"grid": malformed}) == 0
    with pytest.raises(CltEvalError, match=r"200,000,000,001 runs; expected at most 100,000"):
        preflight.check_run_count(preflight.count_spec_runs(data), "spec")


# ---- devices and threads -------------------------------------------------------------------
def test_device_and_dtype_names():
    import torch

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CltEvalError, match="--device 'tpu': unknown device; expected auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CltEvalError, match="--device cuda: no CUDA device is available; "
                                               "expected cpu or auto"):
            resolve_device("cuda")
        with pytest.raises(CltEvalError, match="--device cuda:1: no CUDA device"):
            resolve_device("cuda:1")
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(CltEvalError, match="--dtype 'float16': unknown dtype"):
        resolve_dtype("float16")
    assert 1 <= auto_threads() <= min(32, len(os.sched_getaffinity(0)))


def test_auto_threads_leave_the_cores_other_jobs_keep_busy(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    quiet = auto_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (float(os.cpu_count()), 0.0, 0.0))
    assert auto_threads() == 1 <= quiet


# Allocates and frees a 64 MB tensor; prints whether malloc kept it and how it served it.
_KEPT_MEMORY_PROBE = r"""
import ctypes, json, sys
import torch
from clt_eval.device import keep_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2 (size_t fields)
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
            "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
kept = keep_freed_memory()
t = torch.empty(16 << 20)  # 64 MB: glibc maps any block over 32 MB on its own by default
mapped = libc.mallinfo2().hblkhd
del t
print(json.dumps({"kept": kept, "mapped": mapped, "free": libc.mallinfo2().fordblks}))
"""


def _kept_memory_probe(**env) -> dict:
    res = subprocess.run([sys.executable, "-c", _KEPT_MEMORY_PROBE], capture_output=True,
                         text=True, env={**os.environ, **env}, check=True)
    return json.loads(res.stdout)


@pytest.mark.skipif(sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's malloc only")
def test_large_tensors_reuse_freed_memory_unless_opted_out():
    on = _kept_memory_probe(CLT_EVAL_KEEP_FREED_MEMORY="1")
    assert on["kept"] and on["mapped"] < 16 << 20  # served from the heap...
    assert on["free"] >= 64 << 20  # ...and kept there once freed, for the next one
    off = _kept_memory_probe(CLT_EVAL_KEEP_FREED_MEMORY="0")
    assert not off["kept"] and off["mapped"] >= 64 << 20  # glibc's default: its own mapping


def test_toy_products_are_tiny_and_wide_or_real_ones_are_not():
    from clt_eval._api_setup import tiny_products

    assert tiny_products("boolean_two_step", 16, 0)  # 16 rows x d_model 10 x 16 features
    assert tiny_products("boolean_two_step", 32, 256)  # the batch is the 16-row table
    assert not tiny_products("boolean_two_step", 4096, 0)
    assert tiny_products("continuous_two_step", 16, 256)  # 256 rows x 10 x 16
    # a transformer's 48-wide stream in minibatches of 256: products worth a second thread
    assert not tiny_products("two_hop_transformer", 16, 256)


def test_threads_come_from_the_option_and_are_given_back(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # the same auto count twice

    import torch

    from clt_eval._api_setup import compute

    before = torch.get_num_threads()
    for threads, expected in ((1, 1), ("auto", auto_threads())):
        with compute(threads, device="cpu", dtype="float32"):
            assert torch.get_num_threads() == expected
        assert torch.get_num_threads() == before
    from clt_eval.device import auto_workers
    from clt_eval.training import workers

    # toy products: threads would only wait; the cores go to worker processes instead
    with compute("auto", device="cpu", dtype="float32", tiny=True):
        assert torch.get_num_threads() == 1 and workers.workers() == auto_workers()
    with compute(2, device="cpu", dtype="float32", tiny=True):
        assert torch.get_num_threads() == 1 and workers.workers() == 2  # a number is used
    assert workers.workers() == 1
    assert torch.get_num_threads() == before
    # main() sets them for its command only: an embedding program keeps its own setting.
    code, err = _cli(["graph", str(tmp_path / "none"), "--model", "tiny", "--prompt", "a",
                      "--threads", "2", "--out", str(tmp_path / "g")], capsys)
    assert code == 2 and torch.get_num_threads() == before, err
    assert not (tmp_path / "g").exists()


# ---- the command line ----------------------------------------------------------------------
def _blocked_folder(tmp_path, kind, monkeypatch, command):
    """An --out that every writing command must refuse, and the text of the refusal."""
    if kind == "file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f", "is a file"
    if kind == "under_file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f" / "out", "on its path is a file"
    if kind == "read_only":
        monkeypatch.setattr(preflight.os, "access", lambda *a, **k: False)
        return tmp_path / "out", "is not writable"
    if kind == "full_disk":
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(1, 1, 0))
        return tmp_path / "out", "of disk but"
    if kind == "locked":
        # convert and case-studies new replace their folder whole: their lock lies beside it.
        lock = tmp_path / f".out{LOCK}" if command in ("convert", "case-studies") else \
            tmp_path / "out" / LOCK
        lock.parent.mkdir(exist_ok=True)
        lock.write_text(json.dumps({"pid": os.getppid(), "host": preflight._HOST}))
        return tmp_path / "out", f"PID {os.getppid()}"
    raise AssertionError(kind)


COMMANDS = {
    "train": lambda out: ["train", "--out", out, "--steps", "3"],
    "sweep": lambda out: ["sweep", "--arch", "plt", "--steps", "3", "--out", out],
    "reproduce": lambda out: ["reproduce", "--quick", "--out", out],
    "graph": lambda out: ["graph", "tc", "--model", "tiny", "--prompt", "a b", "--out", out],
    "compare": lambda out: ["compare", "p", "c", "--model", "tiny", "--out", out],
    "patch": lambda out: ["patch", "--out", out],
    "convert": lambda out: ["convert", "src", out, "--to", "clt-eval"],
    "case-studies": lambda out: ["case-studies", "new", "my_toy", "--out", out],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["file", "under_file", "read_only", "full_disk", "locked"])
def test_every_writing_command_refuses_a_bad_out_at_once(command, kind, tmp_path, monkeypatch,
                                                         capsys):
    out, needle = _blocked_folder(tmp_path, kind, monkeypatch, command)
    before = _tree(tmp_path)
    started = time.perf_counter()
    code, err = _cli(COMMANDS[command](str(out)), capsys)
    took = time.perf_counter() - started
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert _tree(tmp_path) == before
    assert took < 1.0, f"{took:.2f} s: the folder must be checked before heavy imports"


def test_sweep_into_a_train_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    with job_output(out, "train"):
        (out / "results.json").write_text("{}")
    before = _tree(tmp_path)
    code, err = _cli(["sweep", "--arch", "plt", "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "holds the results of `clt-eval train`" in err[0]
    assert _tree(tmp_path) == before


def test_train_lists_train_their_product_and_rerun_after_evaluate(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()  # with the lock a killed run left behind: taken over
    (out / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": preflight._HOST}))
    args = ["train", "--out", str(out), "--arch", "plt", "clt", "--penalty", "l1", "topk",
            "--k", "2", "--steps", "3", "--log-every", "0", "--wandb-mode", "disabled"]
    assert main(args) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted((r["arch"], r["penalty"], r["decoder_norm"]) for r in runs) == [
        ("clt", "l1", "concatenated"), ("clt", "topk", "none"),
        ("plt", "l1", "concatenated"), ("plt", "topk", "none")]
    assert main(["evaluate", str(out)]) == 0
    assert len(list(out.glob("transcoders/*/metrics.json"))) == 4
    assert json.loads((out / MARKER).read_text())["also"] == ["evaluate"]
    assert main(args) == 0  # evaluate's files do not make the folder someone else's
    assert not (out / LOCK).exists()
    # evaluate waits for no one: while a writer holds the folder it refuses, writing nothing.
    (out / LOCK).write_text(json.dumps({"pid": os.getppid(), "host": preflight._HOST}))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    code, err = _cli(["evaluate", str(out / "transcoders")], capsys)
    assert code == 2 and len(err) == 1 and f"PID {os.getppid()}" in err[0], err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_train_grid_product_and_per_penalty_decoder_norm():
    args = build_parser().parse_args(["train", "--penalty", "tanh", "batchtopk", "--k", "1", "3",
                                      "--seed", "0", "1", "--sparsity-coef", "0.1"])
    specs = train_specs(vars(args))
    # tanh takes no k: 2 seeds; batchtopk: 2 k x 2 seeds.
    assert len(specs) == 2 + 4 and all(isinstance(s, RunSpec) for s in specs)
    assert sorted({s.k for s in specs if s.penalty == "tanh"}) == [None]
    assert {(s.penalty, s.decoder_norm) for s in specs} == {("tanh", "concatenated"),
                                                           ("batchtopk", "none")}


def test_a_width_that_cannot_fit_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _cli(["train", "--n-features", "100000000", "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "needs about" in err[0] and "available" in err[0]
    assert not out.exists()


def test_an_absurd_sweep_grid_is_refused_with_its_size(tmp_path, capsys):
    out = tmp_path / "out"
    started = time.perf_counter()
    code, err = _cli(["sweep", "--lambda-log", "0.001", "10", "1000000", "--seeds", "100000",
                      "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1, err
    assert "100,000,000,000 runs; expected at most 100,000" in err[0]
    assert time.perf_counter() - started < 1.0 and not out.exists()


def test_a_device_a_job_cannot_use_is_refused(tmp_path, capsys):
    code, err = _cli(["graph", "tc", "--model", "tiny", "--prompt", "a", "--out",
                      str(tmp_path / "g"), "--dtype", "bfloat16"], capsys)
    assert code == 2 and len(err) == 1 and "--dtype bfloat16" in err[0], err
    assert not (tmp_path / "g").exists()


# ---- every option explains itself ----------------------------------------------------------
# Options whose values come from a known set that argparse does not enforce.
KNOWN_SETS = {"--device": ("auto", "cpu", "cuda", "cuda:N"),
              "--to": ("clt-eval", "circuit-tracer", "sae-lens"),
              "--case-study": ("boolean_two_step", "mlp_in_the_middle", "two_hop_transformer")}


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            yield from action.choices.items()


def test_every_option_has_help_and_lists_its_choices():
    from importlib.metadata import distribution

    import clt_eval.formats as formats
    from clt_eval.lm.attribution import CONVENTIONS
    from clt_eval.training.cli import BUILTIN_CASE_STUDIES, GRAPH_CONVENTIONS

    assert KNOWN_SETS["--to"] == formats.FORMATS and GRAPH_CONVENTIONS == CONVENTIONS
    registered = {e.name for e in distribution("clt-eval").entry_points
                  if e.group == "clt_eval.case_studies"}
    assert set(BUILTIN_CASE_STUDIES) == registered
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if "-h" in action.option_strings:
                continue
            flag = (action.option_strings or [action.dest])[-1]
            assert action.help and action.help.strip(), f"{name} {flag}: no help"
            values = action.choices or KNOWN_SETS.get(flag, ())
            for value in values:
                assert str(value) in action.help, f"{name} {flag}: {value!r} not in its help"


def test_train_takes_lists_wherever_sweep_does():
    subs = dict(_subparsers(build_parser()))
    many = {a.dest for a in subs["sweep"]._actions if a.nargs == "+"}
    train = {a.dest: a for a in subs["train"]._actions}
    assert many and all(train[d].nargs == "+" for d in many), many
