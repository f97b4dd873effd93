"""Render the `clt-eval` argument parser into docs/cli.md, the CLI reference page.

    python docs/gen_cli_reference.py          # rewrite docs/cli.md
    python docs/gen_cli_reference.py --check  # exit 1 if docs/cli.md is out of date

The page is generated from ``build_parser()`` itself, so it cannot describe an option the
command does not have; tests/test_docs.py fails when the committed page falls behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "cli.md"
# argparse wraps usage lines to the terminal's width: fix it so the page is the same anywhere.
USAGE_WIDTH = "100"

HEADER = """# CLI reference

Every command of `clt-eval`, its arguments and their defaults. This page is generated from
the command's own argument parser by `docs/gen_cli_reference.py`; do not edit it by hand.
Each command has a Python twin of the same name with the same parameters (see
[Python API](api.md)).

Any bad value stops the command before it writes anything, with one line naming the option
and what was expected, and exit code 2.
"""


def _subcommands(parser: argparse.ArgumentParser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    return [(name, helps.get(name) or "", p) for name, p in sub.choices.items()]


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.dest.upper() if action.nargs == '?' else action.dest}`"
    if action.nargs == 0:
        return ", ".join(f"`{s}`" for s in action.option_strings)
    meta = action.metavar or action.dest.upper()
    if isinstance(meta, tuple):
        meta = " ".join(meta)
    many = " …" if action.nargs in ("+", "*") else ""
    return ", ".join(f"`{s} {meta}{many}`" for s in action.option_strings)


def _describe(action: argparse.Action) -> str:
    text = " ".join((action.help or "").split())
    if action.choices and "choices" not in text and ", ".join(map(str, action.choices)) not in \
            text:
        text += f" (one of: {', '.join(map(str, action.choices))})"
    default = action.default
    if isinstance(default, list) and len(default) == 1:
        default = default[0]
    shown = default not in (None, False, argparse.SUPPRESS) and action.nargs != 0
    if action.required:
        text += " (required)"
    elif shown and "default" not in text:
        text += f" (default {default})"
    return _cell(text)


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: no column breaks, no stray HTML tags."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _command(name: str, summary: str, parser: argparse.ArgumentParser) -> str:
    # Drop "usage: " and the matching indent of the continuation lines.
    prefix = "usage: "
    usage = "\n".join(line.removeprefix(" " * len(prefix)) for line in
                      parser.format_usage().strip().removeprefix(prefix).splitlines())
    lines = [f"## `clt-eval {name}`", "", _cell(summary[:1].upper() + summary[1:]) + ".", "",
             "```text", usage, "```", "", "| argument | meaning |", "|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        lines.append(f"| {_flag(action)} | {_describe(action)} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    from clt_eval.training.cli import build_parser

    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = USAGE_WIDTH
    try:
        commands = _subcommands(build_parser())
        body = [_command(name, summary, p) for name, summary, p in commands]
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before
    index = ["| command | what it does |", "|---|---|"]
    index += [f"| [`{n}`](#clt-eval-{n}) | {_cell(' '.join(s.split()))} |"
              for n, s, _ in commands]
    return "\n".join([HEADER, *index, "", *body])


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    text = render()
    if check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE}: out of date; run python docs/gen_cli_reference.py", file=sys.stderr)
            return 1
        return 0
    from clt_eval.atomic import write_text_atomic

    write_text_atomic(PAGE, text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
