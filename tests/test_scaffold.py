"""`clt-eval case-studies new`: the generated package is a working, contract-clean plugin."""

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clt_eval.case_study import load_case_study
from clt_eval.contract import check_case_study
from clt_eval.errors import CltEvalError
from clt_eval.training import scaffold as S

NAME, CLASS = "clt_scaffold_demo", "CltScaffoldDemo"


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    """The scaffold of NAME, importable from its folder (no pip install)."""
    out = S.scaffold(NAME, tmp_path_factory.mktemp("scaffold") / "pkg")
    sys.path.insert(0, str(out))
    try:
        yield out
    finally:
        sys.path.remove(str(out))
        for mod in [m for m in sys.modules if m == NAME or m.startswith(NAME + ".")]:
            del sys.modules[mod]


@pytest.fixture(scope="module")
def module(pkg):
    return importlib.import_module(NAME)


def test_writes_the_package_and_nothing_else(pkg):
    files = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts}
    assert files == {"README.md", "pyproject.toml", f"{NAME}/__init__.py", f"{NAME}/model.py",
                     "tests/test_contract.py"}
    assert [p.name for p in pkg.parent.iterdir()] == ["pkg"]  # no temporary folder left
    text = "\n".join((pkg / f).read_text() for f in files)
    assert "{{" not in text and "}}" not in text
    pyproject = (pkg / "pyproject.toml").read_text()
    assert 'name = "clt-eval-case-clt-scaffold-demo"' in pyproject
    assert '[project.entry-points."clt_eval.case_studies"]' in pyproject
    assert f'{NAME} = "{NAME}:{CLASS}"' in pyproject
    assert f"--case-study {NAME} --quick" in (pkg / "README.md").read_text()


def test_generated_case_study_meets_the_contract(module):
    case = getattr(module, CLASS)()
    assert case.name == NAME
    check_case_study(case)
    assert len(case.ground_truth()) == 3


def test_generated_model_computes_the_chain(module):
    """Truth table from the definitions, written out here independently of the package."""
    case = getattr(module, CLASS)()
    x = case.inputs()
    assert x.shape == (32, 5)
    a, b, c, d, e = (x[:, i] > 0 for i in range(5))
    expected = 2.0 * (((a ^ b) & (c ^ d)) ^ e).float()
    with torch.no_grad():
        assert torch.equal(case.output_value(case.model()(x)), expected)


def test_generated_tests_pass(pkg, module):
    spec = importlib.util.spec_from_file_location("generated_tests",
                                                  pkg / "tests" / "test_contract.py")
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    names = [n for n in dir(tests) if n.startswith("test_")]
    assert len(names) == 4
    for n in names:
        getattr(tests, n)()


def test_loads_by_module_path_with_factory_arguments(module):
    case = load_case_study(f"{NAME}:{CLASS}", validate=True)
    assert case.name == NAME and case.off_distribution_noise == 0.2
    case = load_case_study(f"{NAME}:{CLASS}@off_distribution_noise=0.5")
    assert case.off_distribution_noise == 0.5
    with pytest.raises(CltEvalError, match="off_distribution_noise"):
        load_case_study(f"{NAME}:{CLASS}@off_distribution_noise=-1")


def test_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CltEvalError, match="not an empty folder") as info:
        S.scaffold("fresh_name_one", out)
    assert "\n" not in str(info.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(CltEvalError):
        S.scaffold("fresh_name_one", a_file)


def test_accepts_an_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert S.scaffold("fresh_name_two", out) == out
    assert (out / "fresh_name_two" / "__init__.py").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


@pytest.mark.parametrize("bad", ["", "1abc", "Caps", "has-dash", "has space", "_private",
                                 "class", "os", "circuit"])
def test_refuses_a_bad_name(tmp_path, bad):
    with pytest.raises(CltEvalError) as info:
        S.scaffold(bad, tmp_path / "out")
    assert repr(bad) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(root, name):
        (root / "half.txt").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(S, "_write_all", broken)
    with pytest.raises(CltEvalError, match="disk full"):
        S.scaffold("fresh_name_three", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_class_and_distribution_names():
    assert S.class_name("my_chain2") == "MyChain2" and S.class_name("x") == "X"
    assert S.dist_name("my_chain") == "clt-eval-case-my-chain"


@pytest.mark.slow
def test_pip_install_registers_the_entry_point(tmp_path):
    """Installed into this venv, the plugin is found by name, like any other package's."""
    name = "clt_scaffold_installed"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    uninstall = [*pip, "uninstall", "-y", S.dist_name(name)]
    subprocess.run(uninstall, capture_output=True)  # left over from an interrupted run
    out = S.scaffold(name, tmp_path / "pkg")
    check = ("from importlib.metadata import entry_points\n"
             "from clt_eval.case_study import load_case_study\n"
             f"eps = {{ep.name: ep.value for ep in entry_points(group='clt_eval.case_studies')}}\n"
             f"assert eps[{name!r}] == '{name}:{S.class_name(name)}', eps\n"
             f"assert load_case_study({name!r}, validate=True).name == {name!r}\n")
    try:
        _run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(out)])
        _run([sys.executable, "-c", check], cwd=tmp_path)  # a fresh interpreter sees the .pth
        _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=out)
    finally:
        subprocess.run(uninstall, capture_output=True)


def _run(cmd, cwd=None):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_templates_are_not_python_files():
    """Raw templates are not valid Python, so they must not look like it (ruff, pytest)."""
    files = [p for p in Path(S.TEMPLATE_DIR).rglob("*") if p.is_file()]
    assert files and all(p.suffix == ".tmpl" for p in files)
