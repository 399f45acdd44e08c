"""The documentation stays true to the code (fast: no model is built, no command is run).

* docs/configuration.md documents every field of ``AdaLogConfig`` and ``ReconstructConfig``
  (with its current default) and every preset name;
* every ``adalog ...`` command line in a shell code block of README.md or docs/*.md parses
  with the real CLI parser, and ``adalog <command> --help`` works for every command.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest

from adalog.cli import build_parser
from adalog.config import PRESETS, AdaLogConfig
from adalog.recon.config import PRESETS as RECON_PRESETS
from adalog.recon.config import ReconstructConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Code-block languages whose lines are shell commands (a bare fence counts as shell).
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
#: Shell operators that separate commands on one line.
SEPARATORS = {"&&", "||", ";", "|", "&"}
#: Redirections (``> log``, ``2>&1``, ``>>log``): not arguments of the command.
REDIRECTION = re.compile(r"^\d*(>>?|<)(&\d+)?\S*$")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
#: A shell line that runs ``adalog`` (or ``.venv/bin/adalog``), alone or after an operator, or
#: ``adalog.cli`` as a module (``torchrun ... -m adalog.cli``).
ADALOG_LINE = re.compile(r"((^|&&|\|\||;|\|)\s*(\S*/)?adalog(\s|$))|(-m adalog\.cli\s)")


# -- configuration reference ------------------------------------------------------------------


def _config_text() -> str:
    return CONFIGURATION.read_text(encoding="utf-8")


@pytest.mark.parametrize("config", [AdaLogConfig, ReconstructConfig])
def test_every_config_field_is_documented(config):
    text = _config_text()
    missing = [f.name for f in dataclasses.fields(config) if f"`{f.name}`" not in text]
    assert not missing, f"{config.__name__} fields missing from docs/configuration.md: {missing}"


def _documented_defaults(text: str, config: type) -> dict[str, list[str]]:
    """``{field: [default cell, ...]}`` from the rows ``| `field` | `default` | ...`` of the
    section ``## `<config name>` fields`` (up to the next ``## `` heading)."""
    heading = f"## `{config.__name__}` fields"
    assert heading in text, f"docs/configuration.md has no section '{heading}'"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        match = re.match(r"^\|\s*`(\w+)`\s*\|\s*`([^`]*)`\s*\|", line)
        if match:
            rows.setdefault(match.group(1), []).append(match.group(2))
    return rows


@pytest.mark.parametrize("config", [AdaLogConfig, ReconstructConfig])
def test_documented_defaults_are_the_code_defaults(config):
    """In the config's section, each field heads a table row whose second cell is its default
    as a Python literal."""
    rows = _documented_defaults(_config_text(), config)
    wrong = []
    for field in dataclasses.fields(config):
        cells = rows.get(field.name)
        if not cells:
            wrong.append(f"{field.name}: no '| `{field.name}` | `default` |' table row")
            continue
        values = []
        for cell in cells:
            try:
                values.append(ast.literal_eval(cell))
            except (ValueError, SyntaxError):
                values.append(cell)
        if any(value != field.default for value in values):
            wrong.append(f"{field.name}: documented {cells}, code default {field.default!r}")
    assert not wrong, "docs/configuration.md:\n" + "\n".join(wrong)


def test_every_preset_is_documented():
    text = _config_text()
    missing = [name for name in (*PRESETS, *RECON_PRESETS) if f"`{name}`" not in text]
    assert not missing, f"presets missing from docs/configuration.md: {missing}"


# -- command lines in the docs ----------------------------------------------------------------


def _shell_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, logical line)`` of the shell code blocks of ``path``, with ``\\``
    continuations joined and a leading ``$`` prompt dropped."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    shell = False
    pending, start = "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, shell = match.group(1), match.group(2).lower() in SHELL_LANGUAGES
            continue
        if match and match.group(1).startswith(fence[0]) and not match.group(2):
            fence = None
            continue
        if not shell:
            continue
        if not pending:
            start = number
            line = re.sub(r"^\s*\$\s+", "", line)
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def _adalog_commands(line: str) -> list[list[str]]:
    """The argument lists of the ``adalog`` (or ``.venv/bin/adalog``, or ``... -m adalog.cli``)
    commands on a shell line: split at ``&&``, ``||``, ``;``, ``|`` and ``&``; comments and
    redirections dropped."""
    tokens = shlex.split(line, comments=True)
    commands, current = [], []
    skip_next = False
    for token in [*tokens, ";"]:
        if skip_next:  # the file of a redirection
            skip_next = False
        elif REDIRECTION.match(token):
            skip_next = token.endswith((">", "<"))
        elif token in SEPARATORS:
            if current and Path(current[0]).name == "adalog":
                commands.append(current[1:])
            elif "adalog.cli" in current[1:] and current[current.index("adalog.cli") - 1] == "-m":
                commands.append(current[current.index("adalog.cli") + 1 :])
            current = []
        else:
            current.append(token)
    return commands


def _documented_lines() -> list[tuple[str, str]]:
    """``(file:line, shell line)`` of every shell line that runs ``adalog``."""
    found = []
    for path in DOC_FILES:
        for number, line in _shell_lines(path):
            if ADALOG_LINE.search(line):
                found.append((f"{path.relative_to(ROOT)}:{number}", line))
    return found


LINES = _documented_lines()


def _parse(argv: list[str]) -> tuple[int | None, str]:
    """Parse ``argv`` with the real parser: (exit code or None, captured output)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            return exc.code, buffer.getvalue()
    return None, buffer.getvalue()


def test_the_docs_show_commands():
    """Guard against the extraction silently finding nothing."""
    where = {place.split(":")[0] for place, _ in LINES}
    assert "README.md" in where
    assert str(Path("docs") / "guide.md") in where
    assert len(LINES) >= 20


def test_the_docs_show_every_command():
    documented = set()
    for _, line in LINES:
        with contextlib.suppress(ValueError):  # a malformed line fails its own test below
            documented |= {argv[0] for argv in _adalog_commands(line) if argv}
    assert set(_subcommands()) <= documented


@pytest.mark.parametrize("line", [line for _, line in LINES], ids=[place for place, _ in LINES])
def test_documented_command_parses(line):
    commands = _adalog_commands(line)
    assert commands, f"no adalog command found in: {line}"
    for argv in commands:
        code, output = _parse(argv)
        if "--help" in argv or "-h" in argv:
            assert code == 0, output
        else:
            assert code is None, f"adalog {shlex.join(argv)}\n{output}"


def _subcommands() -> list[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    raise AssertionError("the adalog parser has no subcommands")


def test_top_level_help():
    code, output = _parse(["--help"])
    assert code == 0
    for name in _subcommands():
        assert name in output


@pytest.mark.parametrize("command", _subcommands())
def test_subcommand_help(command):
    code, output = _parse([command, "--help"])
    assert code == 0, output
    assert output.startswith(f"usage: adalog {command}")


def test_shell_line_extraction(tmp_path):
    """Continuations, chains, prompts, comments and non-shell blocks."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text adalog eval --no-such-flag\n"
        "```bash\n"
        "# adalog eval --in-a-comment\n"
        "python -m venv .venv && .venv/bin/adalog export q \\\n"
        "    --out art  # trailing comment\n"
        "$ adalog eval --data d --json 'a b.json' > log.txt 2>&1\n"
        "```\n"
        "```python\n"
        "adalog eval --python-block\n"
        "```\n",
        encoding="utf-8",
    )
    lines = _shell_lines(doc)
    assert [n for n, _ in lines] == [3, 4, 6]
    commands = [argv for _, line in lines for argv in _adalog_commands(line)]
    assert commands == [
        ["export", "q", "--out", "art"],
        ["eval", "--data", "d", "--json", "a b.json"],
    ]
