"""Generation with retrieval in the loop: attribution, equality with full re-computation, errors."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

from retrolm.cli import main as cli_main
from retrolm.database import Database
from retrolm.errors import InputError
from retrolm.generate import TextStreamer, generate_text
from retrolm.model import RETRO
from tests.test_evaluate import build_world

PROMPT = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bad jugs " * 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def test_attribution_matches_db_search_for_the_same_chunk(world):
    db = Database.open(world["db"])
    result = generate_text(world["retro"], db, PROMPT, max_new_tokens=40)
    m = db.chunk_size
    assert len(result.attribution) == (len(result.tokens) - 1) // m
    assert any(c.in_prompt for c in result.attribution)
    assert any(not c.in_prompt for c in result.attribution)
    for chunk in result.attribution:
        tokens = result.tokens[chunk.start_token : chunk.start_token + m]
        assert chunk.text == db.tokenizer.decode(tokens)
        hits = db.search(chunk.text, k=2)[0]
        assert [n.chunk_id for n in chunk.neighbours] == [h.chunk_id for h in hits]
        assert [n.document for n in chunk.neighbours] == [h.document_name for h in hits]
        assert [n.text for n in chunk.neighbours] == [h.text for h in hits]
        np.testing.assert_allclose(
            [n.score for n in chunk.neighbours], [h.score for h in hits], rtol=1e-5
        )
    text = result.attribution_text()
    assert result.attribution[0].neighbours[0].document in text


def test_greedy_generation_equals_full_recomputation_with_the_same_retrieval(world):
    db = Database.open(world["db"])
    result = generate_text(world["retro"], db, PROMPT, max_new_tokens=36)
    model = RETRO.load(world["retro"] / "model").eval()
    m, tokens = db.chunk_size, torch.tensor([result.tokens])
    chunks = tokens[0, : (tokens.shape[1] - 1) // m * m].reshape(-1, m).numpy()
    ids, _ = db.search_chunks(chunks, 2)
    neighbours = torch.from_numpy(db.neighbour_tokens(ids))[None]  # (1, chunks, k, r)
    with torch.no_grad():
        logits = model(tokens[:, :-1], neighbours=neighbours)
    greedy = logits[0].argmax(-1)
    p = result.prompt_tokens
    assert greedy[p - 1 :].tolist() == result.tokens[p:]


def test_prompt_shorter_than_a_chunk_and_streaming(world):
    pieces: list[str] = []
    result = generate_text(
        world["retro"], world["db"], "the", max_new_tokens=40, on_text=pieces.append
    )
    assert result.prompt_tokens < 16
    assert len(result.tokens) == result.prompt_tokens + 40
    assert result.attribution and not result.attribution[0].in_prompt
    assert "".join(pieces) == result.text
    # streamed token by token, not chunk by chunk: the pieces a streamer fed every generated
    # token gives (a token ending inside a UTF-8 character waits for the next one, so how many
    # depends on what this random model writes); chunk-wise streaming gives <= 3 for 3 chunks
    p, expected = result.prompt_tokens, []
    decode = partial(Database.open(world["db"]).tokenizer.decode_after, result.tokens[:p])
    streamer = TextStreamer(decode, expected.append)
    for i in range(p + 1, len(result.tokens) + 1):
        streamer.update(result.tokens[p:i], final=i == len(result.tokens))
    assert pieces == expected and len(pieces) > 3


def test_sampling_is_seeded(world):
    a = generate_text(
        world["retro"], world["db"], "fox", max_new_tokens=20, temperature=1.0, seed=3
    )
    b = generate_text(
        world["retro"], world["db"], "fox", max_new_tokens=20, temperature=1.0, seed=3
    )
    assert a.tokens == b.tokens


def test_baseline_generates_without_retrieval(world):
    result = generate_text(world["base"], world["db"], PROMPT, max_new_tokens=10)
    assert result.attribution == [] and len(result.tokens) == result.prompt_tokens + 10


def test_bad_inputs(world, tmp_path, capsys):
    with pytest.raises(InputError, match="empty"):
        generate_text(world["retro"], world["db"], "", max_new_tokens=5)
    assert cli_main(["generate", str(world["retro"]), "", "--db", str(world["db"])]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert cli_main(["generate", str(tmp_path / "none"), "hi", "--db", str(world["db"])]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_generate_streams_then_lists_sources(world, capsys):
    args = ["generate", str(world["retro"]), PROMPT, "--db", str(world["db"])]
    assert cli_main([*args, "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPT) and "retrieved chunks" in out
    assert cli_main([*args, "--max-new-tokens", "20", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["attribution"][0]["neighbours"][0]["document"]


def test_cli_generates_past_max_seq_len(world, capsys):
    """--max-new-tokens above max_seq_len: the window slides, retrieval goes on at every chunk."""
    n = 300  # the tiny model's max_seq_len is 128
    args = ["generate", str(world["retro"]), PROMPT, "--db", str(world["db"]), "--json"]
    assert cli_main([*args, "--max-new-tokens", str(n)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["tokens"]) == d["prompt_tokens"] + n > 128
    assert len(d["attribution"]) == (len(d["tokens"]) - 1) // 16  # every chunk, slides or not
    assert [c["chunk_index"] for c in d["attribution"]] == list(range(len(d["attribution"])))


def test_a_prompt_longer_than_the_window_is_read_as_the_window_holds_it(world):
    """The oldest whole chunks of a long prompt are dropped unread (as generation drops them):
    the chunks retrieved for are the window's, each labelled with its place in the sequence."""
    from retrolm.decoding import window_start

    result = generate_text(world["retro"], world["db"], PROMPT * 20, max_new_tokens=20)
    N, m = 128, 16  # the tiny model's max_seq_len and chunk size
    P = result.prompt_tokens
    assert P > N and len(result.tokens) == P + 20
    first = window_start(P, N, m) // m
    assert first > 0
    indexes = [c.chunk_index for c in result.attribution]
    assert indexes == list(range(first, (P + 20 - 1) // m))
    assert all(c.in_prompt == ((c.chunk_index + 1) * m <= P) for c in result.attribution)


def _cli(capsys, *args) -> tuple[int, str, str]:
    """`retrolm ARGS` in this process: (exit code, stdout, stderr), never a traceback."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--seed", str(2**64)], "--seed"),
        (["--seed", str(2**70)], "--seed"),
        (["--seed", str(-(2**63) - 1)], "--seed"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "2"], "--top-p"),
        (["--top-p", "nan"], "--top-p"),
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "inf"], "--temperature"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--neighbours", "0"], "--neighbours"),
        (["--top-k", "0"], "--top-k"),
    ],
    ids=["seed-2^64", "seed-2^70", "seed-below", "top-p-0", "top-p-2", "top-p-nan", "temp-neg",
         "temp-nan", "temp-inf", "max-0", "max-neg", "k-0", "top-k-0"],
)  # fmt: skip
def test_cli_bad_settings_are_one_line_before_anything_is_printed(world, capsys, extra, flag):
    args = ["generate", world["retro"], "fox", "--db", world["db"], "--temperature", "1"]
    code, out, err = _cli(capsys, *args, *extra)
    assert code == 2 and flag in _error_line(err)
    assert out == ""  # the prompt is not echoed before the refusal


def test_cli_seed_that_argparse_refuses_is_a_usage_error(world, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(
            ["generate", str(world["retro"]), "fox", "--db", str(world["db"]), "--seed", "1e23"]
        )
    assert exit_.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        ["--seed", str(2**64 - 1), "--temperature", "1"],
        ["--seed", str(-(2**63)), "--temperature", "1"],
        ["--seed", "-1", "--temperature", "1"],
        ["--temperature", "1e-320"],
        ["--temperature", "1", "--top-p", "1e-300"],
        ["--temperature", "1e-30", "--top-p", "1e-300", "--top-k", "1"],
        ["--temperature", "1", "--top-k", str(10**12)],
    ],
    ids=[
        "seed-max",
        "seed-min",
        "seed-neg",
        "temp-denormal",
        "top-p-tiny",
        "all-tiny",
        "top-k-big",
    ],
)
def test_cli_extreme_but_valid_settings_generate(world, capsys, extra):
    args = ["generate", world["retro"], "fox", "--db", world["db"], "--max-new-tokens", "5"]
    code, out, err = _cli(capsys, *args, *extra, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert len(d["tokens"]) == d["prompt_tokens"] + 5


def test_tiny_temperature_and_top_p_are_greedy(world):
    greedy = generate_text(world["retro"], world["db"], PROMPT, max_new_tokens=8)
    for kw in ({"temperature": 1e-320}, {"temperature": 1.0, "top_p": 1e-300}):
        assert generate_text(
            world["retro"], world["db"], PROMPT, max_new_tokens=8, **kw
        ).tokens == (greedy.tokens)


def test_generate_text_refuses_a_seed_torch_cannot_take(world):
    with pytest.raises(InputError, match="--seed"):
        generate_text(world["retro"], world["db"], "fox", max_new_tokens=2, seed=2**64)


def test_cli_prompt_file(world, tmp_path, capsys, monkeypatch):
    args = ["generate", world["retro"], "--db", world["db"], "--max-new-tokens", "4", "--json"]
    text = tmp_path / "prompt.txt"
    text.write_text(PROMPT, encoding="utf-8")
    code, out, err = _cli(capsys, *args, "--prompt-file", text)
    assert code == 0, err
    assert json.loads(out)["prompt"] == PROMPT
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"the quick fox\n")))
    code, out, err = _cli(capsys, *args, "--prompt-file", "-")
    assert code == 0, err
    assert json.loads(out)["prompt"] == "the quick fox\n"


def test_cli_a_long_prompt_file_is_read_as_the_window_holds_it(world, tmp_path, capsys):
    text = tmp_path / "prompt.txt"
    text.write_text(PROMPT * 300, encoding="utf-8")  # ~50 KB, far past the 128-token window
    args = ["generate", world["retro"], "--db", world["db"], "--max-new-tokens", "4", "--json"]
    code, out, err = _cli(capsys, *args, "--prompt-file", text)
    assert code == 0, err
    d = json.loads(out)
    assert len(d["tokens"]) == d["prompt_tokens"] + 4 and d["prompt_tokens"] > 1000


@pytest.mark.parametrize(
    "kind,expect",
    [
        ("missing", "does not exist"),
        ("folder", "is a folder"),
        ("binary", "binary"),
        ("latin1", "not UTF-8"),
        ("empty", "prompt is empty"),
        ("both", "one of them"),
        ("neither", "one of them"),
    ],
)
def test_cli_bad_prompts_are_one_line(world, tmp_path, capsys, kind, expect):
    files = {
        "binary": bytes(range(256)) * 4,
        "latin1": "café".encode("latin-1"),
        "empty": b"",
    }
    path = tmp_path / "p.txt"
    if kind in files:
        path.write_bytes(files[kind])
    elif kind == "folder":
        path.mkdir()
    args = ["generate", world["retro"], "--db", world["db"]]
    if kind == "both":
        args += ["hi", "--prompt-file", path]
        path.write_text("x")
    elif kind != "neither":
        args += ["--prompt-file", path]
    code, out, err = _cli(capsys, *args)
    assert code == 2 and expect in _error_line(err)
    assert out == ""


def test_cli_the_prompt_may_follow_the_options(world, capsys):
    code, out, err = _cli(capsys, "generate", world["retro"], "--db", world["db"], "--json", "fox")
    assert code == 0, err
    assert json.loads(out)["prompt"] == "fox"


def test_cli_a_prompt_of_invalid_utf8_is_one_line(world, capsys):
    """Python reads bytes that are not UTF-8 on the command line as lone surrogates."""
    code, out, err = _cli(capsys, "generate", world["retro"], "\udcff\udcfeab", "--db", world["db"])
    assert code == 2 and "not valid UTF-8" in _error_line(err)
    assert out == ""


def test_cli_damaged_or_misplaced_runs_are_one_line(world, tmp_path, capsys):
    import shutil

    run = shutil.copytree(world["retro"], tmp_path / "run")
    (run / "run.json").write_text('{"data')
    code, _, err = _cli(capsys, "generate", run, "fox", "--db", world["db"])
    assert code == 2 and "run.json is damaged" in _error_line(err)
    (run / "run.json").write_text("[1]")
    code, _, err = _cli(capsys, "generate", run, "fox", "--db", world["db"])
    assert code == 2 and "run.json is damaged" in _error_line(err)
    file = tmp_path / "f.txt"
    file.write_text("x")
    code, _, err = _cli(capsys, "generate", file, "fox", "--db", world["db"])
    assert code == 2 and "is a file, not a run folder" in _error_line(err)
    started = tmp_path / "started"
    started.mkdir()
    shutil.copy(world["retro"] / "train_config.json", started)
    code, _, err = _cli(capsys, "generate", started, "fox", "--db", world["db"])
    assert code == 2 and "retrolm train --out" in _error_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_cuda_without_a_gpu_is_refused_before_anything_is_printed(world, capsys):
    code, out, err = _cli(capsys, "generate", world["retro"], "fox", "--db", world["db"],
                          "--device", "cuda")  # fmt: skip
    assert code == 2 and "--device cpu" in _error_line(err)
    assert out == ""
