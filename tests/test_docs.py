"""The commands the operator docs tell people to run exist: every `streamtrain ...` in their
code (fenced blocks and inline code) parses as a real command, verb included."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamtrain.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/operations.md", "compose/README.md")
CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
COMMAND = re.compile(r"(?<![\w/.-])streamtrain((?: [a-z][a-z-]*)+)")


def _commands(text: str) -> set[tuple[str, ...]]:
    """The command words of each `streamtrain WORD [WORD]` in code (flags, placeholders and
    paths end it)."""
    return {tuple(m.group(1).split()[:2]) for code in CODE.findall(text) for m in COMMAND.finditer(code)}


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_exists(doc: str, capsys: pytest.CaptureFixture[str]) -> None:
    commands = _commands((REPO / doc).read_text())
    assert commands, f"{doc} shows no command"
    parser = build_parser()
    for words in sorted(commands):
        with pytest.raises(SystemExit) as done:  # argparse exits 2 on an unknown command or verb
            parser.parse_args([*words, "--help"])
        assert done.value.code == 0, f"{doc}: `streamtrain {' '.join(words)}` is not a command"
    capsys.readouterr()
