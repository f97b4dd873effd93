"""A sweep is data: a spec file (TOML, YAML or JSON) or CLI grids expand into a list of runs.

A spec has a few top-level keys and one or more ``grid`` blocks. Each block maps ``RunSpec``
fields to a value or a list of values and expands to their product; ``sparsity_coef`` may
be a log grid ``{log = [lo, hi, n]}`` and ``seeds = n`` is short for ``seed = [0..n-1]``.
Every key and value is checked before anything runs, and a problem is reported in one line
that names the key (``grid[1].decoder_norm``) and the allowed values.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from clt_eval.config import ACTIVATIONS, ARCHS, DECODER_NORMS, NORMED_PENALTIES, PENALTIES
from clt_eval.errors import CltEvalError, require
from clt_eval.training.config import RunSpec, TrainConfig

DEFAULT_SPEC = Path(__file__).parent / "specs" / "default_sweep.toml"
RUN_FIELDS = tuple(f.name for f in fields(RunSpec))
CHOICES = {"arch": ARCHS, "penalty": PENALTIES, "decoder_norm": DECODER_NORMS,
           "activation": (*ACTIVATIONS, None)}
BLOCK_KEYS = (*RUN_FIELDS, "seeds", "label")
TOP_KEYS = ("name", "description", "case_study", "train", "grid", "matched_l0")
# Seeds feed torch.Generator.manual_seed, which takes a non-negative 64-bit integer.
SEED_MAX = 2**63 - 1
# A spec that expands past these is a typo (seeds = 1e9), not a sweep: refuse it before
# building a list that would exhaust memory.
MAX_RUNS_PER_BLOCK = 100_000
MAX_LOG_POINTS = 10_000


@dataclass(frozen=True)
class MatchedL0Spec:
    """Find, per setting and architecture, the λ that reaches each target total L0."""

    targets: tuple[float, ...] = (1.0, 1.5, 2.0)
    iterations: int = 5  # bisection steps inside the bracketing pair of grid points
    bisect_seeds: int = 3  # seeds averaged at each bisection point
    seeds: int = 10  # seeds trained at the λ found, for the statistics
    n_features: int = 16  # the width compared
    # Targets count per middle step of the case study's chain: a deeper chain needs more
    # active features for the same per-step sparsity.
    per_middle_step: bool = False

    def __post_init__(self) -> None:
        require(len(self.targets) > 0, "matched_l0.targets: empty; expected numbers > 0")
        for t in self.targets:
            require(isinstance(t, int | float) and 0 < t < math.inf,
                    f"matched_l0.targets: {t!r} is not a number > 0")
        require(isinstance(self.per_middle_step, bool),
                f"matched_l0.per_middle_step={self.per_middle_step!r}: expected true or false")
        for name in ("iterations", "bisect_seeds", "seeds", "n_features"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                    f"matched_l0.{name}={v!r}: expected an integer > 0")


@dataclass(frozen=True)
class GridBlock:
    label: str
    values: dict  # RunSpec field -> tuple of values

    def runs(self) -> list[RunSpec]:
        # Field order, not the file's key order, so TOML/YAML/JSON give the same list.
        names = [n for n in RUN_FIELDS if n in self.values]
        return [RunSpec(**dict(zip(names, combo, strict=True)))
                for combo in itertools.product(*(self.values[n] for n in names))]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    case_study: str
    train: TrainConfig
    grids: tuple[GridBlock, ...]
    matched_l0: MatchedL0Spec | None = None
    description: str = ""
    source: str = field(default="", compare=False)

    def runs(self) -> list[RunSpec]:
        """Every grid run once, in spec order (blocks may overlap)."""
        return list(dict.fromkeys(r for g in self.grids for r in g.runs()))

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "case_study": self.case_study, "train": asdict(self.train),
                "grid": [{"label": g.label} | {k: list(v) for k, v in g.values.items()}
                         for g in self.grids],
                "matched_l0": None if self.matched_l0 is None else asdict(self.matched_l0)}


# ---- reading ---------------------------------------------------------------------------
def read_spec_file(path: str | Path) -> dict:
    """The raw mapping in a .toml, .yaml/.yml or .json file."""
    path = Path(path)
    require(path.is_file(), f"{path}: no such spec file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib
            data = tomllib.loads(path.read_text())
        elif suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(path.read_text())
        elif suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise CltEvalError(f"{path}: unknown spec format {suffix!r}; expected .toml, "
                               ".yaml, .yml or .json")
    except CltEvalError:
        raise
    except Exception as exc:  # each parser has its own error class; all mean "bad file"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CltEvalError(f"{path}: not valid {suffix[1:].upper()} ({msg})") from None
    require(isinstance(data, dict), f"{path}: expected a mapping of spec keys at the top")
    return data


def load_spec(path: str | Path | None = None) -> SweepSpec:
    path = Path(path) if path is not None else DEFAULT_SPEC
    try:
        return parse_spec(read_spec_file(path), source=str(path))
    except CltEvalError as exc:
        msg = str(exc)
        raise CltEvalError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def parse_spec(data: dict, source: str = "spec") -> SweepSpec:
    _check_keys("spec", data, TOP_KEYS)
    train = _sub_config(TrainConfig, data.get("train", {}), "train")
    grids = data.get("grid")
    require(isinstance(grids, list) and len(grids) > 0,
            "grid: expected a non-empty list of grid blocks ([[grid]] in TOML)")
    blocks = tuple(parse_block(b, i) for i, b in enumerate(grids))
    matched = data.get("matched_l0")
    matched = None if matched is None else _sub_config(MatchedL0Spec, matched, "matched_l0")
    name = data.get("name", Path(source).stem)
    require(isinstance(name, str) and name != "", "name: expected a non-empty string")
    case = data.get("case_study", "boolean_two_step")
    require(isinstance(case, str), "case_study: expected a string")
    return SweepSpec(name, case, train, blocks, matched, str(data.get("description", "")), source)


def parse_block(block: dict, i: int) -> GridBlock:
    where = f"grid[{i}]"
    require(isinstance(block, dict), f"{where}: expected a mapping of run fields to values")
    _check_keys(where, block, BLOCK_KEYS)
    require(not ("seeds" in block and "seed" in block),
            f"{where}: give either 'seeds' (a count) or 'seed' (a list), not both")
    values: dict[str, tuple] = {}
    for key, raw in block.items():
        if key == "label":
            continue
        if key == "seeds":
            require(isinstance(raw, int) and not isinstance(raw, bool)
                    and 0 < raw <= MAX_RUNS_PER_BLOCK, f"{where}.seeds={raw!r}: expected an "
                    f"integer in 1..{MAX_RUNS_PER_BLOCK} (the number of seeds)")
            values["seed"] = tuple(range(raw))
        elif key == "sparsity_coef" and isinstance(raw, dict):
            values[key] = log_grid(raw, f"{where}.sparsity_coef")
        else:
            values[key] = _as_values(raw, f"{where}.{key}", CHOICES.get(key))
            for v in values[key]:
                check_type(f"{where}.{key}", v, RUN_TYPES[key])
    _default_decoder_norm(values)
    n_runs = math.prod(len(v) for v in values.values())
    require(n_runs <= MAX_RUNS_PER_BLOCK, f"{where}: expands to {n_runs} runs; expected at "
            f"most {MAX_RUNS_PER_BLOCK} per block")
    label = block.get("label")
    require(label is None or isinstance(label, str), f"{where}.label={label!r}: expected a string")
    label = label or _auto_label(values)
    try:
        runs = GridBlock(str(label), values).runs()
    except CltEvalError as exc:
        raise CltEvalError(f"{where}: {exc}") from None
    except TypeError as exc:  # a value of the wrong type for its field
        raise CltEvalError(f"{where}: {exc}") from None
    require(len(runs) > 0, f"{where}: expands to no runs")
    return GridBlock(str(label), values)


def log_grid(raw: dict, where: str) -> tuple[float, ...]:
    """``{log = [lo, hi, n]}``: n points evenly spaced in log λ from lo to hi."""
    _check_keys(where, raw, ("log",))
    v = raw.get("log")
    require(isinstance(v, list) and len(v) == 3, f"{where}.log: expected [lo, hi, n]")
    lo, hi, n = v
    require(all(isinstance(x, int | float) and not isinstance(x, bool) and x > 0
                and math.isfinite(x) for x in (lo, hi)),
            f"{where}.log: lo={lo!r}, hi={hi!r}; a log grid needs finite numbers > 0")
    require(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_LOG_POINTS,
            f"{where}.log: n={n!r}; expected an integer in 1..{MAX_LOG_POINTS} (the number "
            "of points)")
    require(lo <= hi, f"{where}.log: lo={lo!r} > hi={hi!r}; expected lo <= hi")
    if n == 1:
        return (float(lo),)
    step = (math.log(hi) - math.log(lo)) / (n - 1)
    return tuple(float(f"{math.exp(math.log(lo) + i * step):.6g}") for i in range(n))


def _as_values(raw, where: str, allowed) -> tuple:
    vals = tuple(raw) if isinstance(raw, list) else (raw,)
    hint = f"; allowed: {', '.join(map(repr, allowed))}" if allowed else ""
    require(len(vals) > 0, f"{where}: empty grid; expected at least one value{hint}")
    if allowed:
        for v in vals:
            require(v in allowed, f"{where}: {v!r} is not allowed{hint}")
    require(len(set(map(repr, vals))) == len(vals), f"{where}: repeated values {list(vals)}")
    return vals


def _default_decoder_norm(values: dict) -> None:
    """A block without decoder_norm gets each penalty's own default, so a TopK block need
    not say 'none'; a block that names one applies it to every penalty (and fails for
    penalties that take none, as it should)."""
    if "decoder_norm" in values:
        return
    pens = values.get("penalty", (RunSpec.penalty,))
    normed = {p in NORMED_PENALTIES for p in pens}
    require(len(normed) == 1, "penalty: mixes penalties with and without a decoder norm "
            f"({list(pens)}); put them in separate grid blocks")
    values["decoder_norm"] = ("concatenated",) if normed.pop() else ("none",)


def _auto_label(values: dict) -> str:
    return "/".join(str(v[0]) if len(v) == 1 else "*" for k, v in values.items()
                    if k in ("penalty", "decoder_norm"))


# ---- value types ---------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# A dataclass field's annotation (a string, under postponed annotations) -> (test, expected).
# bool is a subclass of int in Python, and a YAML "no" is a string: both are checked here so
# that neither reaches a config as a number or as a truthy flag.
_TYPE_CHECKS = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int | None": (lambda v: v is None or _is_int(v), "an integer"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string"),
}
RUN_TYPES = {f.name: str(f.type) for f in fields(RunSpec)} | {"seed": "seed"}


def check_type(where: str, value, kind: str) -> None:
    """One-line error unless ``value`` fits the field type ``kind`` (or is a valid seed)."""
    if kind == "seed":
        require(_is_int(value) and 0 <= value <= SEED_MAX,
                f"{where}: {value!r} is not a seed; expected an integer in 0..2**63-1")
        return
    test, expected = _TYPE_CHECKS[kind]
    require(test(value), f"{where}: {value!r} is {type(value).__name__}; expected {expected}")


def _check_keys(where: str, data: dict, allowed) -> None:
    require(isinstance(data, dict), f"{where}: expected a mapping")
    unknown = sorted(set(data) - set(allowed))
    require(not unknown, f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")


def _sub_config(cls, data, where: str):
    _check_keys(where, data, [f.name for f in fields(cls)])
    if cls is MatchedL0Spec and "targets" in data:
        data = data | {"targets": tuple(_as_values(data["targets"], f"{where}.targets", None))}
        for t in data["targets"]:
            check_type(f"{where}.targets", t, "float")
    kinds = {f.name: str(f.type) for f in fields(cls)}
    for key, value in data.items():
        if kinds[key] in _TYPE_CHECKS:
            check_type(f"{where}.{key}", value, kinds[key])
    try:
        return cls(**data)
    except CltEvalError as exc:
        msg = str(exc)
        raise CltEvalError(msg if msg.startswith(where) else f"{where}.{msg}") from None
