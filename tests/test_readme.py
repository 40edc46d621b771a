"""The README's commands are the ones the code accepts, and CI installs as the README says."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from retrolm.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.DOTALL)


def readme_commands() -> list[list[str]]:
    """Every `retrolm ...` command of the README's bash blocks, as argv after `retrolm`."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line.replace("$STDLIB", "/stdlib"))
            if words[:1] == ["retrolm"]:
                commands.append(words[1:])
            elif words[:1] == ["torchrun"] and "retrolm" in words:
                commands.append(words[words.index("retrolm") + 1 :])
    return commands


def test_readme_shows_the_main_commands():
    shown = {argv[0] if argv[0] != "db" else f"db {argv[1]}" for argv in readme_commands()}
    expected = {
        "quickstart",
        "db build",
        "db info",
        "db search",
        "train",
        "eval",
        "generate",
        "plot",
    }
    assert expected <= shown


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses(argv):
    args = build_parser().parse_args(argv)
    assert args.handler is not None, f"`retrolm {' '.join(argv)}` selects no command"


def test_ci_installs_as_the_readme_says():
    setup = code_blocks("bash")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in setup.split("&&"):
        words = command.split()
        assert any(
            line.split()[-len(words) :] == words for line in ci.splitlines() if line.strip()
        ), f"README set-up step `{command.strip()}` is not in .ci/run"
    test_command = code_blocks("bash")[2].strip()
    assert test_command == "python -m pytest"
    assert any(line.strip().endswith("-m pytest") for line in ci.splitlines())


def test_python_api_block_runs():
    (block,) = code_blocks("python")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    cfg = namespace["cfg"]
    assert namespace["logits"].shape == (2, 64, cfg.vocab_size)
    assert namespace["out"].shape == (2, 30)


def test_cli_without_command_shows_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_cli_unknown_command_is_an_error():
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
