"""wandb as its users read it: offline runs written to a temporary folder and read back from
the run files (config, tags, group, history, tables)."""

import json
import struct
import time
from pathlib import Path

import pytest
import torch

BLOCK = 32768  # the .wandb file is a LevelDB-style log of 32 KiB blocks


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's ``run-*.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, part, out = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            break
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
            part = b""
    return out


def read_runs(root: Path, timeout: float = 20.0) -> list[dict]:
    """Every offline run under ``root``: name, group, job type, tags, config, history rows.

    wandb-core may still be writing a run's file when ``finish()`` has returned (seen: a
    file holding only its 7-byte header, complete a moment later), so this waits until every
    file ends with its run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        runs = _read_runs(root)
        if all(r["complete"] for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.05)


def _read_runs(root: Path) -> list[dict]:
    runs = []
    for f in sorted(root.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"history": [], "folder": f.parent, "complete": False}
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            run["complete"] |= kind == "exit"
            if kind == "run":
                r = rec.run
                run |= {"name": r.display_name, "group": r.run_group, "job_type": r.job_type,
                        "tags": list(r.tags),
                        "config": {i.key: json.loads(i.value_json) for i in r.config.update
                                   if i.key != "_wandb"}}
            elif kind == "history":
                # wandb-core writes each key as a one-element nested_key
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in rec.history.item})
        runs.append(run)
    return runs


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setattr("clt_eval.training.wandb_logger._USER_WANDB_DIR", None)


def test_lm_training_logs_one_flat_run_per_transcoder(tmp_path, offline):
    from clt_eval.training.config import RunSpec, TrainConfig
    from clt_eval.training.lm_train import LMDataConfig, train_on_model

    (tmp_path / "c.txt").write_text("a small corpus of plain words, repeated. " * 40)
    data = LMDataConfig(model="tiny", layers=(1, 2), corpus=str(tmp_path / "c.txt"),
                        n_tokens=4 * 32, eval_tokens=32, n_ctx=32,
                        cache_dir=str(tmp_path / "cache"))
    specs = [RunSpec(arch="clt", penalty="l1", sparsity_coef=c, n_features=8, seed=0)
             for c in (1e-4, 1e-3)]
    out = tmp_path / "out"
    train_on_model(data, specs, TrainConfig(steps=9, batch_size=32, log_every=2), out,
                   wandb_mode="offline")
    runs = read_runs(out)
    assert len(runs) == 2 and {r["group"] for r in runs} == {"lm-out"}
    by_coef = {r["config"]["sparsity_coef"]: r for r in runs}
    assert sorted(by_coef) == [1e-4, 1e-3]
    for coef, r in by_coef.items():
        cfg = r["config"]
        for key in ("arch", "penalty", "decoder_norm", "k", "seed", "n_features", "model",
                    "layers", "n_tokens", "corpus"):
            assert key in cfg, key
        assert not any(isinstance(v, dict) for v in cfg.values())  # flat
        assert (cfg["arch"], cfg["model"], cfg["layers"]) == ("clt", "tiny", [1, 2])
        assert f"lambda={coef:g}" in r["tags"] and "arch=clt" in r["tags"]
        steps = [h["_step"] for h in r["history"] if "loss" in h]
        assert steps == [0, 2, 4, 6, 8]
        assert all({"loss", "mse", "l0"} <= set(h) for h in r["history"] if "loss" in h)


def test_toy_ensemble_is_one_run_with_a_flat_runs_table_and_tags(tmp_path, offline):
    from clt_eval.training.wandb_logger import WandbLogger

    specs = {f"r{s}{c}": {"arch": "plt", "penalty": "l1", "decoder_norm": "concatenated",
                          "sparsity_coef": c, "k": None, "seed": s, "n_features": 12}
             for s in (0, 1) for c in (0.01, 0.1)}
    log = WandbLogger("offline", group="sweep-x", root=tmp_path)
    log.start("ens", {"train": {"steps": 3}, "runs": specs})
    cb = log.ensemble_logger(list(specs))
    cb(0, {"loss": torch.arange(4.0)})
    rows = [{"run_id": i, "arch": s["arch"], "sparsity_coef": s["sparsity_coef"],
             "seed": s["seed"], "nmse": 0.5} for i, s in specs.items()]
    log.table("runs", rows)
    log.finish()
    (run,) = read_runs(tmp_path)
    assert run["group"] == "sweep-x" and run["job_type"] == "train"
    cfg = run["config"]
    assert (cfg["arch"], cfg["penalty"], cfg["n_features"]) == ("plt", "l1", 12)
    assert cfg["sparsity_coefs"] == [0.01, 0.1] and cfg["seeds"] == [0, 1]
    assert {"arch=plt", "penalty=l1", "lambda=0.01", "lambda=0.1", "seed=0",
            "seed=1"} <= set(run["tags"])
    (table,) = list(run["folder"].glob("files/media/table/runs_*.table.json"))
    t = json.loads(table.read_text())
    assert set(t["columns"]) == set(rows[0]) | set(specs["r00.01"])  # the spec's fields too
    assert len(t["data"]) == 4
    col = {c: i for i, c in enumerate(t["columns"])}
    assert sorted(r[col["sparsity_coef"]] for r in t["data"]) == [0.01, 0.01, 0.1, 0.1]
    assert [r[col["n_features"]] for r in t["data"]] == [12] * 4
    assert sorted(r[col["seed"]] for r in t["data"]) == [0, 0, 1, 1]


def test_only_the_first_run_of_a_process_lists_the_installed_packages(tmp_path, offline,
                                                                      monkeypatch):
    from clt_eval.training.wandb_logger import WandbLogger

    monkeypatch.setattr("clt_eval.training.wandb_logger._PACKAGES_LISTED", False)
    log = WandbLogger("offline", group="g", root=tmp_path)
    for name in ("first", "second"):
        log.start(name, {"a": 1})
        log.finish()
    runs = sorted(read_runs(tmp_path), key=lambda r: r["name"])
    assert [r["name"] for r in runs] == ["first", "second"]
    listed = [(r["folder"] / "files" / "requirements.txt").exists() for r in runs]
    assert listed == [True, False]


def test_disabled_wandb_prints_nothing_and_writes_nothing(tmp_path, capfd, monkeypatch):
    from clt_eval.training.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    log = WandbLogger("disabled", group="g", root=tmp_path / "out")
    log.start("one", {"runs": {"a": {"arch": "clt", "seed": 0}}})
    log.ensemble_logger(["a"])(0, {"loss": torch.ones(1)})
    log.table("runs", [{"run_id": "a", "nmse": 0.1}])
    log.finish()
    log.start_runs(["a", "b"], [{"arch": "clt"}, {"arch": "plt"}])
    log.runs_logger()(0, {"loss": torch.ones(2)})
    log.finish_runs([{"nmse": 0.1}, {"nmse": 0.2}])
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not (tmp_path / "out").exists()
