"""RETRO-fitting Hugging Face causal LMs (GPT-2, Llama, GPT-NeoX), on tiny random models.

Each family's model is built from a config, saved with save_pretrained into a temporary folder
and loaded offline, as a user's folder would be: no download.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers

import retrolm
from retrolm.decoding import window_start
from retrolm.errors import ConfigError, InputError, MismatchError
from retrolm.hf import RetroFitted, default_cca_layers, retrofit_hf
from retrolm.hf.base import decoder_layers
from retrolm.hf.model import CONFIG_FILE, WEIGHTS_FILE

V = 300  # vocabulary of the tiny models
M = 8  # chunk size
R = 2 * M  # neighbour length
K = 2  # neighbours per chunk
SETTINGS = dict(chunk_size=M, enc_dim=16, enc_heads=2, enc_depth=1, cca_layers=(2, 4))


def family_config(family: str) -> transformers.PretrainedConfig:
    special = dict(bos_token_id=1, eos_token_id=1, pad_token_id=0)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_layer=4, n_embd=32, n_head=4, vocab_size=V, n_positions=256, **special
        )
    if family == "llama":
        return transformers.LlamaConfig(
            num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=V, max_position_embeddings=256, **special,
        )  # fmt: skip
    return transformers.GPTNeoXConfig(
        num_hidden_layers=4, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=V, max_position_embeddings=256, **special,
    )  # fmt: skip


FAMILIES = ("gpt2", "llama", "gpt_neox")


@pytest.fixture(scope="module", params=FAMILIES)
def base_folder(request, tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    transformers.AutoModelForCausalLM.from_config(family_config(request.param)).save_pretrained(
        folder
    )
    return folder


def reference(folder) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def perturb(model: RetroFitted, seed: int = 1) -> RetroFitted:
    """Give every retrieval weight (the CCA output projections are zero at init) random values
    of unit-variance scale, so that the neighbours change the logits a lot; open the copy
    head's gate (zero at init) halfway, so that it copies too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.retrieval_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        if model.copy is not None:
            model.copy.gate.fill_(0.5)
    return model


def tokens(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, V, (batch, n), generator=torch.Generator().manual_seed(seed))


def neighbours(batch: int, chunks: int, seed: int = 1) -> torch.Tensor:
    nb = torch.randint(2, V, (batch, chunks, K, R), generator=torch.Generator().manual_seed(seed))
    nb[:, ::2, 1, M:] = 0  # a missing continuation (padding)
    nb[:, 1::3, 0] = 0  # an absent neighbour
    return nb


class Retriever:
    """A deterministic `retrieve`: the neighbours are a function of the chunk's tokens."""

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:  # (B, m) -> (B, k, r)
        base = chunk.sum(dim=1, keepdim=True)[:, :, None]  # (B, 1, 1)
        offsets = torch.arange(K * R).view(1, K, R)
        return (base * 7 + offsets * 13) % (V - 2) + 2


# ---- equality with the base


def test_retrofit_hf_is_exported():
    assert retrolm.retrofit_hf is retrofit_hf
    assert default_cca_layers(12) == (6, 9, 12)


def test_at_init_on_and_off_equal_the_base(base_folder):
    model = retrofit_hf(base_folder, **SETTINGS)
    x, nb = tokens(2, 5 * M + 3), neighbours(2, 6)
    with torch.no_grad():
        expected = reference(base_folder)(x).logits
        off, on = model(x), model(x, nb)
    assert (off - expected).abs().max() <= 1e-5
    assert (on - expected).abs().max() <= 1e-5


def test_trained_cca_changes_on_but_never_off(base_folder):
    model = perturb(retrofit_hf(base_folder, **SETTINGS))
    x, nb = tokens(2, 4 * M), neighbours(2, 4)
    with torch.no_grad():
        expected = reference(base_folder)(x).logits
        off, on = model(x), model(x, nb)
    assert (off - expected).abs().max() <= 1e-5
    assert (on - expected).abs().max() > 1e-2
    # positions before m-1 read no chunk: still the base's
    # (with the copy head, `on` is log-probabilities: compare distributions)
    lp_on, lp_expected = on.log_softmax(-1), expected.log_softmax(-1)
    assert (lp_on[:, : M - 1] - lp_expected[:, : M - 1]).abs().max() <= 1e-5


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_base_and_retro_from_one_lower_pass_equal_each_alone(base_folder, gradient_checkpointing):
    model = perturb(retrofit_hf(base_folder, **{**SETTINGS, "cca_layers": (3, 4)},
                                gradient_checkpointing=gradient_checkpointing))  # fmt: skip
    x, nb = tokens(2, 4 * M + 5), neighbours(2, 5)
    layers = list(decoder_layers(model.base))
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):  # the layer's first module runs when the layer computes
        first = next(layer.children())
        first.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    with torch.no_grad():
        base_hidden, on = model.base_and_retro(x, nb)
        assert calls == [1, 1, 1, 2]  # below the first CCA layer (after layer 3): one pass
        alone_base, alone_on = model.hidden_states(x), model(x, nb)
        again_base, again_on = model.base_and_retro(x, nb)  # the layers are themselves again
    assert (base_hidden - alone_base).abs().max() <= 1e-5
    assert (on - alone_on).abs().max() <= 1e-5
    assert (on - reference(base_folder)(x).logits).abs().max() > 1e-2  # CCA did read them
    assert torch.equal(again_base, base_hidden) and torch.equal(again_on, on)


def test_loss_is_the_cross_entropy_of_the_logits(base_folder):
    model = perturb(retrofit_hf(base_folder, **SETTINGS))
    x, nb = tokens(2, 3 * M), neighbours(2, 3)
    y = tokens(2, 3 * M, seed=3)
    y[0, -5:] = model.cfg.pad_id  # padding targets are ignored
    with torch.no_grad():
        expected = F.cross_entropy(model(x, nb).flatten(0, 1), y.flatten(), ignore_index=0)
        assert torch.allclose(model.loss(x, y, nb), expected, atol=1e-6)


# ---- causality


@pytest.mark.parametrize("p", [2 * M + 3, 3 * M])
def test_no_logit_depends_on_a_later_token(base_folder, p):
    model = perturb(retrofit_hf(base_folder, **SETTINGS))
    x, nb = tokens(1, 4 * M), neighbours(1, 4)
    changed = x.clone()
    changed[0, p] = (changed[0, p] + 1) % (V - 2) + 2
    with torch.no_grad():
        a, b = model(x, nb), model(changed, nb)
    assert (a[:, :p] - b[:, :p]).abs().max() <= 1e-6
    assert (a[:, p:] - b[:, p:]).abs().max() > 1e-4


@pytest.mark.parametrize("u", [0, 2])
def test_neighbours_of_chunk_u_reach_position_u_plus_1_m_minus_1_onwards(base_folder, u):
    model = perturb(retrofit_hf(base_folder, **SETTINGS))
    x, nb = tokens(1, 4 * M), neighbours(1, 4)
    changed = nb.clone()
    changed[0, u] = (changed[0, u] + 5) % (V - 2) + 2  # other neighbours for chunk u only
    with torch.no_grad():
        a, b = model(x, nb), model(x, changed)
    first = (u + 1) * M - 1
    assert (a[:, :first] - b[:, :first]).abs().max() <= 1e-6
    assert (a[:, first] - b[:, first]).abs().max() > 1e-4


# ---- cached generation


def recompute_greedy(model, prompt, steps, retrieve):
    """Greedy decoding by full recomputation over the window `RETRO.generate` reads."""
    cfg, seq = model.cfg, prompt
    for _ in range(steps):
        t = seq.shape[1]
        s = window_start(t, cfg.max_seq_len, cfg.chunk_size)
        window = seq[:, s:t]
        chunks = window.shape[1] // M
        nb = None
        if retrieve is not None and chunks:
            nb = torch.stack([retrieve(window[:, c * M : (c + 1) * M]) for c in range(chunks)], 1)
        with torch.no_grad():
            logits = model(window, nb)[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("retrieval", [True, False])
def test_cached_generation_equals_recomputation(base_folder, retrieval):
    # max_seq_len 4 chunks, 45 new tokens: the window slides past max_seq_len twice
    model = perturb(retrofit_hf(base_folder, **SETTINGS, max_seq_len=4 * M))
    retrieve = Retriever() if retrieval else None
    prompt = tokens(2, M + 3)
    out = model.generate(prompt, 45, retrieve=retrieve)
    assert torch.equal(out, recompute_greedy(model, prompt, 45, retrieve))
    if retrieval:  # the neighbours changed what was generated
        assert not torch.equal(out, model.generate(prompt, 45))


def test_cached_generation_with_the_match_bias_equals_recomputation(tmp_path):
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(family_config("gpt2")).save_pretrained(tmp_path)
    model = perturb(retrofit_hf(tmp_path, **SETTINGS, cca_match=2))

    def copies(chunk):  # (B, m) -> (B, k, r): the chunk itself, twice: the match bias fires
        return chunk.repeat(1, 2)[:, None].expand(-1, K, -1).contiguous()

    prompt = tokens(1, 2 * M - 1)
    out = model.generate(prompt, 3 * M, retrieve=copies)
    assert torch.equal(out, recompute_greedy(model, prompt, 3 * M, copies))


def test_sampling_is_reproducible(base_folder):
    model = perturb(retrofit_hf(base_folder, **SETTINGS))
    prompt = tokens(1, M + 1)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 12, Retriever(), temperature=1.0, top_k=20, generator=g)

    assert torch.equal(sample(3), sample(3))
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 2, temperature=1.0, top_p=2.0)


# ---- training: only the retrieval weights


def test_gradients_reach_only_the_retrieval_parameters(base_folder):
    model = perturb(retrofit_hf(base_folder, **SETTINGS)).train()
    assert not model.base.training  # the frozen base keeps eval mode
    x, nb, y = tokens(2, 3 * M), neighbours(2, 3), tokens(2, 3 * M, seed=4)
    model.loss(x, y, nb).backward()
    retrieval = dict(model.retrieval_parameters())
    assert retrieval and not any(name.startswith("base.") for name in retrieval)
    for name, p in model.named_parameters():
        if name in retrieval:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_gradient_checkpointing_gives_the_same_gradients(base_folder):
    x, nb, y = tokens(2, 3 * M), neighbours(2, 3), tokens(2, 3 * M, seed=4)
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = perturb(retrofit_hf(base_folder, **SETTINGS, gradient_checkpointing=flag))
        model.loss(x, y, nb).backward()
        grads.append({n: p.grad.clone() for n, p in model.retrieval_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


def test_bf16_base_runs_and_stays_close(base_folder):
    torch.manual_seed(0)
    full = perturb(retrofit_hf(base_folder, **SETTINGS))
    torch.manual_seed(0)
    half = perturb(retrofit_hf(base_folder, **SETTINGS, dtype="bfloat16"))
    assert next(half.base.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for _, p in half.retrieval_parameters())
    x, nb, y = tokens(2, 3 * M), neighbours(2, 3), tokens(2, 3 * M, seed=4)
    with torch.no_grad():
        a, b = full(x, nb), half(x, nb).float()
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    half.loss(x, y, nb).backward()
    assert all(p.grad is not None for _, p in half.retrieval_parameters())
    assert half.generate(x[:, :3], 2 * M, Retriever()).shape == (2, 3 + 2 * M)


# ---- save / load


def test_save_load_round_trip(base_folder, tmp_path):
    model = perturb(retrofit_hf(base_folder, **SETTINGS))
    model.save(tmp_path / "rf")
    assert sorted(p.name for p in (tmp_path / "rf").iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE]
    )
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "rf" / WEIGHTS_FILE))
    assert set(stored) == {name for name, _ in model.retrieval_parameters()}  # no base weight
    loaded = RetroFitted.load(tmp_path / "rf")
    x, nb = tokens(2, 3 * M), neighbours(2, 3)
    with torch.no_grad():
        assert torch.equal(model(x, nb), loaded(x, nb))
    assert loaded.cfg == model.cfg


def test_a_changed_base_is_refused(base_folder, tmp_path):
    model = retrofit_hf(base_folder, **SETTINGS)
    model.save(tmp_path / "rf")
    other = tmp_path / "other"
    shutil.copytree(base_folder, other)
    changed = reference(other)
    with torch.no_grad():
        changed.get_input_embeddings().weight[3] += 1.0
    changed.save_pretrained(other)
    with pytest.raises(MismatchError, match="other weights"):
        RetroFitted.load(tmp_path / "rf", base=other)
    RetroFitted.load(tmp_path / "rf", base=shutil.copytree(base_folder, tmp_path / "same"))


# ---- bad input


def test_bad_settings_and_unsupported_families_are_refused(tmp_path):
    transformers.AutoModelForCausalLM.from_config(family_config("gpt2")).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unknown retrieval setting"):
        retrofit_hf(tmp_path, dec_dim=64)
    with pytest.raises(ConfigError, match="cca_layers"):
        retrofit_hf(tmp_path, **{**SETTINGS, "cca_layers": (5,)})
    with pytest.raises(ConfigError, match="max_seq_len"):
        retrofit_hf(tmp_path, chunk_size=M, max_seq_len=512)
    opt = tmp_path / "opt"
    transformers.OPTConfig(num_hidden_layers=2, hidden_size=16, ffn_dim=32).save_pretrained(opt)
    with pytest.raises(InputError, match="supports the families"):
        retrofit_hf(opt)
    with pytest.raises(InputError, match="not a Hugging Face model folder"):
        retrofit_hf(tmp_path / "nowhere")


# ---- the copy head (the same CopyHead as RETRO's, gated to start closed)


def test_the_copy_head_is_on_by_default_and_closed_at_init(base_folder):
    model = retrofit_hf(base_folder, **SETTINGS)
    assert model.copy is not None and model.cfg.copy_head and model.cfg.cca_match > 0
    x, nb, y = tokens(2, 4 * M), neighbours(2, 4), tokens(2, 4 * M, seed=4)
    with torch.no_grad():
        expected = F.cross_entropy(reference(base_folder)(x).logits.flatten(0, 1), y.flatten())
    # with gradients on, the mixture is computed (the gate must learn) and is still the base
    loss = model.loss(x, y, nb)
    assert abs(loss.item() - expected.item()) <= 1e-5
    loss.backward()
    assert model.copy.gate.grad is not None and model.copy.gate.grad.abs() > 0


def continuation_case(model):
    """Tokens whose chunk 0 is retrieved with its own continuation (the neighbour is the
    text itself): the copy head's match bonus points at the token that comes next."""
    x = tokens(1, 3 * M, seed=7)
    nb = torch.zeros(1, 3, K, R, dtype=torch.long)
    nb[:, 0, 0] = x[0, : 2 * M]  # chunk 0 and its continuation
    nb[:, 1, 0] = x[0, M : 3 * M]
    nb[:, 2, 0] = tokens(1, R, seed=8)[0]
    return x, nb


def test_an_open_copy_head_puts_probability_on_the_neighbour_token_that_follows(base_folder):
    model = retrofit_hf(base_folder, **SETTINGS)
    x, nb = continuation_case(model)
    with torch.no_grad():
        model.copy.gate.fill_(1.0)
        on = model(x, nb).log_softmax(-1)[0]  # (n, V)
        base = reference(base_folder)(x).logits.log_softmax(-1)[0]
    # positions M-1 .. 2M-2 read chunk 0, whose neighbour holds x[p + 1] after a copy of x[..p]
    rows = torch.arange(M - 1, 2 * M - 1)
    nxt = x[0, rows + 1]
    p_on, p_base = on[rows, nxt].exp(), base[rows, nxt].exp()
    assert (p_on > 0.5).all(), p_on
    assert (p_base < 0.1).all()
    # before M-1 nothing is read: the base's distribution
    assert (on[: M - 1] - base[: M - 1]).abs().max() <= 1e-5


def test_the_gate_opens_where_copying_lowers_the_loss(base_folder):
    model = retrofit_hf(base_folder, **SETTINGS)
    x, nb = continuation_case(model)
    y = torch.cat([x[:, 1:], torch.zeros(1, 1, dtype=torch.long)], dim=1)
    model.loss(x, y, nb).backward()
    pull = model.copy.gate.grad.item()
    assert pull < 0  # gradient descent raises the gate
    model.zero_grad()
    nb[:, :, 0] = tokens(1, R, seed=9)[0]  # unrelated neighbours: little to copy
    model.loss(x, y, nb).backward()
    assert model.copy.gate.grad.item() > pull / 4


# ---- batched decoding: rows at different positions in one forward pass


def test_rows_at_different_positions_decode_as_recomputed(base_folder):
    """`prefill_rows` into scattered rows, then `decode_rows` with the rows at different
    positions, windows sliding past max_seq_len: every row's logits equal `model(window,
    neighbours)` recomputed (float64; cca_match and an open copy head)."""
    N = 4 * M
    model = perturb(retrofit_hf(base_folder, **SETTINGS, cca_match=2, max_seq_len=N)).double()
    total = N + 2 * M + 3
    seqs = tokens(3, total, seed=5)
    retrieve = Retriever()
    nbrs = torch.stack([retrieve(seqs[:, u * M : (u + 1) * M]) for u in range(total // M)], 1)
    cache, rows, offsets = model.new_cache(5), [4, 0, 2], [0, 5, 2 * M + 1]
    starts, checked = [-1, -1, -1], 0
    for step in range(3, total - max(offsets)):
        decode, logits_of = [], {}
        for b, (row, off) in enumerate(zip(rows, offsets, strict=True)):
            t = step + off
            s = window_start(t, N, M)
            if s != starts[b]:  # joins, or its window slid: encode the window into the row
                window, nb = seqs[b, s:t], nbrs[b, s // M : t // M]
                logits_of[b] = model.prefill_rows(cache, [row], [window], [nb])[0]
                starts[b] = s
            else:
                decode.append(b)
        if decode:
            pos = torch.tensor([step + offsets[b] - 1 - starts[b] for b in decode])
            fed = torch.stack([seqs[b, step + offsets[b] - 1] for b in decode])
            done = [b for b, p in zip(decode, pos.tolist(), strict=True) if (p + 1) % M == 0]
            nb = [nbrs[b, (step + offsets[b] - 1) // M] for b in done]
            out = model.decode_rows(
                cache, torch.tensor([rows[b] for b in decode]), fed, pos,
                torch.stack(nb) if nb else None,
            )  # fmt: skip
            logits_of.update(zip(decode, out, strict=True))
        for b, logits in logits_of.items():
            t = step + offsets[b]
            s = window_start(t, N, M)
            with torch.no_grad():
                expected = model(seqs[b : b + 1, s:t], nbrs[b : b + 1, s // M : t // M])[0, -1]
            # a copy head's mixture is log-probabilities, raw logits where nothing is read:
            # the distributions are what must agree
            torch.testing.assert_close(logits.log_softmax(-1), expected.log_softmax(-1))
            checked += 1
    assert checked > 90  # every step of every row


def test_each_sequence_in_a_batch_equals_generate_alone(base_folder):
    """A RETRO-fitted model under `BatchDecoder`: sequences of other lengths join at other
    steps (two in the same step), one reads no neighbours (RETRO[OFF]), most run past
    max_seq_len; each equals `generate` alone, and the rows shared forward passes."""
    from retrolm.decoding import BatchDecoder, Sequence

    N = 4 * M
    model = perturb(retrofit_hf(base_folder, **SETTINGS, cca_match=2, max_seq_len=N)).double()
    retrieve = Retriever()

    def batch_retrieve(chunks):
        return retrieve(torch.from_numpy(chunks))

    lengths, news = [1, M + 3, N, 5, 2 * M], [N + 9, 2 * N, 7, N, 3 * M]
    prompts = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    seqs = [
        Sequence(p.tolist(), new, None if i == 3 else batch_retrieve)
        for i, (p, new) in enumerate(zip(prompts, news, strict=True))
    ]
    decoder = BatchDecoder(model, slots=4, k=K)
    joins = {0: [0], 2: [1, 2], 5: [3], 9: [4]}  # step -> sequences that arrive then
    step, waiting = 0, []
    while step <= max(joins) or waiting or decoder.running:
        waiting += [seqs[i] for i in joins.get(step, [])]
        while waiting and decoder.has_room:
            decoder.add(waiting.pop(0))
        decoder.step()
        step += 1
    for i, (p, new, s) in enumerate(zip(prompts, news, seqs, strict=True)):
        alone = model.generate(p[None], new, retrieve=None if i == 3 else retrieve)
        assert s.tokens == alone[0].tolist(), i
    # alone, every token is a forward pass; here the rows of each cache (ON, OFF) shared them
    assert decoder.steps < 0.6 * sum(news)
