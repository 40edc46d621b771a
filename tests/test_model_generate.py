"""RETRO.generate (KV cache) against full re-computation; sampling; save/load; RETRO-fitting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from retrolm.config import RetroConfig
from retrolm.errors import CorruptArtifactError, InputError, MismatchError
from retrolm.model import RETRO

CONFIGS = {
    "tiny": RetroConfig.preset("tiny"),
    "m4": RetroConfig.preset(
        "tiny", chunk_size=4, neighbour_len=6, dec_depth=2, cca_layers=(1,), enc_depth=1
    ),
    "deepnet": RetroConfig.preset("tiny", dec_depth=3, cca_layers=(2, 3), use_deepnet=True),
    # the CCA match bias, over 16 token ids so that neighbours often match the query
    "match": RetroConfig.preset("tiny", vocab_size=16, chunk_size=4, neighbour_len=6, cca_match=2),
    "copy": RetroConfig.preset(
        "tiny", vocab_size=16, chunk_size=4, neighbour_len=6, cca_match=2, copy_head=True
    ),
}


def make_model(cfg: RetroConfig, seed: int = 0) -> RETRO:
    torch.manual_seed(seed)
    return RETRO(cfg).double().eval()


class TableRetriever:
    """A deterministic `retrieve`: neighbours chosen by a hash of the chunk, some padded."""

    def __init__(self, cfg: RetroConfig, k: int = 2, seed: int = 5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randint(1, cfg.vocab_size, (97, k, cfg.neighbour_len), generator=g)
        self.table[::3, -1, cfg.neighbour_len // 2 :] = cfg.pad_id  # a missing continuation
        self.table[::5, 0] = cfg.pad_id  # an absent neighbour
        self.calls: list[torch.Tensor] = []

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        self.calls.append(chunk.clone())
        weights = torch.arange(1, chunk.shape[1] + 1)
        return self.table[(chunk * weights).sum(-1) % 97]  # (B, k, r)


def greedy_by_recomputation(model: RETRO, prompt: torch.Tensor, new: int, retrieve) -> torch.Tensor:
    """What RETRO-pytorch's decoding does: re-run the whole sequence for every token."""
    m = model.cfg.chunk_size
    out = prompt
    for _ in range(new):
        n = out.shape[1]
        neighbours = None
        if retrieve is not None:
            chunks = [retrieve(out[:, u * m : (u + 1) * m]) for u in range(n // m)]
            k, r = retrieve.table.shape[1:]
            neighbours = (
                torch.stack(chunks, dim=1)
                if chunks
                else torch.zeros(out.shape[0], 0, k, r, dtype=torch.long)
            )
        with torch.no_grad():
            logits = model(out, neighbours)[:, -1]  # (B, V)
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize(
    "name, prompt_len",
    [("tiny", 11), ("tiny", 3), ("m4", 6), ("deepnet", 16), ("match", 5)],
)
def test_cached_greedy_equals_full_recomputation(name: str, prompt_len: int) -> None:
    cfg = CONFIGS[name]
    m = cfg.chunk_size
    model = make_model(cfg)
    new = 3 * m + 5  # crosses at least three chunk boundaries
    prompt = torch.randint(
        1, cfg.vocab_size, (3, prompt_len), generator=torch.Generator().manual_seed(7)
    )
    reference = greedy_by_recomputation(model, prompt, new, TableRetriever(cfg))
    retriever = TableRetriever(cfg)
    out = model.generate(prompt, max_new_tokens=new, retrieve=retriever)
    assert out.shape == (3, prompt_len + new)
    assert torch.equal(out[:, :prompt_len], prompt)
    assert torch.equal(out, reference)
    # one call per completed chunk that a later token reads, prompt chunks included, in order
    fed = prompt_len + new - 1
    assert len(retriever.calls) == fed // m
    for u, chunk in enumerate(retriever.calls):
        assert torch.equal(chunk, out[:, u * m : (u + 1) * m])


def test_cached_greedy_retro_off_and_baseline() -> None:
    cfg = CONFIGS["tiny"]
    prompt = torch.randint(1, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(7))
    model = make_model(cfg)
    reference = greedy_by_recomputation(model, prompt, 30, None)
    assert torch.equal(model.generate(prompt, 30), reference)
    baseline = make_model(RetroConfig.preset("tiny", cca_layers=()))
    assert torch.equal(
        baseline.generate(prompt, 30), greedy_by_recomputation(baseline, prompt, 30, None)
    )


def test_cached_generation_with_padding_in_the_prompt() -> None:
    cfg = CONFIGS["tiny"]
    model = make_model(cfg)
    prompt = torch.randint(1, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(7))
    prompt[0, 5:7] = cfg.pad_id
    prompt[1, 9] = cfg.pad_id
    reference = greedy_by_recomputation(model, prompt, 20, TableRetriever(cfg))
    assert torch.equal(model.generate(prompt, 20, retrieve=TableRetriever(cfg)), reference)


def test_sampling_is_reproducible_and_filters_work() -> None:
    cfg = CONFIGS["tiny"]
    model = make_model(cfg)
    prompt = torch.randint(1, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(7))

    def sample(seed: int, **kw) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 20, retrieve=TableRetriever(cfg), generator=g, **kw)

    a, b, c = sample(1, temperature=1.0), sample(1, temperature=1.0), sample(2, temperature=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(prompt, 20, retrieve=TableRetriever(cfg))
    assert not torch.equal(a, greedy)
    assert torch.equal(sample(3, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample(3, temperature=1.0, top_p=1e-6), greedy)
    # top_k: every sampled token is among the k most likely under full re-computation
    out = sample(4, temperature=5.0, top_k=3)
    with torch.no_grad():
        logits = model(
            out[:, :-1],
            torch.stack(
                [
                    TableRetriever(cfg)(out[:, u * 8 : u * 8 + 8])
                    for u in range((out.shape[1] - 1) // 8)
                ],
                1,
            ),
        )
    top3 = logits[:, 4:].topk(3, dim=-1).indices  # predictions for positions 5..
    assert (top3 == out[:, 5:, None]).any(-1).all()


def test_generate_rejects_bad_arguments() -> None:
    cfg = CONFIGS["tiny"]
    model = make_model(cfg)
    prompt = torch.ones(2, 5, dtype=torch.long)
    long = torch.ones(1, cfg.max_seq_len + 1, dtype=torch.long)  # longer than the window: read
    assert torch.equal(model.generate(long, 3)[:, : long.shape[1]], long)  # as the window holds it
    assert model.generate(prompt, cfg.max_seq_len).shape == (2, 5 + cfg.max_seq_len)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 3, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match=r"shape \(batch, n\)"):
        model.generate(prompt[0], 3)
    with pytest.raises(ValueError, match=r"retrieve\(chunk\) must return .*\(batch=2, k, r\)"):
        model.generate(prompt, 10, retrieve=lambda chunk: torch.ones(2, 16, dtype=torch.long))
    assert model.training is False
    model.train()
    model.generate(prompt, 2)
    assert model.training  # generate restores the mode it found


# ---------------------------------------------------------------------------------------------
# save / load / RETRO-fitting


def test_save_load_round_trip_gives_identical_logits(tmp_path) -> None:
    cfg = CONFIGS["deepnet"]
    torch.manual_seed(0)
    model = RETRO(cfg)
    tokens = torch.randint(1, cfg.vocab_size, (2, 30))
    neighbours = torch.randint(0, cfg.vocab_size, (2, 3, 2, cfg.neighbour_len))
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == cfg.to_dict()
    loaded = RETRO.load(tmp_path / "m")
    assert loaded.cfg == cfg
    with torch.no_grad():
        assert torch.equal(loaded(tokens, neighbours), model(tokens, neighbours))


def test_a_model_saved_with_the_notes_field_still_opens(tmp_path):
    """Configs of retrolm 0.1.0 carry `extra: {}` (free-form notes) in config.json and in the
    weights file's metadata: such a folder loads, with the same weights."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = CONFIGS["deepnet"]
    model = RETRO(cfg)
    model.save(tmp_path / "m")
    old = cfg.to_dict() | {"extra": {}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(old))
    path = tmp_path / "m" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: json.dumps(old, sort_keys=True) for k in f.metadata()}
    save_file(load_file(str(path)), str(path), metadata=metadata)
    loaded = RETRO.load(tmp_path / "m")
    assert loaded.cfg == cfg
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def _rewrite_weights(folder, change) -> None:
    path = folder / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata=metadata)


def test_load_refuses_missing_extra_or_misshapen_weights(tmp_path) -> None:
    cfg = CONFIGS["tiny"]
    RETRO(cfg).save(tmp_path / "m")
    _rewrite_weights(tmp_path / "m", lambda s: s.pop("blocks.1.cca.q.weight"))
    with pytest.raises(CorruptArtifactError, match=r"missing: blocks\.1\.cca\.q\.weight"):
        RETRO.load(tmp_path / "m")

    RETRO(cfg).save(tmp_path / "m")
    _rewrite_weights(tmp_path / "m", lambda s: s.update(stray=torch.zeros(3)))
    with pytest.raises(CorruptArtifactError, match=r"unexpected: stray"):
        RETRO.load(tmp_path / "m")

    RETRO(cfg).save(tmp_path / "m")
    _rewrite_weights(tmp_path / "m", lambda s: s.update({"lm_head.weight": torch.zeros(3, 3)}))
    with pytest.raises(CorruptArtifactError, match=r"wrong shape: lm_head\.weight"):
        RETRO.load(tmp_path / "m")


def test_a_folder_saved_before_a_config_field_existed_still_loads(tmp_path) -> None:
    """A model saved by an older retrolm has no copy_head in either file; loading fills the
    default and must not call the two files "different saves"."""
    from safetensors import safe_open

    from retrolm.weights import _META_KEY

    cfg = CONFIGS["tiny"]
    model = make_model(cfg)
    model.save(tmp_path / "m")
    old = {k: v for k, v in cfg.to_dict().items() if k != "copy_head"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(old))
    path = tmp_path / "m" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**metadata, _META_KEY: json.dumps(old)})
    loaded = RETRO.load(tmp_path / "m")
    assert loaded.cfg == cfg and not loaded.cfg.copy_head


def test_load_refuses_mixed_or_missing_files(tmp_path) -> None:
    cfg = CONFIGS["tiny"]
    RETRO(cfg).save(tmp_path / "m")
    other = RetroConfig.preset("tiny", dropout=0.1)
    (tmp_path / "m" / "config.json").write_text(json.dumps(other.to_dict()))
    with pytest.raises(CorruptArtifactError, match="different saves"):
        RETRO.load(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptArtifactError):
        RETRO.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(InputError, match="config.json not found"):
        RETRO.load(tmp_path / "m")


def test_from_baseline_loads_the_decoder_and_fresh_retrieval(tmp_path) -> None:
    cfg = RetroConfig.preset("tiny")
    torch.manual_seed(0)
    baseline = RETRO(RetroConfig.preset("tiny", cca_layers=()))
    baseline.save(tmp_path / "base")
    model = RETRO.from_baseline(tmp_path / "base", cfg)
    tokens = torch.randint(1, cfg.vocab_size, (2, 30))
    with torch.no_grad():  # RETRO[OFF] of the retro-fitted model is the baseline
        assert torch.equal(model(tokens), baseline(tokens))
    names = {n for n, _ in model.retrieval_parameters()}
    assert names and names.isdisjoint(baseline.state_dict())

    with pytest.raises(MismatchError, match="dec_dim: 64 vs 96"):
        RETRO.from_baseline(tmp_path / "base", RetroConfig.preset("tiny", dec_dim=96))
    _rewrite_weights(tmp_path / "base", lambda s: s.pop("blocks.0.attn.qkv.weight"))
    with pytest.raises(CorruptArtifactError, match=r"missing: blocks\.0\.attn\.qkv\.weight"):
        RETRO.from_baseline(tmp_path / "base", cfg)
    RETRO(cfg).save(tmp_path / "retro")  # a RETRO model carries extra (retrieval) weights
    with pytest.raises(CorruptArtifactError, match=r"unexpected: blocks\.1\.cca"):
        RETRO.from_baseline(tmp_path / "retro", cfg)


def test_retrieve_may_return_numpy_int32() -> None:
    cfg = CONFIGS["tiny"]
    model = make_model(cfg)
    prompt = torch.randint(1, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))
    as_tensor = TableRetriever(cfg)
    as_numpy = TableRetriever(cfg)
    expected = model.generate(prompt, 12, retrieve=as_tensor)
    out = model.generate(prompt, 12, retrieve=lambda c: as_numpy(c).numpy().astype("int32"))
    assert torch.equal(out, expected)


def test_on_token_streams_each_new_token_in_order() -> None:
    torch.manual_seed(0)
    cfg = RetroConfig.preset("tiny")
    model = RETRO(cfg)
    prompt = torch.randint(1, cfg.vocab_size, (2, 5))
    seen: list[torch.Tensor] = []
    out = model.generate(prompt, 20, retrieve=None, on_token=lambda t: seen.append(t.clone()))
    assert len(seen) == 20
    assert torch.equal(torch.stack(seen, dim=1), out[:, 5:])
