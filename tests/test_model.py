"""RETRO forward pass: causality, chunked cross-attention shift, padding, gradients, inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from retrolm.config import RetroConfig
from retrolm.model import RETRO, ChunkedCrossAttention, Rotary

# small configs covering: the tiny preset, chunk 4 with r != 2m and CCA in the first layer,
# DeepNet post-norm, odd head counts, and the CCA match bias (a retrolm extension)
CONFIGS = {
    "tiny": RetroConfig.preset("tiny"),
    "m4": RetroConfig.preset(
        "tiny", chunk_size=4, neighbour_len=6, dec_depth=2, cca_layers=(1,), enc_depth=1
    ),
    "deepnet": RetroConfig.preset("tiny", dec_depth=3, cca_layers=(1, 3), use_deepnet=True),
    "heads": RetroConfig.preset(
        "tiny", dec_dim=48, dec_heads=2, enc_dim=36, enc_heads=3, dec_depth=3, cca_layers=(3,)
    ),
    # 16 token ids: random neighbours match the query's last tokens often
    "match": RetroConfig.preset("tiny", vocab_size=16, chunk_size=4, neighbour_len=6, cca_match=2),
    # the copy head's mixture over the neighbour tokens (copy_head needs cca_match)
    "copy": RetroConfig.preset(
        "tiny", vocab_size=16, chunk_size=4, neighbour_len=6, cca_match=2, copy_head=True
    ),
}


def make_model(cfg: RetroConfig, seed: int = 0) -> RETRO:
    torch.manual_seed(seed)
    model = RETRO(cfg).double().eval()
    return model


def random_tokens(cfg: RetroConfig, *shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, cfg.vocab_size, shape, generator=g)  # never pad_id (0)


def loss_and_grads(model: RETRO, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss_fn()'s value and every parameter's gradient of it."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position: did the logits change? a, b (..., n, V) -> (..., n) bool."""
    return (a - b).abs().amax(dim=-1) > 1e-9


# ---------------------------------------------------------------------------------------------
# causality


@pytest.mark.parametrize("name", list(CONFIGS))
def test_token_change_affects_no_earlier_logit(name: str) -> None:
    cfg = CONFIGS[name]
    m = cfg.chunk_size
    n = 4 * m + 3  # not a multiple of m: the last chunk is partial
    model = make_model(cfg)
    tokens = random_tokens(cfg, 1, n)
    neighbours = random_tokens(cfg, 1, -(-n // m), 2, cfg.neighbour_len, seed=2)
    variants = tokens.repeat(n, 1)  # row p changes token p
    variants[torch.arange(n), torch.arange(n)] = (tokens[0] % (cfg.vocab_size - 1)) + 1
    assert (variants != tokens).sum() == n
    with torch.no_grad():
        base = model(tokens, neighbours)  # (1, n, V)
        out = model(variants, neighbours.expand(n, -1, -1, -1))  # (n, n, V)
    diff = changed(out, base)  # (n, n): [p, i] logit i changed when token p changed
    pos = torch.arange(n)
    before = pos[None, :] < pos[:, None]
    assert not diff[before].any(), "a token changed a logit before its own position"
    assert diff[pos, pos].all(), "a token did not change its own logit"
    assert diff[~before].float().mean() > 0.99  # and, with random weights, the later ones


@pytest.mark.parametrize("name", list(CONFIGS))
def test_neighbours_reach_exactly_the_shifted_positions(name: str) -> None:
    cfg = CONFIGS[name]
    m = cfg.chunk_size
    n = 4 * m + 3
    chunks = -(-n // m)  # 5: chunk 4 is partial and read by no position
    model = make_model(cfg)
    tokens = random_tokens(cfg, 1, n)
    neighbours = random_tokens(cfg, 1, chunks, 2, cfg.neighbour_len, seed=2)
    variants = neighbours.repeat(chunks, 1, 1, 1)  # row u: other neighbours for chunk u
    for u in range(chunks):
        variants[u, u] = random_tokens(cfg, 2, cfg.neighbour_len, seed=10 + u)
    with torch.no_grad():
        base = model(tokens, neighbours)
        out = model(tokens.expand(chunks, -1), variants)
    diff = changed(out, base)  # (chunks, n)
    for u in range(chunks):
        first = (u + 1) * m - 1  # the last token of chunk u
        assert not diff[u, :first].any(), f"neighbours of chunk {u} leaked before {first}"
        if first < n:
            # the positions that read chunk u always change; later ones when a decoder block
            # after the first CCA layer carries the change along
            assert diff[u, first : first + m].all(), f"chunk {u} did not reach {first}.."
            if cfg.cca_layers[0] < cfg.dec_depth:
                assert diff[u, first:].all()
        else:
            assert not diff[u].any()


def test_match_bias_attends_the_token_after_a_copy_of_the_last_tokens() -> None:
    """cca_match: with no learned scores, a query attends where its last 2 tokens recur."""
    m, k, r = 4, 2, 6
    cca = ChunkedCrossAttention(dim=k * r, enc_dim=k * r, heads=1, chunk_size=m, match=2)
    with torch.no_grad():
        cca.q.weight.zero_()  # content scores all 0: only the match bias differs
        cca.out.weight.copy_(torch.eye(k * r))
    keys = torch.zeros(1, 1, 1, k * r, k * r)
    values = torch.eye(k * r)[None, None, None]  # value j = one-hot(j): the output is the weights
    key_mask = torch.ones(1, 1, k * r, dtype=torch.bool)
    # chunk 0 is read by positions 3..6; neighbour 0 of chunk 0 is "10 11 12 13 14 15"
    ids = torch.tensor([[1, 2, 3, 10, 11, 12, 5]])  # position 4 ends "10 11", position 5 "11 12"
    nb_ids = torch.tensor([[[[10, 11, 12, 13, 14, 15], [6, 7, 8, 9, 1, 2]]]])  # (B, U, k, r)
    x = torch.randn(1, 7, k * r)
    rotary = Rotary(k * r, 10000.0)

    def weights(scale: float) -> torch.Tensor:
        with torch.no_grad():
            cca.match_weight.fill_(scale)
            return cca(x, 0, keys, values, key_mask, rotary, ids=ids, nb_ids=nb_ids)[0]

    w = weights(10.0)  # (7, k*r): row i is position i's attention over the 12 neighbour tokens
    assert w[:3].abs().max() == 0  # positions 0..2 read no chunk
    assert w[4].argmax() == 2 and w[4, 2] > 0.99  # "10 11" -> attends 12, the token after
    assert w[5].argmax() == 3 and w[5, 3] > 0.99  # "11 12" -> 13
    # one lag matching is enough: position 3 ("10") -> 11; position 6 ("12 5"), lag 1 -> 14
    assert w[3].argmax() == 1 and w[6].argmax() == 4
    assert torch.allclose(weights(0.0)[3:], torch.full((4, k * r), 1 / (k * r)))


def test_retro_off_matches_no_retrieval_before_first_read() -> None:
    cfg = CONFIGS["tiny"]
    m = cfg.chunk_size
    model = make_model(cfg)
    tokens = random_tokens(cfg, 2, 3 * m)
    neighbours = random_tokens(cfg, 2, 3, 2, cfg.neighbour_len, seed=3)
    with torch.no_grad():
        on, off = model(tokens, neighbours), model(tokens)
    torch.testing.assert_close(on[:, : m - 1], off[:, : m - 1], rtol=0, atol=1e-12)
    assert changed(on, off)[:, m - 1 :].all()


# ---------------------------------------------------------------------------------------------
# padding and the number of neighbours


@pytest.mark.parametrize("name", ["tiny", "m4", "heads"])
def test_all_padding_neighbour_is_absent(name: str) -> None:
    cfg = CONFIGS[name]
    model = make_model(cfg)
    tokens = random_tokens(cfg, 2, 4 * cfg.chunk_size)
    neighbours = random_tokens(cfg, 2, 4, 3, cfg.neighbour_len, seed=3)
    padded = neighbours.clone()
    padded[:, :, 1] = cfg.pad_id  # the middle neighbour of every chunk is all padding
    with torch.no_grad():
        with_pad = model(tokens, padded)
        without = model(tokens, neighbours[:, :, [0, 2]])  # k - 1 = 2 neighbours
        full = model(tokens, neighbours)
    torch.testing.assert_close(with_pad, without, rtol=0, atol=1e-10)
    assert changed(with_pad, full)[:, cfg.chunk_size - 1 :].all()  # the neighbour did matter


def test_all_neighbours_absent_is_retro_off() -> None:
    cfg = CONFIGS["tiny"]
    model = make_model(cfg)
    tokens = random_tokens(cfg, 2, 4 * cfg.chunk_size)
    absent = torch.full((2, 4, 2, cfg.neighbour_len), cfg.pad_id)
    with torch.no_grad():
        out = model(tokens, absent)
    assert out.isfinite().all()  # fully masked CCA rows give zeros, not NaN
    torch.testing.assert_close(out, model(tokens), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["tiny", "deepnet"])
def test_padding_inside_neighbours_and_tokens_is_never_read(name: str) -> None:
    cfg = CONFIGS[name]
    m, r = cfg.chunk_size, cfg.neighbour_len
    model = make_model(cfg)
    tokens = random_tokens(cfg, 2, 4 * m)
    tokens[0, m + 2 : m + 5] = cfg.pad_id  # padding in the decoder input (inside chunk 1)
    tokens[1, 3 * m :] = cfg.pad_id  # a padded tail
    neighbours = random_tokens(cfg, 2, 4, 2, r, seed=3)
    neighbours[:, :, 0, r // 2 :] = cfg.pad_id  # a neighbour whose continuation is missing
    neighbours[0, 1, 1, :3] = cfg.pad_id  # padding at the start
    with torch.no_grad():
        before = model(tokens, neighbours)
        model.tok_emb.weight[cfg.pad_id].normal_()  # whatever a pad token embeds to ...
        after = model(tokens, neighbours)
    real = tokens != cfg.pad_id
    torch.testing.assert_close(after[real], before[real], rtol=0, atol=1e-10)  # ... never matters
    assert changed(after, before)[~real].all()  # (a pad query does read itself: test can fail)


def test_more_neighbours_at_run_time_than_in_training() -> None:
    cfg = CONFIGS["tiny"]  # num_neighbours = 2
    model = make_model(cfg)
    tokens = random_tokens(cfg, 1, 4 * cfg.chunk_size)
    neighbours = random_tokens(cfg, 1, 4, 5, cfg.neighbour_len, seed=3)
    with torch.no_grad():
        five, two = model(tokens, neighbours), model(tokens, neighbours[:, :, :2])
    assert five.shape == two.shape
    assert changed(five, two)[:, cfg.chunk_size - 1 :].all()


def test_neighbours_for_whole_or_partial_last_chunk_agree() -> None:
    cfg = CONFIGS["tiny"]
    m = cfg.chunk_size
    model = make_model(cfg)
    tokens = random_tokens(cfg, 1, 3 * m + 2)
    neighbours = random_tokens(cfg, 1, 4, 2, cfg.neighbour_len, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, neighbours), model(tokens, neighbours[:, :3]))


# ---------------------------------------------------------------------------------------------
# gradients, mixed precision, FLOPs


def test_gradients_reach_encoder_and_every_cca_layer_but_not_in_retro_off() -> None:
    cfg = RetroConfig.preset("tiny", dec_depth=6, cca_layers=(2, 4, 6))
    torch.manual_seed(0)
    model = RETRO(cfg)
    tokens = random_tokens(cfg, 2, 4 * cfg.chunk_size)
    neighbours = random_tokens(cfg, 2, 4, 2, cfg.neighbour_len, seed=3)
    retrieval = dict(model.retrieval_parameters())
    assert any(n.startswith("encoder.") for n in retrieval)
    for layer in cfg.cca_layers:
        assert any(n.startswith(f"blocks.{layer - 1}.cca.") for n in retrieval)
    assert not any(".cca" in n for n in retrieval if n.startswith(("blocks.0.", "blocks.2.")))

    model(tokens, neighbours).logsumexp(-1).sum().backward()
    for name, p in retrieval.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    model.zero_grad(set_to_none=True)
    model(tokens).logsumexp(-1).sum().backward()  # RETRO[OFF]
    for name, p in retrieval.items():
        assert p.grad is None, f"RETRO[OFF] sent a gradient to {name}"
    assert model.tok_emb.weight.grad is not None


def test_bf16_autocast_forward_and_backward_on_cpu() -> None:
    cfg = CONFIGS["tiny"]
    torch.manual_seed(0)
    model = RETRO(cfg)
    tokens = random_tokens(cfg, 2, 4 * cfg.chunk_size)
    neighbours = random_tokens(cfg, 2, 4, 2, cfg.neighbour_len, seed=3)
    neighbours[:, :, 1, 5:] = cfg.pad_id
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(tokens, neighbours)
    assert low.dtype == torch.bfloat16 and low.isfinite().all()
    low.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    with torch.no_grad():
        full = model(tokens, neighbours)
    assert (low.float() - full).abs().max() < 0.05 * full.abs().max()


def test_flops_per_token_matches_counted_matmuls() -> None:
    cfg = RetroConfig.preset("tiny", dec_depth=3, cca_layers=(2, 3))
    model = RETRO(cfg)
    B, n, k = 2, 8 * cfg.chunk_size, 3
    tokens = random_tokens(cfg, B, n)
    neighbours = random_tokens(cfg, B, n // cfg.chunk_size, k, cfg.neighbour_len, seed=3)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(tokens, neighbours)
    counted = counter.get_total_flops() / (B * n)
    # attention products (SDPA on CPU is not counted by FlopCounterMode), restated here
    d, e, m, r = cfg.dec_dim, cfg.enc_dim, cfg.chunk_size, cfg.neighbour_len
    attention = 4 * (
        cfg.dec_depth * n * d
        + k * r / m * cfg.enc_depth * (r * e + m * e)
        + len(cfg.cca_layers) * k * r * d
    )
    predicted = model.cfg.flops_per_token(n, k, training=False)
    assert counted + attention == pytest.approx(predicted, rel=0.02)
    assert model.cfg.flops_per_token(n, k) == pytest.approx(3 * predicted)


def test_baseline_config_builds_a_plain_decoder() -> None:
    cfg = RetroConfig.preset("tiny", cca_layers=())
    model = RETRO(cfg)
    assert model.encoder is None and not list(model.retrieval_parameters())
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    tokens = random_tokens(cfg, 1, 20)
    with pytest.raises(ValueError, match="without retrieval"):
        model(tokens, torch.ones(1, 2, 2, 16, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# input checks and configuration


def test_wrong_input_shapes_raise_value_error_with_expected_shape() -> None:
    cfg = CONFIGS["tiny"]
    model = make_model(cfg)
    m = cfg.chunk_size
    tokens = random_tokens(cfg, 2, 3 * m + 1)
    with pytest.raises(ValueError, match=r"shape \(batch, n\)"):
        model(tokens[0])
    with pytest.raises(ValueError, match=r"int64.*float32"):
        model(tokens.float())
    with pytest.raises(ValueError, match=r"max_seq_len \(128\)"):
        model(random_tokens(cfg, 1, cfg.max_seq_len + 1))
    with pytest.raises(ValueError, match=r"outside 0\.\.vocab_size-1"):
        model(tokens + cfg.vocab_size)
    with pytest.raises(
        ValueError, match=r"\(batch=2, chunks=3 or 4, k, r\); got shape \(2, 2, 2, 16\)"
    ):
        model(tokens, random_tokens(cfg, 2, 2, 2, 16))
    with pytest.raises(ValueError, match=r"\(batch=2, chunks=3 or 4, k, r\)"):
        model(tokens, random_tokens(cfg, 2, 3, 16))
    with pytest.raises(ValueError, match=r"batch=2"):
        model(tokens, random_tokens(cfg, 1, 3, 2, 16))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(cca_layers=(0,)), "cca_layers"),
        (dict(cca_layers=(5,)), "cca_layers"),
        (dict(cca_layers=(2, 2)), "cca_layers"),
        (dict(dec_dim=66), "dec_dim"),
        (dict(enc_dim=50), "enc_dim"),
        (dict(dec_dim=60, dec_heads=4), "dec_heads"),  # head size 15 is odd
        (dict(max_seq_len=100), "max_seq_len"),
        (dict(pad_id=512), "pad_id"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(chunk_size=-1), "chunk_size"),
        (dict(enc_depth=0), "enc_depth"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_neighbours=0), "num_neighbours"),
        (dict(copy_head=True), "copy_head"),  # without cca_match
        (dict(copy_head=1, cca_match=2), "copy_head"),
    ],
)
def test_invalid_config_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"RetroConfig\.{field}"):
        RetroConfig.preset("tiny", **overrides)


def test_config_round_trip_and_presets() -> None:
    for name in ("tiny", "small", "base"):
        cfg = RetroConfig.preset(name)
        assert RetroConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    base = RetroConfig.preset("base")
    assert (base.dec_dim, base.dec_depth, base.cca_layers) == (768, 12, (6, 9, 12))
    assert (base.enc_dim, base.enc_depth, base.chunk_size, base.neighbour_len) == (896, 2, 64, 128)
    assert RetroConfig.preset("small", dropout=0.1).dropout == 0.1
    assert RetroConfig(cca_layers=[12, 6]).cca_layers == (6, 12)
    with pytest.raises(ValueError, match="unknown RetroConfig field"):
        RetroConfig.from_dict({**base.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="unknown RetroConfig preset"):
        RetroConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown RetroConfig field"):
        RetroConfig.preset("tiny", widht=3)
    assert math.isclose(RETRO(RetroConfig.preset("tiny")).num_params() / 1e6, 0.37, abs_tol=0.05)


def copy_model(
    match: float, sentinel: float, content: bool = False
) -> tuple[RETRO, torch.Tensor, torch.Tensor]:
    """The "copy" model with content scores 0 in its copy head (unless `content`): only the match bonus (each
    lag `match`) and the sentinel's score decide; and tokens whose chunk 0 reappears in a
    neighbour, so that positions 4..6 of chunk 1 follow copies of neighbour tokens."""
    cfg = CONFIGS["copy"]
    model = make_model(cfg)
    with torch.no_grad():
        if not content:
            model.copy.q.weight.zero_()
        model.copy.match_weight.fill_(match)
        model.copy.sentinel_bias.fill_(sentinel)
    tokens = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 2, 11, 12, 13, 14]])  # 3 chunks of m=4
    neighbours = random_tokens(cfg, 1, 3, 2, cfg.neighbour_len, seed=2)
    # neighbour 0 of chunk 0 continues "6 7 8 9" as "... 6 7 1 15" after 6 7: the copy of
    # positions 3, 4 ("6 7") points at 1, not at the text's own 8
    neighbours[0, 0, 0] = torch.tensor([4, 5, 6, 7, 1, 15])
    neighbours[neighbours == 7] = 10  # no other "7" to point from (besides the one above)
    neighbours[0, 0, 0, 3] = 7
    return model, tokens, neighbours


def test_copy_head_moves_probability_to_the_token_after_a_copy() -> None:
    """copy_head: the mixture is a distribution; after "6 7", which a neighbour continues with
    1, token 1 gets the pointer's weight; with the sentinel certain it is the plain LM."""
    model, tokens, neighbours = copy_model(match=10.0, sentinel=2.0)
    with torch.no_grad():
        logp = model(tokens, neighbours)[0]  # (12, V) log-probabilities
        lm = torch.log_softmax(model.lm_head(model.hidden_states(tokens, neighbours))[0], -1)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(12, dtype=logp.dtype))
    torch.testing.assert_close(logp[:3], lm[:3])  # positions 0..2 read no chunk: the LM alone
    assert logp[4, 1].exp() > 0.99 > lm[4, 1].exp()  # position 4 ends "6 7": copies 1
    assert logp[5, 1].exp() < 0.5  # position 5 ends "7 8", which no neighbour holds
    with torch.no_grad():
        model.copy.sentinel_bias.fill_(1e4)  # the sentinel takes all: the plain LM everywhere
        torch.testing.assert_close(model(tokens, neighbours)[0], lm)
        model.copy.sentinel_bias.fill_(2.0)
        off = model(tokens)[0]  # RETRO[OFF]: the LM, no copying
    torch.testing.assert_close(off, model.lm_head(model.hidden_states(tokens))[0])


def test_copy_head_loss_is_the_cross_entropy_of_its_mixture_and_retrofit_trains_it() -> None:
    """The fused loss of the mixture (never materialised) equals the cross-entropy of the
    model's distribution, gradients included; the copy head is a retrieval part."""
    model, tokens, neighbours = copy_model(match=3.0, sentinel=5.0, content=True)
    tokens = torch.cat([tokens, torch.roll(tokens, 3, dims=1)])  # 2 rows
    neighbours = torch.cat([neighbours, torch.roll(neighbours, 1, dims=1)])
    targets = torch.roll(tokens, -1, dims=1)
    targets[0, -1] = targets[1, :2] = 0  # pad: ignored
    targets[1, 5] = neighbours[1, 0, 0, 2]  # a target the pointer can copy

    fused, fused_grads = loss_and_grads(model, lambda: model.loss(tokens, targets, neighbours))
    plain, plain_grads = loss_and_grads(
        model,
        lambda: torch.nn.functional.cross_entropy(
            model(tokens, neighbours).flatten(0, 1), targets.flatten(), ignore_index=0
        ),
    )
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-8, atol=1e-11, msg=name)
    copy_names = {n for n, _ in model.named_parameters() if n.startswith("copy.")}
    assert copy_names == {"copy.q.weight", "copy.kv.weight", "copy.match_weight",
                          "copy.sentinel", "copy.sentinel_bias"}  # fmt: skip
    assert copy_names <= {n for n, _ in model.retrieval_parameters()}  # RETRO-fitting trains it
    for name in copy_names:
        assert fused_grads[name].abs().sum() > 0, name
    assert model.loss(tokens, torch.zeros_like(targets), neighbours).item() == 0.0  # all pad


# ---------------------------------------------------------------------------------------------
# the fused training loss and the low-precision attention path


def test_fused_loss_equals_logits_cross_entropy_with_gradients() -> None:
    cfg = CONFIGS["tiny"]
    model = make_model(cfg)
    tokens = random_tokens(cfg, 3, 100)  # 300 rows: two row blocks of the fused loss
    targets = random_tokens(cfg, 3, 100, seed=4)
    targets[0, :10] = cfg.pad_id  # ignored
    neighbours = random_tokens(cfg, 3, 12, 2, cfg.neighbour_len, seed=3)

    fused, fused_grads = loss_and_grads(model, lambda: model.loss(tokens, targets, neighbours))
    plain, plain_grads = loss_and_grads(
        model,
        lambda: torch.nn.functional.cross_entropy(
            model(tokens, neighbours).flatten(0, 1), targets.flatten(), ignore_index=cfg.pad_id
        ),
    )
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model.loss(tokens, targets, neighbours), plain)
    with pytest.raises(ValueError, match="targets must have the shape of tokens"):
        model.loss(tokens, targets[:, :-1])


def test_fused_loss_under_bf16_autocast_matches_autocast_logits() -> None:
    cfg = CONFIGS["tiny"]
    torch.manual_seed(0)
    model = RETRO(cfg)
    tokens, targets = random_tokens(cfg, 2, 64), random_tokens(cfg, 2, 64, seed=4)
    neighbours = random_tokens(cfg, 2, 8, 2, cfg.neighbour_len, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model.loss(tokens, targets, neighbours)
        logits = model(tokens, neighbours).float()
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    fused.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("masked", [False, True])
def test_low_precision_attention_path_matches_sdpa(masked: bool) -> None:
    from retrolm.model import SHORT_KEYS, masked_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, n, 16, generator=g) for n in (8, SHORT_KEYS, SHORT_KEYS))
    mask = torch.rand(6, SHORT_KEYS, generator=g) > 0.5 if masked else None
    if masked:
        mask[2] = False  # a row with nothing to attend: zeros
    reference = masked_attention(q, k, v, mask)  # float32: SDPA
    low = masked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)  # matmul path
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.02)
    if masked:
        assert (low[2] == 0).all() and (reference[2] == 0).all()
