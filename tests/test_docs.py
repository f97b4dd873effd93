"""The documentation site: the CLI page matches the parser, the site builds, every API
function is documented, and references into the docs point at sections that exist."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Text the repository ships: code, docs, specs, the README.
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".txt", ".json", ".cfg"}
SKIP_DIRS = {".venv", ".git", "runs", "site", "build", "__pycache__", ".pytest_cache",
             ".ruff_cache", "wandb"}


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_cli_reference",
                                                  DOCS / "gen_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _repo_texts() -> dict[Path, str]:
    """Every text file of the repository (environments, outputs and caches pruned)."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                   and not d.startswith(".venv")]
        for name in files:
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES:
                out[path] = path.read_text(errors="ignore")
    return out


def test_cli_page_is_up_to_date():
    gen = _load_generator()
    assert (DOCS / "cli.md").read_text() == gen.render(), \
        "docs/cli.md is out of date: run python docs/gen_cli_reference.py"


def test_cli_page_lists_every_option():
    """The generator drops nothing: every flag of every command appears on the page."""
    import argparse

    from clt_eval.training.cli import build_parser

    page = (DOCS / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        section = page.split(f"## `clt-eval {name}`", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section, (name, flag)


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is an optional extra: pip install -e '.[docs]'")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                          "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "site" / "index.html").exists()
    for page in ("concepts", "cli", "api", "case_studies", "scale", "circuit_tracer"):
        assert (tmp_path / "site" / page / "index.html").exists(), page


def test_nav_names_every_page():
    text = (ROOT / "mkdocs.yml").read_text()
    for page in sorted(p.name for p in DOCS.glob("*.md")):
        assert f": {page}" in text, page


def test_api_page_names_every_function():
    from clt_eval import api

    page = (DOCS / "api.md").read_text()
    for name in api.__all__:
        assert re.search(rf"\b{name}\(", page), name


def test_no_reference_to_documents_outside_the_repository():
    """Explanations live in the repository: no pointer to a guide that is not shipped."""
    # The name is spelled in two parts so that this file does not match itself.
    name = "GUI" + "DE"
    offenders = [str(p.relative_to(ROOT)) for p, text in _repo_texts().items() if name in text]
    assert offenders == []


def _sections(page: Path) -> set[str]:
    """Section numbers of a page: '## 4. …' gives 4, '**8.10 …**' gives 8.10."""
    text = page.read_text()
    found = set(re.findall(r"^## (\d+)\.", text, flags=re.M))
    found |= set(re.findall(r"^\*\*(\d+\.\d+) ", text, flags=re.M))
    found |= set(re.findall(r"^### (\d+\.\d+) ", text, flags=re.M))
    return found


def test_concepts_section_references_resolve():
    """Code and docs cite docs/concepts.md by section number: each cited section exists."""
    sections = _sections(DOCS / "concepts.md")
    pattern = re.compile(r"concepts(?:\.md)?`?\s*§\s*(\d+(?:\.\d+)?)")
    refs = [(path, ref) for path, text in _repo_texts().items() for ref in pattern.findall(text)]
    assert len(refs) > 10  # the pattern still finds the citations it is meant to check
    missing = [f"{path.relative_to(ROOT)}: §{ref}" for path, ref in refs if ref not in sections]
    assert missing == []


def test_worked_example_quotes_what_the_code_computes():
    """docs/concepts.md §5.1 prints the table docs/worked_example.py computes, number for
    number; a change to a metric that moves one of them must update the page."""
    spec = importlib.util.spec_from_file_location("worked_example", DOCS / "worked_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    values = example.numbers()
    assert values["half_skip"]["skip_fraction"] == pytest.approx(0.5)  # the example's point
    assert example.table(values) in (DOCS / "concepts.md").read_text()
